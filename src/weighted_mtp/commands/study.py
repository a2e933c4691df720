"""`wmtp study`: run the study's cells, show which are done, write docs/RESULTS.md (see `weighted_mtp.study`).

  wmtp study run --scale cpu --max-hours 2.5     # finishes cells in order; run again to continue
  wmtp study run --scale cpu --only rollout      # only the cells whose name contains "rollout"
  wmtp study status --scale cpu
  wmtp study report --scale cpu --out docs/RESULTS.md
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from weighted_mtp.study import SCALES

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--scale", default="cpu", choices=sorted(SCALES), help="default: %(default)s")
    common.add_argument("--root", type=Path, help="where runs and rollouts go (default: <paths.storage>/study/<scale>)")
    common.add_argument(
        "--results", type=Path, help="where each finished cell writes its JSON (default: docs/results/<scale>)"
    )
    common.add_argument("--config", default="configs/defaults.yaml", help="environment YAML (default: %(default)s)")
    common.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides for every cell")
    common.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    parser = subparsers.add_parser("study", help="the resumable study behind docs/RESULTS.md")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    run_parser = actions.add_parser("run", parents=[common], help="finish the unfinished cells, in order")
    run_parser.add_argument("--only", help="run only the cells whose name contains this")
    run_parser.add_argument("--max-hours", type=float, help="start no new cell after this many hours")
    actions.add_parser("status", parents=[common], help="which cells are done")
    report = actions.add_parser("report", parents=[common], help="write docs/RESULTS.md from the finished cells")
    report.add_argument("--out", type=Path, default=Path("docs/RESULTS.md"), help="default: %(default)s")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from weighted_mtp.errors import ConfigError
    from weighted_mtp.io import atomic_write_text
    from weighted_mtp.study import Study, render_results, status_lines, write_plots

    if args.action == "run" and args.max_hours is not None and args.max_hours <= 0:
        raise ConfigError(f"--max-hours must be positive, got {args.max_hours}")
    results = args.results or Path("docs") / "results" / args.scale
    study = Study(args.scale, args.root, results=results, defaults=args.config, overrides=args.overrides)
    if args.action == "run":
        finished = study.run(only=args.only, max_hours=args.max_hours)
        print(f"finished {len(finished)} cells this run: {', '.join(finished) or 'none'}")
    elif args.action == "status":
        print("\n".join(status_lines(study)))
    else:
        plots = write_plots(study)
        atomic_write_text(args.out, render_results(study, plots, relative_to=args.out.parent) + "\n")
        print(f"wrote {args.out}")
    return 0
