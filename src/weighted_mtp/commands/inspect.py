"""`wmtp inspect weights`: see what a run's objective weighs, token by token (see `eval.weight_page`).

  wmtp inspect weights --run storage/runs/verifiable --split validation --limit 16
  wmtp inspect weights --run storage/runs/critic --shade value      # a critic trains no LM head
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from weighted_mtp.eval.weight_page import SHADINGS

    parser = subparsers.add_parser("inspect", help="look inside a finished run (its token weights)")
    actions = parser.add_subparsers(dest="action", metavar="WHAT", required=True)
    weights = actions.add_parser("weights", help="an HTML page of held-out solutions shaded by token weight")
    weights.add_argument("--run", type=Path, required=True, help="a `wmtp train` run directory (with final/)")
    weights.add_argument("--split", default="validation", help="the dataset split to show (default: %(default)s)")
    weights.add_argument("--limit", type=int, default=16, help="solutions to show (default: %(default)s)")
    weights.add_argument("--shade", default="weight", choices=SHADINGS, help="what the colour shows (default: %(default)s)")
    weights.add_argument("--head", type=int, default=1, help="whose weight shades the tokens (default: %(default)s)")
    weights.add_argument("--out", type=Path, help="default: <run>/weights-<split>.html")
    weights.add_argument("--device", default="cpu")
    weights.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from weighted_mtp.eval.weight_page import write_weight_page

    out = write_weight_page(args.run, split=args.split, limit=args.limit, shading=args.shade, head=args.head,
                            out=args.out, device=args.device)
    print(f"wrote {out}")
    return 0
