"""Arguments shared by every subcommand that resolves a run configuration."""

from __future__ import annotations

import argparse

from weighted_mtp.config import ResolvedConfig, load_config


def add_config_arguments(parser: argparse.ArgumentParser, recipe_required: bool = False) -> None:
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", default="configs/defaults.yaml", help="environment YAML (default: %(default)s)")
    group.add_argument(
        "--recipe",
        required=recipe_required,
        help="experiment recipe: a YAML path or a name (baseline, critic, verifiable, rho1, ref_tuning)",
    )
    group.add_argument("--preset", help="named overlay: local-light, cpu-smollm2, a100x4")
    group.add_argument("--use-micro-model", action="store_true", help="use the micro model (seconds-long runs)")
    group.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. training.lr=1e-4 data.max_length=512"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def resolve(args: argparse.Namespace) -> ResolvedConfig:
    return load_config(
        defaults=args.config,
        recipe=args.recipe,
        preset=args.preset,
        overrides=args.overrides,
        use_micro_model=args.use_micro_model,
    )
