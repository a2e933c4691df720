"""Peak memory of sampling 1% of a large processed split through its index vs loading the whole file.

Writes a processed split of at least --size-gb (default 1 GB) in a temporary directory with
`write_processed_split`, then runs each way of sampling in a fresh Python subprocess and reads
that process's peak resident set size (ru_maxrss):

- index: open the metadata index (memory-mapped rows), choose 1% of the lines with a sampler,
  read just those lines by byte offset;
- full:  json-parse every line of the file into a list, then choose 1% of them.

The target is index <= 5% of full. Usage: python benchmarks/data_index_memory.py [--size-gb 1.0]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLE_FRACTION = 0.01
TARGET_RATIO = 0.05


class WhitespaceTokenizer:
    """Token lengths only need to exist here; a word count keeps generation fast."""

    vocab_size = 1

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        return [0] * len(text.split())


def generate(directory: Path, size_bytes: int, seed: int = 0) -> Path:
    from weighted_mtp.data.prepare import write_processed_split
    from weighted_mtp.data.sources import Problem

    rng = random.Random(seed)
    words = [f"w{i}" for i in range(5000)] + ["for", "in", "range", "if", "else", "return", "print", "=", "+"]
    line_overhead = 120  # JSON keys, problem id, tests_ref: an underestimate, so the file is never short

    def problems():
        """CodeContests-like: ~2 KB statements, 1-3 KB programs, 4-40 solutions a problem, until size_bytes."""
        written, p = 0, 0
        while written < size_bytes:
            statement = " ".join(rng.choices(words, k=330))
            programs = [" ".join(rng.choices(words, k=rng.randint(150, 500))) for _ in range(rng.randint(4, 40))]
            cut = rng.randint(1, len(programs) - 1)
            written += sum(len(statement) + len(program) + line_overhead for program in programs)
            yield Problem(f"bench/{p}", statement, difficulty=rng.randint(0, 12),
                          correct=programs[:cut], incorrect=programs[cut:])
            p += 1

    index = write_processed_split(problems(), directory, "train", WhitespaceTokenizer(), dataset="bench")
    return index.paths.jsonl


INDEX_CHILD = """
import json, resource, sys
from weighted_mtp.data.index import SplitIndex
from weighted_mtp.data.samplers import select
index = SplitIndex(sys.argv[1], "train")
lines = select(index, "all", seed=0, n_samples=max(1, int(len(index) * {fraction})))[:, 0]
sample = index.read(lines)
print(json.dumps({{"peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "n": len(sample)}}))
"""

FULL_CHILD = """
import json, random, resource, sys
with open(sys.argv[1], encoding="utf-8") as handle:
    records = [json.loads(line) for line in handle]
sample = random.Random(0).sample(records, max(1, int(len(records) * {fraction})))
print(json.dumps({{"peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "n": len(sample)}}))
"""


def run_child(code: str, argument: str) -> dict:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code.format(fraction=SAMPLE_FRACTION), argument],
        check=True, capture_output=True, text=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["seconds"] = time.perf_counter() - start
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="size of the generated JSONL, at least this (1 GB = 1e9 bytes)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wmtp-index-bench-") as tmp:
        start = time.perf_counter()
        jsonl = generate(Path(tmp), int(args.size_gb * 1e9))
        lines = sum(1 for _ in open(jsonl, "rb"))
        print(f"generated {jsonl.stat().st_size / 1e9:.2f} GB, {lines} lines in {time.perf_counter() - start:.0f} s")
        via_index = run_child(INDEX_CHILD, str(jsonl.parent))
        whole = run_child(FULL_CHILD, str(jsonl))
    ratio = via_index["peak_rss_kb"] / whole["peak_rss_kb"]
    print(f"{'method':<28}{'peak RSS':>12}{'sampled':>10}{'seconds':>10}")
    print(f"{'index + read by offset':<28}{via_index['peak_rss_kb'] / 1024:>9.1f} MB{via_index['n']:>10}"
          f"{via_index['seconds']:>10.1f}")
    print(f"{'load whole file':<28}{whole['peak_rss_kb'] / 1024:>9.1f} MB{whole['n']:>10}{whole['seconds']:>10.1f}")
    verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
    print(f"ratio index/full: {ratio:.2%} ({verdict} the {TARGET_RATIO:.0%} target)")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
