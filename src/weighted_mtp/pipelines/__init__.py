"""Experiment pipelines. A pipeline says only what differs between experiments: its objective.

`PIPELINES` maps `experiment.pipeline` to an objective factory `(config, model, tokenizer, env) ->
Objective`; `train_with_objective` does everything else the same way for every experiment. Importing
this package fills the registry.
"""

from __future__ import annotations

import importlib
import logging

from weighted_mtp.config.schema import Config
from weighted_mtp.pipelines.common import ObjectiveFactory, train_with_objective
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


def objective_factory(pipeline: str) -> ObjectiveFactory:
    return PIPELINES.get(pipeline)


def run_pipeline(config: Config, resume: bool = False) -> int:
    """Train the experiment's pipeline; the exit status for the CLI."""
    result = train_with_objective(config, objective_factory(config.experiment.pipeline), resume=resume)
    if result is not None:
        log.info("%s: %d steps, run directory %s", config.experiment.name, result.steps, result.run_dir)
    return 0


__all__ = ["PIPELINES", "objective_factory", "run_pipeline"]
