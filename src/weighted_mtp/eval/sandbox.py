"""Run untrusted generated programs against their tests, fast and contained.

Two kinds of test: an `AssertProgram` (MBPP, HumanEval: the program text ends with its asserts; it
passes when they all complete) and a `StdioProgram` (CodeContests: each input is fed on stdin and the
output compared token by token, as CodeContests' own checker does).

Design: each worker is a fork server (`sandbox_worker.py`), a fresh interpreter that has imported
only the standard library, set up the shared isolation once, and forks one child per program. The
child runs as the worker's own unprivileged uid (as root), with CPU, memory, file-size and process
limits, in a fresh directory with a clean environment. A pass is decided from what the tests did: the
child writes a per-program random nonce to a private pipe only after the whole program, asserts
included, ran to the end, so `sys.exit(0)`, `os._exit(0)` or a crash before the asserts is a fail.
See docs/evaluation.md for the threat model.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import pwd
import queue
import re
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from weighted_mtp.eval import sandbox_worker

log = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).with_name("sandbox_worker.py")
WORKER_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
# Workers run programs as uids from this range, one uid per live worker (held by a lock file), so a
# worker can kill every process its program left behind without touching anyone else's.
UID_RANGE = range(64000, 65000)
UID_LOCK_DIR = Path(tempfile.gettempdir()) / "weighted-mtp-sandbox-uids"
CHILD_SETUP_FAILED = 125
SPECIAL_SIGNALS = {signal.SIGXFSZ: "FileSizeLimit"}
HARNESS_GRACE_S = 30.0

_already_logged: set[str] = set()


@dataclass(frozen=True)
class Limits:
    """`timeout_s` is the program's CPU-time budget (whole seconds, rounded up; as judges count it,
    so a loaded machine does not turn a correct program into a timeout); the wall clock allows
    `wall_clock_factor` times as much, which catches programs that sleep or block."""

    timeout_s: float = 10.0
    wall_clock_factor: float = 3.0
    memory_mb: int = 2048
    file_size_mb: int = 16
    max_processes: int = 64
    output_limit_bytes: int = 64 * 1024
    scratch_mb: int = 256


@dataclass(frozen=True)
class AssertProgram:
    """A program whose text ends with its tests; it passes when every statement ran to the end."""

    source: str
    timeout_s: float | None = None


@dataclass(frozen=True)
class StdioProgram:
    """A program fed each case's input on stdin; it passes when every output matches."""

    source: str
    cases: tuple[tuple[str, str], ...]
    timeout_s: float | None = None


@dataclass(frozen=True)
class CallProgram:
    """A program the harness judges: the sandbox runs `source`, then evaluates each of `calls` (an
    expression over the program's names, e.g. `area(2.0)`) and sends its value back as plain data;
    `checks` (the tests, with call i's value as `_call_i`) are evaluated here (`eval/judge.py`)."""

    source: str
    calls: tuple[str, ...]
    checks: tuple[str, ...]
    timeout_s: float | None = None


@dataclass(frozen=True)
class CheckProgram:
    """A program whose function the harness's test calls (HumanEval): the sandbox runs `source` and
    then serves calls of `entry_point`; `check(candidate)` from `test` runs here, after `prompt` (the
    benchmark's own helpers), with `candidate` sending each call to the sandbox (`eval/judge.py`)."""

    source: str
    prompt: str
    test: str
    entry_point: str
    timeout_s: float | None = None


Program = AssertProgram | StdioProgram | CallProgram | CheckProgram
Status = Literal["passed", "failed", "timeout"]


@dataclass
class ExecutionResult:
    status: Status
    error_class: str | None = None
    error_message: str = ""
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0
    cpu_s: float = 0.0
    cases_passed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


_INTEGER = re.compile(r"[+-]?\d+")
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
FLOAT_TOLERANCE = 1e-5


def outputs_match(output: str, expected: str) -> bool:
    """CodeContests' checker (`OutputsMatch` in deepmind/code_contests): the outputs split at
    whitespace into the same number of tokens, compared case-insensitively; two numbers where either
    is not an integer match within an absolute 1e-5, integers exactly (the reference compares them
    as doubles too, which lets integers beyond 2**53 that differ match)."""
    got, want = output.lower().split(), expected.lower().split()
    return len(got) == len(want) and all(_tokens_match(a, b) for a, b in zip(got, want))


def _tokens_match(a: str, b: str) -> bool:
    if a == b:
        return True
    if _INTEGER.fullmatch(a) and _INTEGER.fullmatch(b):
        return int(a) == int(b)
    if _DECIMAL.fullmatch(a) and _DECIMAL.fullmatch(b):
        return abs(float(a) - float(b)) < FLOAT_TOLERANCE
    return False


class SandboxError(RuntimeError):
    """The sandbox itself could not start (not caused by a program)."""


class Sandbox:
    """A pool of fork-server workers. Use as a context manager, or call `close()`."""

    def __init__(
        self,
        workers: int | None = None,
        limits: Limits = Limits(),
        *,
        unprivileged_user: bool = True,
        isolate_network: bool = True,
        private_tmp: bool = True,
        hidden: Sequence[str | Path] = (),
    ) -> None:
        """`hidden`: directories programs must not read (the benchmark data with the tests' expected
        values, run storage), besides the harness's working directory and home, always hidden."""
        self.limits = limits
        hide = [os.getcwd(), str(Path.home()), *(str(Path(p).resolve()) for p in hidden)]
        self._options = dict(
            unprivileged_user=unprivileged_user, isolate_network=isolate_network, private_tmp=private_tmp, hidden=hide
        )
        n_workers = workers or len(os.sched_getaffinity(0))
        self._workers = [_Worker(self.limits, **self._options) for _ in range(n_workers)]
        self._idle: queue.Queue[_Worker] = queue.Queue()
        try:
            for worker in self._workers:
                worker.start()
                self._idle.put(worker)
        except BaseException:
            self.close()
            raise
        self.applied = self._workers[0].applied
        for feature, reason in self.applied.items():
            if reason is not None:
                _log_once(f"sandbox: {feature} not applied ({reason})")

    @property
    def n_workers(self) -> int:
        return len(self._workers)

    @property
    def worker_uids(self) -> list[int]:
        """The uids programs run as (empty when not running as root)."""
        return [w.uid for w in self._workers if w.uid is not None]

    @property
    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process is not None]

    def run(self, program: Program) -> ExecutionResult:
        worker = self._idle.get()
        try:
            return _run_on(worker, program, self.limits)
        finally:
            self._idle.put(worker)

    def run_many(
        self, programs: Sequence[Program], on_result: Callable[[int, ExecutionResult], None] | None = None
    ) -> list[ExecutionResult]:
        """Run programs in parallel; results come back in input order, `on_result` as each finishes."""
        results: list[ExecutionResult | None] = [None] * len(programs)
        lock = threading.Lock()

        def task(index: int) -> None:
            result = self.run(programs[index])
            results[index] = result
            if on_result is not None:
                with lock:
                    on_result(index, result)

        with ThreadPoolExecutor(max_workers=self.n_workers) as pool:
            for future in [pool.submit(task, i) for i in range(len(programs))]:
                future.result()
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_programs(programs: Iterable[Program], workers: int | None = None, limits: Limits = Limits()) -> list[ExecutionResult]:
    with Sandbox(workers, limits) as sandbox:
        return sandbox.run_many(list(programs))


# ----------------------------------------------------------------------------- verdicts


def _run_on(worker: _Worker, program: Program, limits: Limits) -> ExecutionResult:
    timeout = program.timeout_s or limits.timeout_s
    if isinstance(program, AssertProgram):
        return _assert_verdict(worker.execute(program.source, None, timeout, limits.output_limit_bytes))
    if isinstance(program, CallProgram):
        reply = worker.execute(program.source, None, timeout, limits.output_limit_bytes, calls=list(program.calls))
        return _call_verdict(reply, program)
    if isinstance(program, CheckProgram):
        return _check_verdict(worker, program, timeout, limits)
    duration = 0.0
    for index, (case_input, expected) in enumerate(program.cases):
        output_limit = max(limits.output_limit_bytes, 2 * len(expected.encode()) + 4096)
        reply = worker.execute(program.source, case_input, timeout, output_limit)
        result = _stdio_verdict(reply, expected)
        duration += result.duration_s
        result.duration_s, result.cases_passed = duration, index + (result.passed)
        if not result.passed:
            result.extra["failed_case"] = index
            return result
    return ExecutionResult("passed", duration_s=duration, cases_passed=len(program.cases), exit_code=0)


def _base_result(reply: dict) -> ExecutionResult | None:
    """The verdict when the run went wrong whatever the test kind, else None."""
    if "sandbox_error" in reply:
        return ExecutionResult("failed", "SandboxError", reply["sandbox_error"])
    fields = dict(
        exit_code=reply["exit_code"], stdout=reply["stdout"], stderr=reply["stderr"], duration_s=reply["duration_s"],
        cpu_s=reply["cpu_s"],
    )
    if reply["timed_out"]:
        return ExecutionResult("timeout", "WallClockLimit", "wall-clock limit reached", **fields)
    error, code = reply["error"], reply["exit_code"]
    if error is not None and (code != 0 or not reply["tests_completed"]):
        return ExecutionResult("failed", error["type"], error["message"], **fields)
    if code == -signal.SIGXCPU or (code == -signal.SIGKILL and reply["cpu_s"] >= reply["cpu_time_s"]):
        return ExecutionResult("timeout", "CPUTimeLimit", "CPU-time limit reached", **fields)
    if code < 0:
        sig = signal.Signals(-code)
        return ExecutionResult("failed", SPECIAL_SIGNALS.get(sig, f"Killed:{sig.name}"), "", **fields)
    if code == CHILD_SETUP_FAILED and not reply["tests_completed"]:
        return ExecutionResult("failed", "SandboxSetupFailed", "", **fields)
    if code != 0:
        return ExecutionResult("failed", "NonZeroExit", f"exit status {code}", **fields)
    return None


def _assert_verdict(reply: dict) -> ExecutionResult:
    failed = _base_result(reply)
    if failed is not None:
        return failed
    result = ExecutionResult(
        "passed", None, "", reply["exit_code"], reply["stdout"], reply["stderr"], reply["duration_s"], reply["cpu_s"]
    )
    if not reply["tests_completed"]:
        result.status, result.error_class = "failed", "ExitedBeforeTestsCompleted"
        result.error_message = "the process ended with status 0 before its tests ran to the end"
    return result


def decode_plain(value: Any) -> Any:
    """The builtin value a program's child encoded (JSON with tagged containers); anything else is an
    error: what comes back from a program is data, never an object with its own methods."""
    return sandbox_worker.from_plain(value)


def _call_verdict(reply: dict, program: CallProgram) -> ExecutionResult:
    """The program ran in the sandbox; its calls' values are judged here by the tests' checks."""
    from weighted_mtp.eval.judge import judge

    result = _assert_verdict(reply)
    if not result.passed:
        return result
    if reply.get("call_results_truncated"):
        result.status, result.error_class = "failed", "OutputLimitExceeded"
        result.error_message = "the calls' values exceed the output limit"
        return result
    values = {}
    try:
        raw = json.loads(reply["call_results"])
        if len(raw) != len(program.calls):
            raise ValueError(f"{len(raw)} values for {len(program.calls)} calls")
        for index, (kind, value) in enumerate(raw):
            if kind != "value":  # the test would have raised there, or the value is not data
                result.status = "failed"
                result.error_class = "NotPlainData" if kind == "not plain data" else str(value)[:100]
                result.error_message = f"{program.calls[index]}: {kind} ({value})"[:300]
                return result
            values[f"_call_{index}"] = decode_plain(value)
    except (ValueError, TypeError, KeyError) as exc:
        result.status, result.error_class, result.error_message = "failed", "NotPlainData", str(exc)[:300]
        return result
    passed, message = judge(program.checks, values)
    if not passed:
        result.status, result.error_class, result.error_message = "failed", "AssertionError", message
    return result


def _check_verdict(worker: _Worker, program: CheckProgram, timeout: float, limits: Limits) -> ExecutionResult:
    """Run the program serving its entry point, run the test's `check` here against it, then the
    program's own verdict (it ran to the end, no crash, no timeout) and the check's together."""
    from weighted_mtp.eval.judge import judge_check

    judged: list[tuple[bool, str]] = []

    def conversation(candidate: Callable[..., Any]) -> None:
        judged.append(judge_check(program.prompt, program.test, program.entry_point, candidate))

    reply = worker.execute(
        program.source, None, timeout, limits.output_limit_bytes, serve=program.entry_point, conversation=conversation
    )
    result = _assert_verdict(reply)
    if result.passed and not (judged and judged[0][0]):
        result.status, result.error_class = "failed", "AssertionError"
        result.error_message = judged[0][1] if judged else "the check did not run"
    return result


class ProgramEnded(Exception):
    """The serving program ended (or was killed) while the harness waited for an answer."""


def _stdio_verdict(reply: dict, expected: str) -> ExecutionResult:
    failed = _base_result(reply)
    if failed is not None:
        return failed
    result = ExecutionResult("passed", None, "", 0, reply["stdout"], reply["stderr"], reply["duration_s"], reply["cpu_s"])
    if reply["stdout_truncated"]:
        result.status, result.error_class = "failed", "OutputLimitExceeded"
    elif not outputs_match(reply["stdout"], expected):
        result.status, result.error_class = "failed", "WrongAnswer"
    return result


# ----------------------------------------------------------------------------- workers


class _Worker:
    """Harness side of one fork server: starts it, talks to it, restarts it if it dies."""

    def __init__(
        self, limits: Limits, *, unprivileged_user: bool, isolate_network: bool, private_tmp: bool, hidden: list[str]
    ) -> None:
        self.limits = limits
        self.isolate_network, self.private_tmp, self.hidden = isolate_network, private_tmp, hidden
        self.uid: int | None = None
        self._uid_lock: int | None = None
        if unprivileged_user and os.geteuid() == 0:
            self.uid, self._uid_lock = _claim_uid()
        self.process: subprocess.Popen | None = None
        self.applied: dict[str, str | None] = {}

    def start(self) -> None:
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        calls_r, calls_w = os.pipe()
        results_r, results_w = os.pipe()
        os.set_blocking(results_r, False)
        os.set_blocking(calls_w, False)
        worker_fds = (request_r, reply_w, calls_r, results_w)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-s", "-P", str(WORKER_SCRIPT), *map(str, worker_fds)],
                pass_fds=worker_fds,
                env=WORKER_ENV,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            for fd in worker_fds:
                os.close(fd)
        self._request, self._reply = request_w, reply_r
        self._calls, self._results = calls_w, results_r
        settings = {
            "uid": self.uid,
            "isolate_network": self.isolate_network,
            "private_tmp": self.private_tmp,
            "scratch_mb": self.limits.scratch_mb,
            "hidden": self.hidden,
        }
        self._send(settings)
        hello = self._receive(deadline=HARNESS_GRACE_S)
        if hello is None:
            self.stop()
            raise SandboxError("the sandbox worker did not start (see its messages above)")
        self.applied = hello["applied"]

    def execute(
        self,
        source: str,
        stdin: str | None,
        timeout_s: float,
        output_limit: int,
        calls: list[str] | None = None,
        serve: str | None = None,
        conversation: Callable[[Callable[..., Any]], None] | None = None,
    ) -> dict:
        """Run one program; its reply. With `serve`, the program's function of that name is called by
        `conversation(candidate)` while the program waits (`candidate(*args)` returns plain data)."""
        limits = {
            "memory_mb": self.limits.memory_mb,
            "file_size_mb": self.limits.file_size_mb,
            "max_processes": self.limits.max_processes,
            "output_limit_bytes": output_limit,
        }
        wall_time_s = timeout_s * self.limits.wall_clock_factor
        nonce = os.urandom(16).hex()
        request = {
            "source": source, "stdin": stdin, "calls": calls, "serve": serve, "nonce": nonce,
            "cpu_time_s": timeout_s, "wall_time_s": wall_time_s, "limits": limits,
        }
        try:
            if serve is not None:
                self._drain_results()
            self._send(request)
            if serve is not None and conversation is not None:
                self._converse(serve, nonce, conversation, time.monotonic() + wall_time_s, output_limit)
            reply = self._receive(deadline=wall_time_s + HARNESS_GRACE_S)
        except OSError as exc:
            reply, why = None, str(exc)
        else:
            why = "no reply"
        if reply is None:
            log.warning("sandbox worker died or hung (%s); restarting it", why)
            self.stop(release_uid=False, kill=True)
            self.start()
            return {"sandbox_error": f"the sandbox worker died while running this program ({why})"}
        reply["cpu_time_s"] = max(1, math.ceil(timeout_s))
        return reply

    def _converse(
        self, name: str, nonce: str, conversation: Callable[[Callable[..., Any]], None], deadline: float, limit: int
    ) -> None:
        """Let `conversation` call the program's `name`, then tell the program it is done."""

        def candidate(*args: Any, **kwargs: Any) -> Any:
            self._send_call([nonce, name, sandbox_worker.to_plain(args), sandbox_worker.to_plain(kwargs)], deadline)
            answer = self._read_answer(nonce, deadline, limit)
            kind, value = answer[1], answer[2]
            if kind != "value":
                raise AssertionError(f"{name}(...): {kind} ({value})")
            return decode_plain(value)

        try:
            conversation(candidate)
        finally:
            with contextlib.suppress(OSError, ProgramEnded):
                self._send_call([nonce, None, None, None], deadline)

    def _read_answer(self, nonce: str, deadline: float, limit: int) -> list:
        """The next answer of this program; ProgramEnded when it ended first (the worker replied)."""
        while True:
            header = self._read_results(4, deadline)
            (size,) = struct.unpack(">I", header)
            if size > limit + 4096:
                raise ProgramEnded(f"an answer of {size} bytes exceeds the output limit")
            answer = json.loads(self._read_results(size, deadline))
            if isinstance(answer, list) and len(answer) == 3 and answer[0] == nonce:
                return answer

    def _read_results(self, n: int, deadline: float) -> bytes:
        chunks, remaining = [], n
        while remaining:
            timeout = deadline - time.monotonic()
            ready, _, _ = select.select([self._results, self._reply], [], [], max(timeout, 0))
            if self._results in ready:
                try:
                    chunk = os.read(self._results, remaining)
                except BlockingIOError:
                    continue
                chunks.append(chunk)
                remaining -= len(chunk)
            elif self._reply in ready or timeout <= 0:
                raise ProgramEnded("the program ended before it answered")
        return b"".join(chunks)

    def _drain_results(self) -> None:
        """Drop whatever an earlier program left in the results pipe (all its processes are gone)."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._results, 1 << 16):
                pass

    def _send_call(self, obj: Any, deadline: float) -> None:
        """One frame to the program's calls pipe, without blocking past the deadline or the program."""
        data = json.dumps(obj).encode()
        data = struct.pack(">I", len(data)) + data
        while data:
            timeout = deadline - time.monotonic()
            readable, writable, _ = select.select([self._reply], [self._calls], [], max(timeout, 0))
            if writable:
                with contextlib.suppress(BlockingIOError):
                    data = data[os.write(self._calls, data) :]
            elif readable or timeout <= 0:
                raise ProgramEnded("the program ended before it took the call")

    def _send(self, obj: dict) -> None:
        data = json.dumps(obj).encode()
        data = struct.pack(">I", len(data)) + data
        while data:
            data = data[os.write(self._request, data) :]

    def _receive(self, deadline: float) -> dict | None:
        header = self._read_exactly(4, deadline)
        if header is None:
            return None
        body = self._read_exactly(struct.unpack(">I", header)[0], deadline)
        return None if body is None else json.loads(body)

    def _read_exactly(self, n: int, timeout: float) -> bytes | None:
        chunks, remaining = [], n
        while remaining:
            ready, _, _ = select.select([self._reply], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self._reply, min(remaining, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def stop(self, release_uid: bool = True, kill: bool = False) -> None:
        if self.process is not None:
            for fd in (self._request, self._reply, self._calls, self._results):
                try:
                    os.close(fd)
                except OSError:
                    pass
            if kill:
                self.process.kill()
            try:
                self.process.wait(timeout=HARNESS_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        if release_uid and self._uid_lock is not None:
            os.close(self._uid_lock)
            self._uid_lock = None


def _claim_uid() -> tuple[int, int]:
    """Take a uid from UID_RANGE that has no account and no other live worker (across processes)."""
    UID_LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
    for uid in UID_RANGE:
        try:
            pwd.getpwuid(uid)
            continue
        except KeyError:
            pass
        fd = os.open(UID_LOCK_DIR / str(uid), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return uid, fd
        except BlockingIOError:
            os.close(fd)
    raise SandboxError(f"every sandbox uid in {UID_RANGE.start}-{UID_RANGE.stop - 1} is in use")


def _log_once(message: str) -> None:
    if message not in _already_logged:
        _already_logged.add(message)
        log.warning(message)
