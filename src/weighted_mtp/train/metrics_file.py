"""`metrics.jsonl` in the run directory: one row per step and per validation, readable without
MLflow. A resumed run first trims the rows past its checkpoint, then appends, so the file holds
one row per step however often the run was killed."""

from __future__ import annotations

import json
from pathlib import Path

from weighted_mtp.io import atomic_write


class MetricsFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict[str, float]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def trim(self, last_step: int) -> None:
        """Drop rows past `last_step` (steps run after the last checkpoint, which the resumed run
        replays) and a last line cut short by a kill."""
        if not self.path.is_file():
            return
        kept, changed = [], False
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    row = json.loads(line) if line.endswith("\n") else None
                except json.JSONDecodeError:
                    row = None
                if row is None or row.get("step", 0) > last_step:
                    changed = True
                    continue
                kept.append(line)
        if changed:
            with atomic_write(self.path) as handle:
                handle.writelines(kept)
