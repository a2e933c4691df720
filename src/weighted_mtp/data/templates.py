"""Prompt templates: how a record's instruction and input become the text before its response.

- `alpaca`: the Stanford Alpaca format (with and without an input section).
- `chat`: the tokenizer's own chat template (one user turn, generation prompt added).
- `mbpp_fewshot`: the standard 3-shot MBPP prompt for base models (Austin et al. 2021), with MBPP
  tasks 2, 3 and 4 as the examples and `[BEGIN]` / `[DONE]` around each program.

Only the response is trained on; `render` returns the prompt and the response separately.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from weighted_mtp.errors import ConfigError

TEMPLATES = ("alpaca", "chat", "mbpp_fewshot")

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# MBPP "prompt" split tasks 2, 3 and 4 (CC BY 4.0), the examples of the original few-shot prompt.
MBPP_FEWSHOT_EXAMPLES = (
    {
        "text": "Write a function to find the similar elements from the given two tuple lists.",
        "code": "def similar_elements(test_tup1, test_tup2):\n"
        "  res = tuple(set(test_tup1) & set(test_tup2))\n"
        "  return (res) ",
        "test_list": [
            "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
            "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
            "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)",
        ],
    },
    {
        "text": "Write a python function to identify non-prime numbers.",
        "code": "import math\n"
        "def is_not_prime(n):\n"
        "    result = False\n"
        "    for i in range(2,int(math.sqrt(n)) + 1):\n"
        "        if n % i == 0:\n"
        "            result = True\n"
        "    return result",
        "test_list": [
            "assert is_not_prime(2) == False",
            "assert is_not_prime(10) == True",
            "assert is_not_prime(35) == True",
        ],
    },
    {
        "text": "Write a function to find the largest integers from a given list of numbers using heap queue algorithm.",
        "code": "import heapq as hq\n"
        "def heap_queue_largest(nums,n):\n"
        "  largest_nums = hq.nlargest(n, nums)\n"
        "  return largest_nums",
        "test_list": [
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]",
        ],
    },
)
MBPP_BEGIN, MBPP_DONE = "[BEGIN]", "[DONE]"


class ChatTokenizer(Protocol):
    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str: ...


def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def chat_prompt(tokenizer: ChatTokenizer, instruction: str, input: str = "") -> str:
    if not getattr(tokenizer, "has_chat_template", True):
        raise ConfigError("data.prompt_template is 'chat' but the tokenizer has no chat template; use 'alpaca'")
    content = f"{instruction}\n\n{input}" if input.strip() else instruction
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _mbpp_task(text: str, tests: str) -> str:
    tests_part = f" Your code should pass these tests:\n\n{tests}\n" if tests.strip() else "\n"
    return f"You are an expert Python programmer, and here is your task: {text}{tests_part}{MBPP_BEGIN}\n"


def mbpp_fewshot_prompt(text: str, tests: str) -> str:
    """The 3-shot prompt ending in `[BEGIN]\\n`; a model continues with code, then `[DONE]`."""
    shots = "".join(
        _mbpp_task(ex["text"], "\n".join(ex["test_list"])) + f"{ex['code']}\n{MBPP_DONE}\n"
        for ex in MBPP_FEWSHOT_EXAMPLES
    )
    return shots + _mbpp_task(text, tests)


def prompt_adds_bos(template: str) -> bool:
    """Whether a prompt under this template is encoded with BOS in front: the chat template writes its
    own start-of-turn token, the others begin with plain text. Training, rollouts and evaluation all
    ask here, so a model is sampled with exactly the token ids it was trained on."""
    return template != "chat"


def render(template: str, record: Mapping[str, Any], tokenizer: Any = None) -> tuple[str, str]:
    """(prompt, response) text of a processed record under the named template."""
    instruction, input, output = record["instruction"], record.get("input") or "", record["output"]
    if template == "alpaca":
        return alpaca_prompt(instruction, input), output
    if template == "chat":
        return chat_prompt(tokenizer, instruction, input), output
    if template == "mbpp_fewshot":
        return mbpp_fewshot_prompt(instruction, input), f"{output}\n{MBPP_DONE}"
    raise ConfigError(f"data.prompt_template: unknown template {template!r} (known: {', '.join(TEMPLATES)})")
