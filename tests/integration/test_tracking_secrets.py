"""Credentials in tracking.uri: used against a real MLflow server that requires them, and written or
printed nowhere (output, run directory, tracking parameters)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from weighted_mtp.redact import redact_uri, split_credentials


@pytest.mark.parametrize(
    ("uri", "bare", "user", "password", "redacted"),
    [
        ("http://u:p%40ss@host:5000/x", "http://host:5000/x", "u", "p@ss", "http://u:***@host:5000/x"),
        ("https://token@host", "https://host", "token", None, "https://token@host"),
        ("http://u:pw@[::1]:80", "http://[::1]:80", "u", "pw", "http://u:***@[::1]:80"),
        ("sqlite:///storage/mlruns/mlflow.db", "sqlite:///storage/mlruns/mlflow.db", None, None,
         "sqlite:///storage/mlruns/mlflow.db"),
    ],
)
def test_credentials_split_off_and_redacted(uri, bare, user, password, redacted):
    assert split_credentials(uri) == (bare, user, password)
    assert redact_uri(uri) == redacted


def run_wmtp(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    return subprocess.run([sys.executable, "-m", "weighted_mtp", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_password_in_tracking_uri_reaches_the_server_and_nothing_else(in_tmp_repo, shared_data, mlflow_auth_server):
    from mlflow import MlflowClient

    server = mlflow_auth_server
    uri = server.uri()
    common = [f"paths.raw_data={shared_data}", f"tracking.uri={uri}", "tracking.experiment=secrets", "device=cpu"]
    shown = run_wmtp(in_tmp_repo, "config", "--recipe", "baseline", *common)
    dry = run_wmtp(in_tmp_repo, "train", "--recipe", "baseline", "--preset", "local-light", "--use-micro-model",
                   "--dry-run", *common)
    trained = run_wmtp(in_tmp_repo, "train", "--recipe", "baseline", "--preset", "local-light", "--use-micro-model",
                       "training.max_steps=1", "data.val_split=null", "training.eval_every=null", *common)
    evaluated = run_wmtp(in_tmp_repo, "eval", "--reference-solutions", "--benchmark", "humaneval", "--limit", "2",
                         "--output", "gold.json", *common)
    for done in (shown, dry, trained, evaluated):
        assert done.returncode == 0, done.stderr[-2000:]
        assert server.password not in done.stdout + done.stderr
    assert "admin:***@" in shown.stdout
    written = [p for p in (in_tmp_repo / "storage").rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".jsonl")]
    assert any(p.name == "config.yaml" for p in written)
    for path in written:
        assert server.password not in path.read_text(errors="replace"), path

    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = server.username, server.password
    try:
        client = MlflowClient(tracking_uri=server.uri(with_credentials=False))
        runs = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    finally:
        del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
    assert {run.info.run_name for run in runs} == {"baseline", "eval-reference-humaneval-test"}
    for run in runs:
        assert all(server.password not in str(value) for value in run.data.params.values())
    (train_run,) = [run for run in runs if run.info.run_name == "baseline"]
    assert train_run.data.params["tracking.uri"] == f"http://admin:***@{server.host_port}"


def test_without_credentials_the_server_refuses_in_one_line(in_tmp_repo, shared_data, mlflow_auth_server):
    done = run_wmtp(in_tmp_repo, "eval", "--reference-solutions", "--benchmark", "humaneval", "--limit", "1",
                    f"paths.raw_data={shared_data}", f"tracking.uri={mlflow_auth_server.uri(with_credentials=False)}")
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: tracking.uri: MLflow store http://127.0.0.1:") and "Traceback" not in done.stderr
