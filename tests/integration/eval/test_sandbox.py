"""The sandbox against real hostile programs: each is contained, reported as fail or timeout, leaves
no process behind, and the next program still runs."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from fixtures.sandbox import AS_ROOT, assert_contained

from weighted_mtp.eval.sandbox import AssertProgram, ExecutionResult, Limits, Sandbox, StdioProgram

LIMITS = Limits(timeout_s=1.0, wall_clock_factor=4.0, memory_mb=512, max_processes=32, output_limit_bytes=4096)
FAILING_TESTS = "\ndef add(a, b):\n    return a - b\nassert add(1, 2) == 3\n"


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(2, LIMITS) as box:
        yield box


def test_isolation_applied_as_root(sandbox: Sandbox) -> None:
    if not AS_ROOT:
        pytest.skip("full isolation needs root")
    assert {feature: reason for feature, reason in sandbox.applied.items() if reason is not None} == {}


def test_pass_fail_and_error_classes(sandbox: Sandbox) -> None:
    programs = [
        AssertProgram("def add(a, b):\n    return a + b\nassert add(1, 2) == 3\nprint('ran')"),
        AssertProgram(FAILING_TESTS),
        AssertProgram("def f(:\n"),
        AssertProgram("undefined_name\n"),
        AssertProgram("import heapq, collections, re, math\nassert heapq.nlargest(1, [3, 1]) == [3]"),
    ]
    results = sandbox.run_many(programs)
    assert [r.status for r in results] == ["passed", "failed", "failed", "failed", "passed"]
    assert [r.error_class for r in results] == [None, "AssertionError", "SyntaxError", "NameError", None]
    assert results[0].stdout == "ran\n"
    assert "NameError" in results[3].stderr


def test_verdicts_equal_running_each_program_alone(sandbox: Sandbox, tmp_path: Path) -> None:
    sources = [
        "assert sorted({3, 1, 2}) == [1, 2, 3]",
        FAILING_TESTS,
        "import sys\nprint('x', file=sys.stderr)\nassert len(sys.argv) == 1",
        "import os\nassert os.getcwd() == os.environ['HOME']",
        "raise ValueError('boom')",
        "open('f.txt', 'w').write('x')\nassert open('f.txt').read() == 'x'",
    ]
    alone = []
    for index, source in enumerate(sources):
        path = tmp_path / f"p{index}.py"
        path.write_text(source)
        workdir = tmp_path / f"w{index}"
        workdir.mkdir()
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "PYTHONHASHSEED": "0"}
        alone.append(subprocess.run([sys.executable, str(path)], cwd=workdir, env=env, capture_output=True).returncode == 0)
    assert [r.passed for r in sandbox.run_many([AssertProgram(s) for s in sources])] == alone == [
        True, False, True, True, False, True,
    ]


# ----------------------------------------------------------------------------- hostile programs


def test_fork_bomb(sandbox: Sandbox) -> None:
    source = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    assert_contained(sandbox, sandbox.run(AssertProgram(source)))


def test_memory_bomb(sandbox: Sandbox) -> None:
    result = sandbox.run(AssertProgram("blocks = []\nwhile True:\n    blocks.append(bytearray(50 << 20))\n"))
    assert result.error_class == "MemoryError"
    assert_contained(sandbox, result)


def test_infinite_loop(sandbox: Sandbox) -> None:
    result = sandbox.run(AssertProgram("while True:\n    pass\n"))
    assert result.status == "timeout" and result.error_class in ("CPUTimeLimit", "WallClockLimit")
    assert_contained(sandbox, result)


def test_busy_children_left_behind(sandbox: Sandbox) -> None:
    source = (
        "import os, time\n"
        "for _ in range(3):\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n"
        "        if os.fork() == 0:\n"
        "            print(os.getpid(), flush=True)\n"
        "            while True:\n"
        "                pass\n"
        "        os._exit(0)\n"
        "time.sleep(0.3)\n" + FAILING_TESTS
    )
    result = sandbox.run(AssertProgram(source))
    pids = [int(line) for line in result.stdout.split()]
    assert len(pids) == 3
    assert_contained(sandbox, result)
    for pid in pids:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] if Path(f"/proc/{pid}").exists() else "gone"
        assert state in ("gone", "Z")


def test_writing_and_deleting_outside_the_work_dir(sandbox: Sandbox, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    tmp_path.chmod(0o755)
    escape = f"/tmp/wmtp-escape-{uuid.uuid4().hex}"
    source = (
        "import os, shutil\n"
        "damage = []\n"
        f"open({escape!r}, 'w').write('x')\n"
        f"for action in (lambda: os.remove({str(victim)!r}), lambda: open({str(victim)!r}, 'w').write('gone'),\n"
        f"               lambda: shutil.rmtree({str(tmp_path)!r}), lambda: open('/etc/wmtp-escape', 'w')):\n"
        "    try:\n"
        "        action()\n"
        "        damage.append(action)\n"
        "    except OSError:\n"
        "        pass\n"
        "assert damage\n"
    )
    result = sandbox.run(AssertProgram(source))
    assert result.error_class == "AssertionError"
    assert victim.read_text() == "keep me"
    assert not Path(escape).exists() and not Path("/etc/wmtp-escape").exists()
    assert_contained(sandbox, result)


def test_harness_environment_is_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("WMTP_TEST_SECRET", secret)
    source = (
        "import os\n"
        "seen = [repr(dict(os.environ))]\n"
        "for pid in ['self', str(os.getppid()), *os.listdir('/proc')]:\n"
        "    for name in ('environ', 'cmdline'):\n"
        "        try:\n"
        "            seen.append(open(f'/proc/{pid}/{name}', 'rb').read().decode(errors='replace'))\n"
        "        except OSError:\n"
        "            pass\n"
        "blob = '\\n'.join(seen)\n"
        "print(blob)\n"
        "assert 'WMTP_TEST_SECRET' in blob\n"
    )
    with Sandbox(1, LIMITS) as box:
        result = box.run(AssertProgram(source))
        assert result.error_class == "AssertionError"
        assert secret not in result.stdout + result.stderr
        assert_contained(box, result)


def test_opening_a_socket(sandbox: Sandbox) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    connections = []

    def accept() -> None:
        try:
            connections.append(server.accept())
        except OSError:
            pass

    server.settimeout(5)
    listener = threading.Thread(target=accept, daemon=True)
    listener.start()
    source = (
        "import socket\n"
        f"connection = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "connection.sendall(b'leak')\n"
    )
    result = sandbox.run(AssertProgram(source))
    assert result.error_class == "PermissionError"
    for family in ("AF_INET6", "AF_PACKET", "AF_NETLINK"):
        probe = sandbox.run(AssertProgram(f"import socket\nsocket.socket(socket.{family}, socket.SOCK_RAW)"))
        assert probe.error_class == "PermissionError", (family, probe)
    listener.join(timeout=0.5)
    server.close()
    assert connections == []
    assert_contained(sandbox, result)


def test_killing_the_parent(sandbox: Sandbox) -> None:
    source = (
        "import os, signal\n"
        "for target in (lambda: os.kill(os.getppid(), signal.SIGKILL), lambda: os.kill(-1, signal.SIGKILL),\n"
        "               lambda: os.killpg(os.getpgid(os.getppid()), signal.SIGKILL), lambda: os.kill(1, signal.SIGKILL)):\n"
        "    try:\n"
        "        target()\n"
        "    except OSError:\n"
        "        pass\n" + FAILING_TESTS
    )
    workers = sandbox.worker_pids
    result = sandbox.run(AssertProgram(source))
    assert result.error_class == "AssertionError"
    assert sandbox.worker_pids == workers
    assert_contained(sandbox, result)


def test_huge_output(sandbox: Sandbox) -> None:
    result = sandbox.run(AssertProgram("import sys\nsys.stdout.write('x' * (64 << 20))\n" + FAILING_TESTS))
    assert result.error_class == "AssertionError"
    assert len(result.stdout) == LIMITS.output_limit_bytes
    endless = sandbox.run(AssertProgram("while True:\n    print('y' * 10000)\n"))
    assert endless.status == "timeout" and len(endless.stdout) <= LIMITS.output_limit_bytes
    assert_contained(sandbox, endless)


EXIT_TRICKS = {
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
    "os._exit(0)": "import os\nos._exit(0)\n",
    "raise SystemExit": "raise SystemExit\n",
    "exit()": "exit()\n",
    "SIGTERM to itself": "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n",
    "atexit os._exit(0)": "import atexit, os\natexit.register(lambda: os._exit(0))\n",
    "rewrite AssertionError": "import builtins\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\n",
    "rewrite builtins": "import builtins\nbuiltins.__import__ = None\nbuiltins.print = None\nbuiltins.Exception = object\n",
    "patch os._exit and os.write": "import os\nos._exit = lambda code: None\nos.write = lambda fd, data: len(data)\n",
    "close the streams": "import sys, os\nsys.stdout.close()\nsys.stderr.close()\nos.close(1)\nos.close(2)\n",
    "forge a verdict": "import os\nfor fd in range(3, 10):\n    try:\n        os.write(fd, os.urandom(16).hex().encode())\n    except OSError:\n        pass\n",
    "thread exits first": "import os, threading\nthreading.Thread(target=os._exit, args=(0,)).start()\nimport time\ntime.sleep(0.5)\n",
}


@pytest.mark.parametrize("trick", list(EXIT_TRICKS))
def test_exit_zero_tricks_do_not_pass(sandbox: Sandbox, trick: str) -> None:
    result = sandbox.run(AssertProgram(EXIT_TRICKS[trick] + FAILING_TESTS))
    assert result.status == "failed", result


def test_worker_death_is_survived(sandbox: Sandbox) -> None:
    results: list[ExecutionResult] = []
    runner = threading.Thread(target=lambda: results.append(sandbox.run(AssertProgram("import time\ntime.sleep(3)"))))
    workers_before = sandbox.worker_pids
    runner.start()
    deadline = time.monotonic() + 10
    while (busy := next((pid for pid in workers_before if _has_child(pid)), None)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(busy, signal.SIGKILL)
    runner.join()
    assert results[0].error_class == "SandboxError"
    assert busy not in sandbox.worker_pids and len(sandbox.worker_pids) == 2
    assert_contained(sandbox, results[0])


def _has_child(pid: int) -> bool:
    try:
        return bool(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    except OSError:
        return False


# ----------------------------------------------------------------------------- stdin/stdout


def test_stdio_cases(sandbox: Sandbox) -> None:
    doubler = "n = int(input())\nprint(n * 2)\n"
    cases = (("3\n", "6\n"), ("5", "  10  \n\n"), ("1 2", "ignored"))
    result = sandbox.run(StdioProgram(doubler, cases[:2]))
    assert result.passed and result.cases_passed == 2
    wrong = sandbox.run(StdioProgram("print(int(input()) + 1)", cases[:2]))
    assert (wrong.error_class, wrong.cases_passed, wrong.extra["failed_case"]) == ("WrongAnswer", 0, 0)
    crash = sandbox.run(StdioProgram(doubler, cases))
    assert (crash.error_class, crash.cases_passed) == ("ValueError", 2)
    early_exit = sandbox.run(StdioProgram("import sys\nprint(sum(map(int, sys.stdin.read().split())))\nsys.exit(0)", (("1 2\n3", "6"),)))
    assert early_exit.passed
    slow = sandbox.run(StdioProgram("while True:\n    pass", (("", ""),), timeout_s=1.0))
    assert slow.status == "timeout", slow
    flood = sandbox.run(StdioProgram("print('1' * 100000)", (("", "1"),)))
    assert flood.error_class == "OutputLimitExceeded"


def test_unavailable_isolation_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="weighted_mtp.eval.sandbox")
    for _ in range(2):
        with Sandbox(1, LIMITS, unprivileged_user=False, isolate_network=False, private_tmp=False) as box:
            assert box.run(AssertProgram("assert True")).passed
            assert box.applied["network namespace"] == "disabled"
    messages = [r.getMessage() for r in caplog.records if "network namespace not applied" in r.getMessage()]
    assert len(messages) == 1
