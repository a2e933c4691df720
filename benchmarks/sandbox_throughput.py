"""MBPP gold programs per second: the sandbox's fork-server workers vs a plain interpreter per program.

Both sides run the same problems with the same number of parallel workers. The sandbox runs the
setup and gold code, evaluates the asserts' calls and judges them in the harness (`eval/judge.py`);
the plain side starts `python program.py` (setup + gold code + asserts) in a fresh temporary
directory for each, as a minimal harness would. Prints programs/s side by side and whether every verdict agrees.

    .venv/bin/python benchmarks/sandbox_throughput.py --split test --workers 2
"""

from __future__ import annotations

import argparse
import os
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw-data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    parser.add_argument("--split", default="test")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--limit", type=int, help="first N problems only")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3, help="sandbox passes (the best is reported)")
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

    disagree = [benchmark.task_id(p) for p, a, b in zip(problems, sandbox_verdicts, plain_verdicts) if a != b]
    print(f"{'':24}{'programs/s':>12}{'passed':>10}")
    print(f"{'plain interpreter':24}{n / plain_s:12.1f}{sum(plain_verdicts):>10}")
    print(f"{'sandbox (fork server)':24}{n / best:12.1f}{sum(sandbox_verdicts):>10}")
    print(f"speed-up: {plain_s / best:.1f}x; verdicts identical: {not disagree}" + (f" (differ: {disagree})" if disagree else ""))


if __name__ == "__main__":
    main()
