"""The program computes, the harness judges: an assert split into what runs in the sandbox and what
runs here.

A test such as `assert math.isclose(area(2.0), 12.56, rel_tol=1e-3)` mixes the program's code (the
call `area(2.0)`) with the test's own (the expected value, the comparison). Run as one program, the
test shares the process with the code it judges, which can then rewrite the judgement: an object
whose `__eq__` always says True, a trace function that skips the asserts, the expected values read
from the code object they were compiled into. Here only the parts that need the program's names
(`area(2.0)`) are sent to the sandbox, as `calls`; their values come back as plain data (builtin types
only, see `sandbox.decode_plain`), and the rest of the assert, with each call replaced by its value,
is evaluated in the harness (`check`). The expected values never reach the program.

Which names are the program's: every name it binds anywhere (a program may define its own `sum`), and
every name that is not a builtin or a module the tests import (`HARNESS_NAMES`). An expression that needs none of the program's names runs here; a comparison, a
boolean or arithmetic operator, a container display, or a call of a builtin (`set(f(x))`,
`math.isclose(...)`) is split into its parts; anything else that needs the program (a call of its
function, an attribute or index of its result) is one call, evaluated whole in the sandbox.
"""

from __future__ import annotations

import ast
import builtins
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any

HARNESS_MODULES = {"math": math}
HARNESS_NAMES = frozenset(dir(builtins)) | frozenset(HARNESS_MODULES)
SPLIT_NODES = (ast.Compare, ast.BoolOp, ast.UnaryOp, ast.BinOp, ast.Tuple, ast.List, ast.Set, ast.Dict, ast.IfExp)


@dataclass(frozen=True)
class SplitAssert:
    """`check`: the assert's test expression, with call i replaced by the name `_call_<offset + i>`;
    `calls`: those expressions' source, to evaluate over the program's names."""

    check: str
    calls: tuple[str, ...]


def bound_names(source: str) -> frozenset[str]:
    """Every name the program binds anywhere (definitions, assignments, imports, parameters), or
    none when it does not parse (then it fails in the sandbox anyway)."""
    try:
        with warnings.catch_warnings():  # a generated program's invalid escapes are its own business
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return frozenset()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.update(node.names)
    return frozenset(names)


@functools.lru_cache(maxsize=16384)
def names_in(texts: tuple[str, ...]) -> frozenset[str]:
    """The names the asserts read."""
    return frozenset(node.id for text in texts for node in ast.walk(ast.parse(text.strip())) if isinstance(node, ast.Name))


def needs_program(node: ast.AST, program_names: frozenset[str] = frozenset()) -> bool:
    """Whether the expression reads a name of the program's: one it binds, or one the harness does
    not have."""
    bound = {arg.arg for lam in ast.walk(node) if isinstance(lam, ast.Lambda) for arg in lam.args.args}
    comprehension_targets = {
        name.id
        for comp in ast.walk(node)
        if isinstance(comp, ast.comprehension)
        for name in ast.walk(comp.target)
        if isinstance(name, ast.Name)
    }
    local = bound | comprehension_targets
    return any(
        isinstance(name, ast.Name)
        and name.id not in local
        and (name.id not in HARNESS_NAMES or name.id in program_names)
        for name in ast.walk(node)
    )


class _Splitter(ast.NodeTransformer):
    def __init__(self, offset: int, program_names: frozenset[str]) -> None:
        self.offset = offset
        self.program_names = program_names
        self.calls: list[str] = []

    def visit(self, node: ast.AST) -> ast.AST:
        if not isinstance(node, ast.expr) or not needs_program(node, self.program_names):
            return node
        harness_call = isinstance(node, ast.Call) and not needs_program(node.func, self.program_names)
        if isinstance(node, SPLIT_NODES) or harness_call:
            return self.generic_visit(node)
        name = f"_call_{self.offset + len(self.calls)}"
        self.calls.append(ast.unparse(node))
        return ast.copy_location(ast.Name(id=name, ctx=ast.Load()), node)


@functools.lru_cache(maxsize=65536)
def split_assert(text: str, offset: int = 0, program_names: frozenset[str] = frozenset()) -> SplitAssert:
    """Split one `assert <test>` statement (its message, if any, is dropped); `offset` numbers the
    calls after those of the asserts before it; `program_names`: the names the program binds."""
    tree = ast.parse(text.strip())
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        raise ValueError(f"not a single assert statement: {text!r}")
    splitter = _Splitter(offset, program_names)
    test = splitter.visit(tree.body[0].test)
    return SplitAssert(ast.unparse(test), tuple(splitter.calls))


def split_asserts(texts: list[str], program: str = "") -> list[SplitAssert]:
    """Each assert split against `program` (the code that runs before them), its calls numbered after
    the previous asserts' (one namespace for all)."""
    names = bound_names(program) & names_in(tuple(texts))  # what matters, and a small key for the cache
    out: list[SplitAssert] = []
    for text in texts:
        out.append(split_assert(text, offset=sum(len(s.calls) for s in out), program_names=names))
    return out


@functools.lru_cache(maxsize=65536)
def _compiled(check: str):
    return compile(check, "<check>", "eval", dont_inherit=True)


def judge(checks: tuple[str, ...], values: dict[str, Any]) -> tuple[bool, str]:
    """Evaluate each check in the harness with the calls' values bound to their names: (passed, why
    not). The checks are the benchmark's own code; the values are plain data."""
    namespace = {"__builtins__": builtins, **HARNESS_MODULES, **values}
    for index, check in enumerate(checks):
        try:
            if not eval(_compiled(check), dict(namespace)):  # noqa: S307 - the benchmark's test, not the program
                return False, f"assert {index + 1} failed: {check}"
        except Exception as exc:  # noqa: BLE001 - a test that raises on these values fails
            return False, f"assert {index + 1} raised {type(exc).__name__}: {check}"
    return True, ""


def judge_check(prompt: str, test: str, entry_point: str, candidate: Any) -> tuple[bool, str]:
    """HumanEval's judgement in the harness: the benchmark's prompt (its helpers, e.g. `poly` for
    `find_zero`) and test code run here, and `check(candidate)` with `candidate` calling the program
    in the sandbox; (passed, why not)."""
    namespace: dict[str, Any] = {"__builtins__": builtins, "__name__": "__check__"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec(compile(prompt, "<prompt>", "exec", dont_inherit=True), namespace)  # noqa: S102 - the benchmark's
            exec(compile(test, "<test>", "exec", dont_inherit=True), namespace)  # noqa: S102 - the benchmark's
        namespace[entry_point] = candidate
        namespace["check"](candidate)
    except Exception as exc:  # noqa: BLE001 - a check that raises fails
        return False, f"{type(exc).__name__}: {str(exc)[:200]}"
    return True, ""

