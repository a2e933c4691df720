"""Benchmarks: how each loads its problems, prompts a model, and turns a completion into a test run.

Problems come from the raw-data readers in `weighted_mtp.data.sources` (files under
`paths.raw_data`). A benchmark adds what evaluation needs on top:

- `prompt(problem, template, tokenizer)` and `stop`: what the model is asked, where it stops;
- `extract(problem, completion)`: the program inside a completion (post-processing);
- `program(problem, program_text)`: the sandbox job that runs it against the problem's tests;
- `reference(problem)`: the benchmark's gold program, for the self-check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from weighted_mtp.data.sources import Problem, get_source
from weighted_mtp.data.templates import alpaca_prompt, chat_prompt, mbpp_fewshot_prompt
from weighted_mtp.errors import lookup
from weighted_mtp.eval.judge import split_asserts
from weighted_mtp.eval.postprocess import (
    MBPP_STOP,
    exact_match,
    extract_code_block,
    extract_humaneval_program,
    extract_mbpp_program,
)
from weighted_mtp.eval.sandbox import CallProgram, CheckProgram, Program, StdioProgram

ALPACA_STOP = ("\n### Instruction", "\n### Input", "\n### Response")


class Benchmark:
    name = ""
    default_split = "test"
    stop: tuple[str, ...] = ()

    def load(self, raw_dir: Path, split: str, limit: int | None = None) -> list[Problem]:
        problems = []
        for problem in get_source(self.name).read(Path(raw_dir), split):
            problems.append(problem)
            if limit is not None and len(problems) >= limit:
                break
        return problems

    def prompt(self, problem: Problem, template: str = "alpaca", tokenizer: Any = None) -> str:
        if template == "chat":
            return chat_prompt(tokenizer, problem.instruction, problem.input)
        return alpaca_prompt(problem.instruction, problem.input)

    def stop_sequences(self, template: str) -> tuple[str, ...]:
        return self.stop if template == "mbpp_fewshot" else (*self.stop, *ALPACA_STOP)

    def task_id(self, problem: Problem) -> str:
        return problem.problem_id

    def extract(self, problem: Problem, completion: str) -> str:
        block = extract_code_block(completion)
        return block if block is not None else completion

    def program(self, problem: Problem, program_text: str) -> Program:
        raise NotImplementedError

    def reference(self, problem: Problem) -> str | None:
        return problem.correct[0] if problem.correct else None

    def exact_match(self, problem: Problem, program_text: str) -> bool | None:
        """The secondary exact-match metric; None where the benchmark does not define it."""
        return None


class MBPP(Benchmark):
    """Austin et al. 2021: setup code, the program, then the task's three asserts, judged in the harness."""

    name = "mbpp"
    stop = MBPP_STOP

    def prompt(self, problem: Problem, template: str = "mbpp_fewshot", tokenizer: Any = None) -> str:
        if template == "mbpp_fewshot":
            return mbpp_fewshot_prompt(problem.instruction, problem.input)
        return super().prompt(problem, template, tokenizer)

    def task_id(self, problem: Problem) -> str:
        return problem.problem_id.removeprefix("mbpp/")

    def extract(self, problem: Problem, completion: str) -> str:
        return extract_mbpp_program(completion)

    def program(self, problem: Problem, program_text: str) -> Program:
        """The setup code and the program run in the sandbox; each assert is split so that only its
        calls of the program run there and the comparison runs in the harness (`eval/judge.py`)."""
        tests = problem.tests
        source = "\n".join([tests["setup"], program_text, ""])
        split = split_asserts(tests["cases"], source)
        return CallProgram(
            source,
            calls=tuple(call for part in split for call in part.calls),
            checks=tuple(part.check for part in split),
        )

    def exact_match(self, problem: Problem, program_text: str) -> bool | None:
        return exact_match(program_text, problem.correct[0])


class HumanEval(Benchmark):
    """Chen et al. 2021: the prompt's function completed, then `check(entry_point)`, judged in the harness."""

    name = "humaneval"
    stop = ("\nclass ", "\ndef ", "\n#", "\nif ", "\nprint(")

    def prompt(self, problem: Problem, template: str = "completion", tokenizer: Any = None) -> str:
        if template in ("completion", "mbpp_fewshot", "alpaca"):
            return problem.input
        return chat_prompt(tokenizer, "Complete this Python function.", problem.input)

    def stop_sequences(self, template: str) -> tuple[str, ...]:
        return () if template == "chat" else self.stop

    def extract(self, problem: Problem, completion: str) -> str:
        return extract_humaneval_program(problem.input, completion)

    def program(self, problem: Problem, program_text: str) -> Program:
        """The program runs in the sandbox and serves its entry point; `check(candidate)` runs in
        the harness (`eval/judge.py`), so the tests' expected values never reach the program."""
        tests = problem.tests
        return CheckProgram(program_text, prompt=problem.input, test=tests["test"], entry_point=tests["entry_point"])


class CodeContests(Benchmark):
    """Li et al. 2022: stdin/stdout tests (public, private, generated), the problem's time limit."""

    name = "codecontests"
    stop = ()

    def __init__(self, time_limit_factor: float = 1.0, default_time_limit_s: float = 10.0) -> None:
        self.time_limit_factor = time_limit_factor
        self.default_time_limit_s = default_time_limit_s

    def program(self, problem: Problem, program_text: str) -> Program:
        tests = problem.tests
        cases = tuple(
            (case["input"], case["output"])
            for part in ("public", "private", "generated")
            for case in tests.get(part, [])
        )
        time_limit = (tests.get("time_limit_s") or self.default_time_limit_s) * self.time_limit_factor
        return StdioProgram(program_text, cases, timeout_s=time_limit)


BENCHMARKS: dict[str, type[Benchmark]] = {"mbpp": MBPP, "humaneval": HumanEval, "codecontests": CodeContests}


def get_benchmark(name: str) -> Benchmark:
    return lookup(BENCHMARKS, name, "benchmark")()
