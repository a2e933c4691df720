"""Tracker selection and the pure helpers of the tracking package (no store, no server)."""

from __future__ import annotations

import json

import pytest

from weighted_mtp.config.schema import Config
from weighted_mtp.errors import WMTPError
from weighted_mtp.tracking import MlflowTracker, NullTracker, Tracker, build_tracker, flatten_params
from weighted_mtp.tracking.mlflow_tracker import MAX_PARAM_VALUE_LENGTH, mlflow_key, redact_uri, sqlite_path


def test_build_tracker_uses_mlflow_only_on_rank_zero_with_tracking_enabled():
    config = Config(tracking={"uri": "http://127.0.0.1:5000", "experiment": "e", "register_model": False})
    tracker = build_tracker(config, rank=0)
    assert isinstance(tracker, MlflowTracker)
    assert (tracker.uri, tracker.experiment, tracker.register_models) == ("http://127.0.0.1:5000", "e", False)
    assert isinstance(build_tracker(config, rank=1), NullTracker)
    assert isinstance(build_tracker(Config(tracking={"enabled": False}), rank=0), NullTracker)


def test_null_tracker_satisfies_the_protocol_and_does_nothing(tmp_path):
    tracker = build_tracker(Config(), rank=3)
    assert isinstance(tracker, Tracker) and isinstance(MlflowTracker("sqlite:///x.db", "e"), Tracker)
    tracker.start(Config())
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_checkpoint(str(tmp_path), 1)
    assert tracker.register_model(tmp_path, "m") is None
    tracker.end()
    assert tracker.run_id is None and list(tmp_path.iterdir()) == []


def test_flatten_params_gives_dotted_keys_and_mlflow_sized_values():
    flat = flatten_params({"a": {"b": 1, "c": {"d": [1, 2]}, "empty": {}}, "e": None, "f": "x" * 7000})
    assert flat["a.b"] == "1"
    assert json.loads(flat["a.c.d"]) == [1, 2]
    assert flat["a.empty"] == "{}" and flat["e"] == "None"
    assert len(flat["f"]) == MAX_PARAM_VALUE_LENGTH and flat["f"].endswith("[truncated]")
    config_params = flatten_params(Config().model_dump(mode="json"))
    assert config_params["training.lr"] == str(Config().training.lr)
    assert all(len(v) <= MAX_PARAM_VALUE_LENGTH for v in config_params.values())


def test_mlflow_key_makes_any_name_acceptable():
    assert mlflow_key("eval/pass@1") == "eval/pass_at_1"
    assert mlflow_key("train/head_2/ce") == "train/head_2/ce"
    assert mlflow_key("val loss (ema)") == "val loss _ema_"


def test_uri_helpers():
    assert (
        redact_uri("https://user:s3cret@mlflow.example.com:8443/x")
        == "https://user:***@mlflow.example.com:8443/x"
    )
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert str(sqlite_path("sqlite:///storage/mlruns/mlflow.db")) == "storage/mlruns/mlflow.db"
    assert str(sqlite_path("sqlite:////abs/mlflow.db")) == "/abs/mlflow.db"
    assert sqlite_path("http://host") is None


def test_tracker_refuses_use_before_start():
    with pytest.raises(RuntimeError, match="before start"):
        MlflowTracker("sqlite:///x.db", "e").log_metrics({"loss": 1.0}, step=0)
    with pytest.raises(WMTPError, match="tracking.uri"):
        build_tracker(Config(tracking={"uri": "  "}))
