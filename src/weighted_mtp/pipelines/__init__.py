"""Experiment pipelines. A pipeline says only what differs between experiments: its objective.

`PIPELINES` maps `experiment.pipeline` to an objective factory `(config, model, tokenizer, env) ->
Objective`; `train_with_objective` does everything else the same way for every experiment. Importing
this package fills the registry.
"""

from __future__ import annotations

import logging

from weighted_mtp.config.schema import Config
from weighted_mtp.pipelines import baseline, critic, rho1, verifiable  # noqa: F401  (they register)
from weighted_mtp.pipelines.common import ObjectiveFactory, train_with_objective
from weighted_mtp.registry import PIPELINES

log = logging.getLogger(__name__)


def objective_factory(pipeline: str) -> ObjectiveFactory:
    return PIPELINES.get(pipeline)


def run_pipeline(config: Config, resume: bool = False) -> int:
    """Train the experiment's pipeline; the exit status for the CLI."""
    result = train_with_objective(config, objective_factory(config.experiment.pipeline), resume=resume)
    if result is not None:
        log.info("%s: %d steps, run directory %s", config.experiment.name, result.steps, result.run_dir)
    return 0


__all__ = ["PIPELINES", "objective_factory", "run_pipeline"]
