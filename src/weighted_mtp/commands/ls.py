"""`wmtp ls`: what can be named on the command line, one line each (as torchtune's `tune ls`):
recipes and presets (from the config directory, with what each is for), named models, benchmarks
and datasets."""

from __future__ import annotations

import argparse
from pathlib import Path

CONFIG_DIR = Path("configs")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ls", help="list recipes, presets, named models, benchmarks and datasets")
    parser.add_argument("--config-dir", type=Path, default=CONFIG_DIR, help="where recipes and presets live")
    parser.set_defaults(func=run_ls)


def first_comment(path: Path) -> str:
    """What a config file says it is for: its opening comment, joined into one line."""
    words = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        words.append(line.lstrip("# ").strip())
    return " ".join(words)


def run_ls(args: argparse.Namespace) -> int:
    from weighted_mtp.data.sources import DATASETS
    from weighted_mtp.eval.benchmarks import BENCHMARKS
    from weighted_mtp.models.loading import MODEL_LOADERS

    sections = {
        "recipes (--recipe)": {
            p.name.removeprefix("recipe.").removesuffix(".yaml"): first_comment(p)
            for p in sorted(args.config_dir.glob("recipe.*.yaml"))
        },
        "presets (--preset)": {p.stem: first_comment(p) for p in sorted((args.config_dir / "presets").glob("*.yaml"))},
        "named models (model.name)": {name: (loader.__doc__ or "").strip().split("\n")[0] for name, loader in MODEL_LOADERS.items()},
        "benchmarks (wmtp eval --benchmark)": {name: (cls.__doc__ or "").strip().split("\n")[0] for name, cls in BENCHMARKS.items()},
        "datasets (data.dataset)": {
            name: "splits: " + (", ".join(cls.splits) or "those wmtp rollout wrote") for name, cls in DATASETS.items()
        },
    }
    for title, entries in sections.items():
        print(title)
        width = max((len(name) for name in entries), default=0)
        for name, about in entries.items():
            print(f"  {name:<{width}}  {about}".rstrip())
    return 0
