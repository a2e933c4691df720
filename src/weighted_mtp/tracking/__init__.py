"""Experiment tracking (MLflow) and remote storage (S3) for checkpoints and artifacts."""

from weighted_mtp.tracking.mlflow_tracker import (
    MlflowTracker,
    NullTracker,
    Tracker,
    build_tracker,
    flatten_params,
)
from weighted_mtp.tracking.s3 import S3Store, build_s3_store

__all__ = [
    "MlflowTracker",
    "NullTracker",
    "S3Store",
    "Tracker",
    "build_s3_store",
    "build_tracker",
    "flatten_params",
]
