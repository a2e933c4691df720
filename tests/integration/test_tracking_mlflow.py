"""MLflow tracking against the embedded SQLite store that runs use by default, and against a real
`mlflow server` on loopback, checked through its REST API. The embedded test comes first: it runs
while the session's server is still starting."""

from __future__ import annotations

import json
import socket
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from weighted_mtp.config.schema import Config
from weighted_mtp.errors import WMTPError
from weighted_mtp.tracking import MlflowTracker, build_tracker, flatten_params
from weighted_mtp.tracking.mlflow_tracker import MAX_PARAM_VALUE_LENGTH


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rest_get(server, endpoint: str, **query: Any) -> dict[str, Any]:
    url = f"{server.uri}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def rest_artifact(server, run_id: str, path: str) -> bytes:
    query = urllib.parse.urlencode({"run_uuid": run_id, "path": path})
    with urllib.request.urlopen(f"{server.uri}/get-artifact?{query}", timeout=30) as response:
        return response.read()


def all_artifacts(server, run_id: str, path: str = "") -> dict[str, int]:
    """Every artifact file of the run -> its size, walking directories."""
    listing = rest_get(server, "artifacts/list", run_id=run_id, path=path)
    files: dict[str, int] = {}
    for entry in listing.get("files", []):
        if entry["is_dir"]:
            files.update(all_artifacts(server, run_id, entry["path"]))
        else:
            files[entry["path"]] = int(entry["file_size"])
    return files


def server_config(server, **tracking: Any) -> Config:
    return Config(
        tracking={"uri": server.uri, "experiment": server.new_experiment_name(), **tracking},
        experiment={"name": "tracking-test", "pipeline": "baseline"},
        training={"lr": 3e-4, "max_steps": 7},
    )


def make_model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"dim": 8, "n_layers": 2}))
    (path / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    return path


def test_embedded_sqlite_store_is_the_default(in_tmp_repo):
    from mlflow import MlflowClient

    config = Config(experiment={"name": "embedded"})
    assert config.tracking.uri == "sqlite:///storage/mlruns/mlflow.db"
    tracker = build_tracker(config)
    tracker.start(config)
    for step in range(3):
        tracker.log_metrics({"val/loss": 1.0 / (step + 1)}, step=step)
    version = tracker.register_model(make_model_dir(in_tmp_repo / "export"), "wmtp-embedded")
    run_id = tracker.run_id
    tracker.end()

    store = in_tmp_repo / "storage" / "mlruns"
    assert (store / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{in_tmp_repo / 'storage' / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.params["experiment.name"] == "embedded"
    assert [m.value for m in client.get_metric_history(run_id, "val/loss")] == pytest.approx(
        [1.0, 0.5, 1 / 3]
    )
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert store.resolve() in artifacts.resolve().parents
    assert (artifacts / "config.yaml").is_file() and (artifacts / "model" / "model.safetensors").is_file()
    assert version == "1"
    assert client.get_model_version("wmtp-embedded", "1").run_id == run_id
    assert not (in_tmp_repo / "mlruns").exists() and not (in_tmp_repo / "mlartifacts").exists()


def test_run_on_server_logs_config_metrics_artifacts_and_model_version(mlflow_server, tmp_path):
    config = server_config(mlflow_server)
    tracker = build_tracker(config, rank=0)
    tracker.start(config)
    run_id = tracker.run_id
    losses = [2.5, 2.1, 1.7, 1.6]
    for step, loss in enumerate(losses, start=1):
        tracker.log_metrics({"train/loss": loss, "train/head_1/ce": loss + 0.1}, step=step * 10)
    tracker.log_metrics({"eval/pass@1": 0.25, "train/nonfinite": float("nan")}, step=40)
    long_value = "x" * (MAX_PARAM_VALUE_LENGTH + 500)
    tracker.log_params({"notes": {"long": long_value}})
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "loss.svg").write_text("<svg/>")
    (tmp_path / "eval_report.json").write_text(json.dumps({"pass@1": 0.25}))
    tracker.log_artifacts(tmp_path / "plots", "plots")
    tracker.log_artifact(tmp_path / "eval_report.json", "eval")
    tracker.log_checkpoint("s3://bucket/runs/tracking-test/checkpoints/step_000040", 40)
    model_dir = make_model_dir(tmp_path / "final")
    assert tracker.register_model(model_dir, "wmtp-tracking-test") == "1"
    assert tracker.register_model(model_dir, "wmtp-tracking-test") == "2"
    tracker.end()

    run = rest_get(mlflow_server, "runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    assert run["info"]["run_name"] == "tracking-test"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    expected = flatten_params(config.model_dump(mode="json"))
    assert len(expected) > 100  # more than one MLflow batch
    for key, value in expected.items():
        assert params[key] == value, key
    assert float(params["training.lr"]) == 3e-4
    assert json.loads(params["data.difficulty_bins"]) == config.data.difficulty_bins
    assert params["tracking.uri"] == mlflow_server.uri
    assert len(params["notes.long"]) == MAX_PARAM_VALUE_LENGTH and params["notes.long"].endswith(
        "[truncated]"
    )
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["checkpoint.latest"].endswith("step_000040") and tags["checkpoint.latest_step"] == "40"
    assert tags["wmtp.pipeline"] == "baseline"

    history = rest_get(mlflow_server, "metrics/get-history", run_id=run_id, metric_key="train/loss")[
        "metrics"
    ]
    points = sorted((int(m["step"]), float(m["value"])) for m in history)
    assert points == [(10 * step, loss) for step, loss in enumerate(losses, start=1)]
    pass_at_1 = rest_get(mlflow_server, "metrics/get-history", run_id=run_id, metric_key="eval/pass_at_1")
    assert [float(m["value"]) for m in pass_at_1["metrics"]] == [0.25]
    latest = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert str(latest["train/nonfinite"]).lower() == "nan"

    files = all_artifacts(mlflow_server, run_id)
    assert set(files) == {
        "config.yaml", "plots/loss.svg", "eval/eval_report.json", "model/config.json", "model/model.safetensors",
    }  # fmt: skip
    assert files["model/model.safetensors"] == 256 * 40
    logged_config = Config.model_validate(yaml.safe_load(rest_artifact(mlflow_server, run_id, "config.yaml")))
    assert logged_config == config

    version = rest_get(mlflow_server, "model-versions/get", name="wmtp-tracking-test", version="2")[
        "model_version"
    ]
    assert version["run_id"] == run_id
    assert version["source"] == f"runs:/{run_id}/model"
    assert version["status"] == "READY"


def test_resume_continues_the_same_run(mlflow_server):
    config = server_config(mlflow_server)
    first = build_tracker(config)
    first.start(config)
    first.log_metrics({"train/loss": 3.0}, step=1)
    first.end(status="KILLED")

    resumed_config = config.model_copy(
        update={"training": config.training.model_copy(update={"max_steps": 20})}
    )
    second = build_tracker(resumed_config)
    second.start(resumed_config, run_id=first.run_id)
    second.log_metrics({"train/loss": 2.0}, step=2)
    run_id = second.run_id
    second.end()

    run = rest_get(mlflow_server, "runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert params["training.max_steps"] == "7"
    assert tags["resumed.training.max_steps"] == "20"
    history = rest_get(mlflow_server, "metrics/get-history", run_id=run_id, metric_key="train/loss")[
        "metrics"
    ]
    assert sorted(m["value"] for m in history) == [2.0, 3.0]

    unknown = "0" * 32  # e.g. a checkpoint written while tracking to another store
    third = build_tracker(config)
    third.start(config, run_id=unknown)
    assert third.run_id not in (None, unknown, run_id)
    third.end()


def test_unreachable_server_is_a_clear_error_naming_the_uri():
    uri = f"http://wmtp-user:hunter2@127.0.0.1:{free_port()}"
    tracker = MlflowTracker(uri, "unreachable")
    with pytest.raises(WMTPError, match=r"cannot reach the MLflow tracking server") as info:
        tracker.start()
    message = str(info.value)
    assert "127.0.0.1" in message and "tracking.uri" in message
    assert "hunter2" not in message and "hunter2" not in repr(tracker)


def test_a_training_run_tells_its_story_and_its_evaluation_links_back(in_tmp_repo, shared_data):
    """A real micro-model training run with the embedded store: its model is registered under
    <experiment>-<model>, its curves are an artifact, and `wmtp eval` of its export tags the
    training run as its source."""
    from mlflow import MlflowClient

    from weighted_mtp.cli import main

    common = ["--preset", "local-light", "--use-micro-model", f"paths.raw_data={shared_data}", "device=cpu"]
    assert main(["train", "--recipe", "baseline", *common, "training.max_steps=2", "data.val_split=null",
                 "training.eval_every=null"]) == 0  # fmt: skip
    run_dir = in_tmp_repo / "storage" / "runs" / "baseline"
    manifest = json.loads((run_dir / "final" / "config.json").read_text())
    train_run = manifest["extra"]["tracking_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{in_tmp_repo / 'storage' / 'mlruns' / 'mlflow.db'}")
    assert client.get_model_version("baseline-micro", "1").run_id == train_run
    artifacts = Path(client.get_run(train_run).info.artifact_uri.removeprefix("file://"))
    assert (artifacts / "plots" / "training-curves.png").stat().st_size > 1000
    assert (run_dir / "training-curves.png").is_file()

    assert main(["eval", "--model", str(run_dir / "final"), "--benchmark", "mbpp", "--limit", "2",
                 "--max-new-tokens", "8", *common]) == 0  # fmt: skip
    (eval_run,) = client.search_runs(
        [client.get_experiment_by_name("weighted-mtp").experiment_id], "attributes.run_name = 'eval-baseline-mbpp-test'"
    )
    assert eval_run.data.tags["source_run_id"] == train_run


def test_a_relative_store_follows_the_working_directory(tmp_path, monkeypatch):
    """MLflow keeps one database engine per URI string in a process: the default relative URI must
    still write under each run's own working directory."""
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        config = Config(experiment={"name": name})
        tracker = build_tracker(config)
        tracker.start(config)
        tracker.end()
        assert (tmp_path / name / "storage" / "mlruns" / "mlflow.db").is_file(), name
