"""Turn a model completion into the program that is run, and MBPP exact match."""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence

FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
HUMANEVAL_STOP = ("\nclass ", "\ndef ", "\n#", "\nif ", "\nprint(", "\nassert ")
MBPP_STOP = ("[DONE]", "\n[BEGIN]", "\nYou are an expert")


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """Cut at the earliest stop sequence."""
    cut = len(text)
    for stop in stops:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


def extract_code_block(text: str) -> str | None:
    """The first fenced code block, or None (an unclosed fence runs to the end)."""
    match = FENCE.search(text)
    return match.group(1) if match else None


def extract_mbpp_program(completion: str) -> str:
    """MBPP prompts end with `[BEGIN]`; the program runs to `[DONE]`. Chat models may answer with
    a fenced block instead, or repeat the `[BEGIN]` marker."""
    text = completion
    if "[BEGIN]" in text:
        text = text.split("[BEGIN]", 1)[1]
    text = truncate_at_stop(text, MBPP_STOP)
    block = extract_code_block(text)
    if block is not None:
        text = block
    return text.strip("\n").rstrip() + "\n"


def extract_humaneval_program(prompt: str, completion: str) -> str:
    """HumanEval completions continue the function body after the prompt. A completion that is a
    fenced block (chat models) restates the whole function: it then replaces the prompt's stub,
    keeping the prompt's imports."""
    block = extract_code_block(completion)
    if block is not None and re.search(r"^\s*def\s", block, re.MULTILINE):
        imports = [line for line in prompt.splitlines() if re.match(r"(import|from)\s", line)]
        return "\n".join([*imports, block.rstrip(), ""])
    return prompt + truncate_at_stop(completion, HUMANEVAL_STOP).rstrip() + "\n"


def normalize_code(code: str) -> str:
    """Canonical text of a program: its unparsed AST when it parses (formatting and comments do
    not count), else the text with whitespace runs collapsed per line."""
    try:
        return ast.unparse(ast.parse(code))
    except (SyntaxError, ValueError, RecursionError):
        lines = (" ".join(line.split()) for line in code.replace("\r\n", "\n").splitlines())
        return "\n".join(line for line in lines if line)


def exact_match(program: str, reference: str) -> bool:
    return normalize_code(program) == normalize_code(reference)
