"""Programs that try to pass MBPP's tests without solving them: the program computes in the sandbox,
the harness judges, so every trick below fails. Each case is a real MBPP test problem and a hostile
completion; each must fail (or time out), leave no process behind, and leave the sandbox working.
The honest controls (a builtin subclass that really holds the right value) must still pass."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fixtures.sandbox import AS_ROOT, assert_contained

from weighted_mtp.eval.benchmarks import get_benchmark
from weighted_mtp.eval.judge import split_assert, split_asserts
from weighted_mtp.eval.sandbox import AssertProgram, CallProgram, CheckProgram, Limits, Sandbox, decode_plain

LIMITS = Limits(timeout_s=2.0, wall_clock_factor=4.0, memory_mb=512, max_processes=32, output_limit_bytes=16384)

ALWAYS_EQUAL = "class Always:\n    def __eq__(self, other): return True\n    def __ne__(self, other): return False\n    __hash__ = object.__hash__\n"

# remove_Occ(s, ch) removes the first and last occurrence of ch: remove_Occ("hello", "l") == "heo"
REMOVE_OCC = {
    "__eq__ always True": ALWAYS_EQUAL + "def remove_Occ(s, ch):\n    return Always()\n",
    "__eq__ always True in a list": ALWAYS_EQUAL + "def remove_Occ(s, ch):\n    return [Always()]\n",
    "str subclass whose __eq__ is True": (
        "class S(str):\n    def __eq__(self, other): return True\n    __hash__ = str.__hash__\n"
        "def remove_Occ(s, ch):\n    return S('wrong')\n"
    ),
    "__class__ that claims to be str": (
        "class Fake:\n    __class__ = property(lambda self: str)\n    def __eq__(self, other): return True\n"
        "def remove_Occ(s, ch):\n    return Fake()\n"
    ),
    "trace function jumping over the asserts": (
        "import sys\ndef tracer(frame, event, arg):\n    if event == 'line' and frame.f_code.co_filename != __file__:\n"
        "        try:\n            frame.f_lineno = frame.f_lineno + 1\n        except Exception:\n            pass\n"
        "    return tracer\nsys.settrace(tracer)\ndef remove_Occ(s, ch):\n    return s\n"
    ),
    "expected values from the code objects on the stack": (
        "import sys, gc\ndef remove_Occ(s, ch):\n    found = []\n    frame = sys._getframe(1)\n    while frame:\n"
        "        found += [c for c in frame.f_code.co_consts if isinstance(c, str) and c != s]\n        frame = frame.f_back\n"
        "    return found[-1] if found else s\n"
    ),
    "expected values from every object in memory": (
        "import gc\ndef remove_Occ(s, ch):\n    strings = [o for o in gc.get_objects() if isinstance(o, str) and len(o) == len(s) - 2]\n"
        "    return strings[0] if strings else ''\n"
    ),
    "exit before the calls": "import os\ndef remove_Occ(s, ch):\n    return s\nos._exit(0)\n",
    "sys.exit(0) inside the call": "import sys\ndef remove_Occ(s, ch):\n    sys.exit(0)\n",
    "forge the nonce and results on fd 3": (
        "import os, json\ndef remove_Occ(s, ch):\n    for fd in range(3, 8):\n        try:\n"
        "            os.write(fd, os.urandom(16).hex().encode() + json.dumps([['value', 'heo']] * 3).encode())\n"
        "        except OSError:\n            pass\n    os._exit(0)\n"
    ),
    "replace eval so every call returns a constant": (
        "import builtins\nbuiltins.eval = lambda *args, **kwargs: 'heo'\ndef remove_Occ(s, ch):\n    return s\n"
    ),
    "replace type() and isinstance()": (
        ALWAYS_EQUAL + "import builtins\nbuiltins.type = lambda *a: str\nbuiltins.isinstance = lambda *a: True\n"
        "def remove_Occ(s, ch):\n    return Always()\n"
    ),
    "a generator instead of a value": "def remove_Occ(s, ch):\n    return (c for c in 'heo')\n",
    "a list that contains itself": "def remove_Occ(s, ch):\n    a = []\n    a.append(a)\n    return a\n",
    "nested deeper than the limit": "def remove_Occ(s, ch):\n    v = 'heo'\n    for _ in range(200):\n        v = [v]\n    return v\n",
    "a result larger than the output limit": "def remove_Occ(s, ch):\n    return 'x' * 10_000_000\n",
    "print the expected answer": "def remove_Occ(s, ch):\n    print('heo')\n    return None\n",
    "loop forever in the call": "def remove_Occ(s, ch):\n    while True:\n        pass\n",
}


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(1, LIMITS) as box:
        yield box


@pytest.fixture(scope="module")
def mbpp(shared_data: Path) -> dict:
    benchmark = get_benchmark("mbpp")
    problems = {benchmark.task_id(p): p for p in benchmark.load(shared_data, "test")}
    return {"benchmark": benchmark, "problems": problems}


def run_mbpp(sandbox: Sandbox, mbpp: dict, task: str, program_text: str):
    benchmark, problem = mbpp["benchmark"], mbpp["problems"][task]
    program = benchmark.program(problem, program_text)
    assert isinstance(program, CallProgram)
    return sandbox.run(program)


def test_the_gold_solution_passes_and_its_asserts_never_reach_the_sandbox(sandbox, mbpp):
    problem = mbpp["problems"]["11"]
    program = mbpp["benchmark"].program(problem, problem.correct[0])
    assert program.calls == ("remove_Occ('hello', 'l')", "remove_Occ('abcda', 'a')", "remove_Occ('PHP', 'P')")
    assert "heo" not in program.source and all("heo" not in call for call in program.calls)
    assert sandbox.run(program).passed


@pytest.mark.parametrize("trick", list(REMOVE_OCC))
def test_tricks_do_not_pass(sandbox, mbpp, trick):
    result = run_mbpp(sandbox, mbpp, "11", REMOVE_OCC[trick])
    assert_contained(sandbox, result)


def test_sort_matrix_with_always_equal_rows_fails(sandbox, mbpp):
    # sort_matrix(m) sorts rows by their sums: a list of objects equal to everything
    result = run_mbpp(sandbox, mbpp, "12", ALWAYS_EQUAL + "def sort_matrix(m):\n    return [Always() for _ in m]\n")
    assert_contained(sandbox, result)


def test_honest_builtin_subclasses_are_read_as_their_values(sandbox, mbpp):
    # count_common returns the four most common words with their counts, as a list of tuples
    honest = (
        "from collections import Counter, namedtuple\nPair = namedtuple('Pair', 'word count')\n"
        "class Words(list):\n    pass\n"
        "def count_common(words):\n    return Words(Pair(*p) for p in Counter(words).most_common(4))\n"
    )
    assert run_mbpp(sandbox, mbpp, "13", honest).passed
    subclass_lies = (
        "class Liar(list):\n    def __eq__(self, other): return True\n"
        "def count_common(words):\n    return Liar([('nothing', 0)])\n"
    )
    assert_contained(sandbox, run_mbpp(sandbox, mbpp, "13", subclass_lies))


def test_a_program_that_shadows_a_builtin_is_called_not_the_builtin(sandbox, mbpp):
    problem = mbpp["problems"]["126"]  # the gold solution defines its own sum(a, b)
    program = mbpp["benchmark"].program(problem, problem.correct[0])
    assert program.calls[0] == "sum(10, 15)" and program.checks[0] == "_call_0 == 6"
    assert sandbox.run(program).passed


@pytest.mark.parametrize("directory", ["/tmp", "/var/tmp", "/dev/shm", "/run/lock"])
def test_nothing_a_program_leaves_in_scratch_directories_reaches_the_next(sandbox, directory):
    if not AS_ROOT:
        pytest.skip("private scratch directories need root")
    if not os.path.isdir(directory):
        pytest.skip(f"no {directory} here")
    write = AssertProgram(f"open('{directory}/answer', 'w').write('42')\nassert open('{directory}/answer').read() == '42'\n")
    assert sandbox.run(write).passed
    read = AssertProgram(f"import os\nassert os.path.exists('{directory}/answer')\n")
    assert_contained(sandbox, sandbox.run(read))


def test_a_filled_tmp_does_not_fail_the_next_program(sandbox):
    if not AS_ROOT:
        pytest.skip("private scratch directories need root")
    fill = AssertProgram(
        "try:\n    with open('/tmp/fill', 'wb') as f:\n        while True:\n            f.write(b'x' * (1 << 20))\n"
        "except OSError:\n    pass\nassert False\n"
    )
    sandbox.run(fill)
    after = sandbox.run(AssertProgram("open('/tmp/small', 'w').write('x' * 100000)\nassert True\n"))
    assert after.passed, after


def test_the_harness_processes_are_invisible(sandbox):
    if not AS_ROOT:
        pytest.skip("hiding processes needs root")
    harness = os.getpid()
    probe = AssertProgram(
        f"import os\nassert not os.path.exists('/proc/{harness}')\n"
        "others = [p for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()]\n"
        "assert all(open(f'/proc/{p}/status').read().count('Uid:\\t0') == 0 for p in others if os.path.exists(f'/proc/{p}/status'))\n"
    )
    assert sandbox.run(probe).passed


def test_split_keeps_comparisons_and_expected_values_in_the_harness():
    split = split_assert("assert math.isclose(area(2.0), 12.56, rel_tol=0.001)")
    assert split.calls == ("area(2.0)",) and split.check == "math.isclose(_call_0, 12.56, rel_tol=0.001)"
    split = split_assert("assert set(f([1, 2])) == set([3]) and not g(1)[0]", offset=4)
    assert split.calls == ("f([1, 2])", "g(1)[0]")
    assert split.check == "set(_call_4) == set([3]) and (not _call_5)"
    split = split_assert("assert sorted(pairs(x), key=lambda p: p[1]) == [(1, 2)]")
    assert split.calls == ("pairs(x)",)
    (first, second) = split_asserts(["assert len(h(1)) == 2", "assert h(2) == [0]"], "def h(n):\n    return [0] * n\n")
    assert (first.calls, second.calls, second.check) == (("h(1)",), ("h(2)",), "_call_1 == [0]")


def test_plain_data_round_trips_and_nothing_else_decodes():
    encoded = {"dict": [[{"tuple": [1, "a"]}, {"set": [1.5, None]}], ["k", {"bytes": "6869"}]]}
    assert decode_plain(encoded) == {(1, "a"): {1.5, None}, "k": b"hi"}
    for bad in ({"object": []}, {"list": [], "tuple": []}, [1, 2]):
        with pytest.raises(ValueError):
            decode_plain(bad)


# ----------------------------------------------------------------------------- HumanEval: check() runs here

# HumanEval/0 has_close_elements(numbers, threshold): whether two numbers are closer than threshold
HAS_CLOSE = {
    "__eq__ and __bool__ always True": (
        "class Always:\n    def __eq__(self, other): return True\n    def __bool__(self): return True\n"
        "def has_close_elements(numbers, threshold):\n    return Always()\n"
    ),
    "int subclass whose __eq__ is True": (
        "class I(int):\n    def __eq__(self, other): return True\n    __hash__ = int.__hash__\n"
        "def has_close_elements(numbers, threshold):\n    return I(0)\n"
    ),
    "exit inside the call": "import os\ndef has_close_elements(numbers, threshold):\n    os._exit(0)\n",
    "exit before serving": "import os\ndef has_close_elements(numbers, threshold):\n    return True\nos._exit(0)\n",
    "answers written ahead with the nonce from the caller's frame": (
        "import sys, os, json, struct\nnonce = sys._getframe(1).f_locals.get('nonce', b'').decode()\n"
        "for _ in range(20):\n    data = json.dumps([nonce, 'value', True]).encode()\n"
        "    os.write(5, struct.pack('>I', len(data)) + data)\n"
        "def has_close_elements(numbers, threshold):\n    return True\n"
    ),
    "expected values from the stack": (
        "import sys\ndef has_close_elements(numbers, threshold):\n    frame, seen = sys._getframe(1), []\n"
        "    while frame:\n        seen += [c for c in frame.f_code.co_consts if isinstance(c, bool)]\n        frame = frame.f_back\n"
        "    return seen[0] if seen else True\n"
    ),
    "loop forever in the call": "def has_close_elements(numbers, threshold):\n    while True:\n        pass\n",
}


@pytest.fixture(scope="module")
def humaneval(shared_data: Path) -> dict:
    benchmark = get_benchmark("humaneval")
    return {"benchmark": benchmark, "problems": benchmark.load(shared_data, "test")}


def run_humaneval(sandbox: Sandbox, humaneval: dict, index: int, program_text: str):
    benchmark, problem = humaneval["benchmark"], humaneval["problems"][index]
    program = benchmark.program(problem, program_text)
    assert isinstance(program, CheckProgram) and problem.tests["test"] not in program.source
    return sandbox.run(program)


@pytest.mark.parametrize("trick", list(HAS_CLOSE))
def test_humaneval_tricks_do_not_pass(sandbox, humaneval, trick):
    assert_contained(sandbox, run_humaneval(sandbox, humaneval, 0, HAS_CLOSE[trick]))


def test_humaneval_helpers_come_from_the_prompt_and_the_gold_solution_passes(sandbox, humaneval):
    problem = humaneval["problems"][32]  # find_zero: check() evaluates the prompt's poly() on the answer
    assert sandbox.run(humaneval["benchmark"].program(problem, humaneval["benchmark"].reference(problem))).passed
    wrong_poly = problem.input.replace("return sum(", "return 0 * sum(") + "    return 0.0\n"
    assert not sandbox.run(humaneval["benchmark"].program(problem, wrong_poly)).passed


def test_what_one_serving_program_leaves_in_the_pipes_does_not_reach_the_next(sandbox, humaneval):
    gold = humaneval["benchmark"].reference(humaneval["problems"][0])
    junk = "import os\nos.write(5, b'\\x00\\x00\\x00\\x10garbage-garbage-')\ndef has_close_elements(numbers, threshold):\n    while True:\n        pass\n"
    assert_contained(sandbox, run_humaneval(sandbox, humaneval, 0, junk))
    assert run_humaneval(sandbox, humaneval, 0, gold).passed


def test_the_benchmark_data_and_the_harness_directories_are_unreadable(shared_data, tmp_path):
    if not AS_ROOT:
        pytest.skip("hiding directories needs root")
    storage = tmp_path / "storage"
    (storage / "rollouts").mkdir(parents=True)
    (storage / "rollouts" / "train.jsonl").write_text('{"expected": 42}\n')
    answers = shared_data / "mbpp" / "test.jsonl"
    with Sandbox(1, LIMITS, hidden=(shared_data, storage)) as box:
        for secret in (answers, storage / "rollouts" / "train.jsonl", Path.cwd() / "pyproject.toml"):
            if not secret.exists():
                continue
            result = box.run(AssertProgram(f"open({str(secret)!r}).read()\n"))
            assert result.status == "failed" and result.error_class == "FileNotFoundError", (secret, result)
        assert box.run(AssertProgram("import json, collections, math\nassert math.isclose(1.0, 1.0)\n")).passed
