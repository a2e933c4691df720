"""Experiment pipelines: each builds its model, data and objective and hands them to the Trainer.

`PIPELINES` maps `experiment.pipeline` to a function `(config, resume) -> TrainResult`; importing
this package fills it.
"""

from __future__ import annotations

import importlib
import logging

from weighted_mtp.config.schema import Config
from weighted_mtp.registry import PIPELINES

log = logging.getLogger(__name__)

# Each module registers its pipeline(s); modules that other areas have not written yet are skipped.
_MODULES = ("baseline", "critic", "verifiable", "rho1")

for _name in _MODULES:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{_name}":
            raise


def run_pipeline(config: Config, resume: bool = False) -> int:
    """Run the experiment's pipeline; the exit status for the CLI."""
    pipeline = PIPELINES.get(config.experiment.pipeline)
    result = pipeline(config, resume=resume)
    if result is not None:
        log.info("%s: %d steps, run directory %s", config.experiment.name, result.steps, result.run_dir)
    return 0


__all__ = ["PIPELINES", "run_pipeline"]
