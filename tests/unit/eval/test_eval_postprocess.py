from __future__ import annotations

from weighted_mtp.eval.postprocess import (
    exact_match,
    extract_code_block,
    extract_humaneval_program,
    extract_mbpp_program,
    normalize_code,
    truncate_at_stop,
)


def test_truncate_at_earliest_stop() -> None:
    assert truncate_at_stop("a\nb[DONE]c\ndef x", ["\ndef", "[DONE]"]) == "a\nb"
    assert truncate_at_stop("abc", ["x"]) == "abc"


def test_code_fences() -> None:
    assert extract_code_block("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    assert extract_code_block("```\nx = 1\n```") == "x = 1\n"
    assert extract_code_block("```py\nx = 1") == "x = 1"  # unclosed: runs to the end
    assert extract_code_block("no fence") is None


def test_mbpp_markers() -> None:
    assert extract_mbpp_program("def f(x):\n    return x\n[DONE]\nYou are an expert") == "def f(x):\n    return x\n"
    assert extract_mbpp_program("[BEGIN]\ndef f(): pass\n[DONE]") == "def f(): pass\n"
    assert extract_mbpp_program("Sure!\n```python\ndef f(): pass\n```\n[DONE]") == "def f(): pass\n"


def test_humaneval_continuation_and_restated_function() -> None:
    prompt = "from typing import List\n\ndef add(a: int, b: int) -> int:\n    \"\"\"Add.\"\"\"\n"
    body = "    return a + b\n\ndef unrelated():\n    pass\n"
    assert extract_humaneval_program(prompt, body) == prompt + "    return a + b\n"
    fenced = "```python\ndef add(a, b):\n    return a + b\n```"
    program = extract_humaneval_program(prompt, fenced)
    assert program == "from typing import List\ndef add(a, b):\n    return a + b\n"


def test_exact_match_ignores_formatting_not_meaning() -> None:
    reference = "def f(a,b):\r\n  return a+b  # sum"
    assert exact_match("def f(a, b):\n    return a + b\n", reference)
    assert not exact_match("def f(a, b):\n    return a - b\n", reference)
    assert normalize_code("def broken(:\n   x") == "def broken(:\nx"
