"""A training run logs to a real `mlflow server`, and resumes from checkpoints in a real S3 server (moto)."""

from __future__ import annotations

import json
import shutil
import urllib.parse
import urllib.request
from typing import Any

from weighted_mtp.train.checkpoint import checkpoint_name

STEPS = ("training.max_steps=4", "training.save_every=2", "data.n_samples=8")


def rest_get(uri: str, endpoint: str, **query: Any) -> dict[str, Any]:
    url = f"{uri}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query, doseq=True)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def rest_post(uri: str, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{uri}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def test_run_logs_params_metrics_checkpoint_and_model_to_mlflow_server(micro_workspace, mlflow_server) -> None:
    ws = micro_workspace
    experiment = mlflow_server.new_experiment_name()
    name = f"tracked-{experiment}"
    ws.run(name, *STEPS, "tracking.enabled=true", f"tracking.uri={mlflow_server.uri}",
           f"tracking.experiment={experiment}", "tracking.register_model=true")

    experiment_id = rest_get(mlflow_server.uri, "experiments/get-by-name", experiment_name=experiment)[
        "experiment"]["experiment_id"]
    runs = rest_post(mlflow_server.uri, "runs/search", {"experiment_ids": [experiment_id]})["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["training.max_steps"] == "4" and params["model.name"] == "micro"
    run_id = run["info"]["run_id"]
    history = rest_get(mlflow_server.uri, "metrics/get-history", run_id=run_id, metric_key="loss")["metrics"]
    assert [m["step"] for m in history] == [1, 2, 3, 4]
    local = ws.losses(name)
    assert [m["value"] for m in history] == [local[s] for s in (1, 2, 3, 4)]
    for key in ("tokens_per_s", "step_time_s", "memory/peak_gib", "head2/ce", "lr", "grad_norm"):
        assert rest_get(mlflow_server.uri, "metrics/get-history", run_id=run_id, metric_key=key)["metrics"], key
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["checkpoint.latest"].endswith(checkpoint_name(4))
    versions = rest_get(mlflow_server.uri, "registered-models/get", name=name)["registered_model"]
    assert versions["latest_versions"][0]["run_id"] == run_id


def test_resume_from_s3_on_a_fresh_machine(micro_workspace, s3_bucket) -> None:
    from weighted_mtp.tracking import S3Store

    ws = micro_workspace
    name = f"s3-{s3_bucket['bucket']}"
    s3 = (f"s3.bucket={s3_bucket['bucket']}", f"s3.endpoint_url={s3_bucket['endpoint_url']}",
          f"s3.region={s3_bucket['region']}", "training.keep_last=2")
    ws.run(name, *STEPS, *s3)
    reference = ws.losses(name)
    store = S3Store(s3_bucket["bucket"], f"weighted-mtp/{name}", endpoint_url=s3_bucket["endpoint_url"],
                    region=s3_bucket["region"])
    assert store.list_checkpoints() == [checkpoint_name(2), checkpoint_name(4)]

    # a fresh machine: nothing local; the newest checkpoint in the bucket is step 2
    shutil.rmtree(ws.runs / name)
    store.delete_checkpoint(checkpoint_name(4))
    ws.run(name, *STEPS, *s3, "--resume")
    log = ws.log_tail(name)
    assert "downloaded checkpoint" in log and "resuming from" in log
    resumed = ws.losses(name)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert abs(resumed[step] - reference[step]) <= 1e-6
    assert store.list_checkpoints() == [checkpoint_name(2), checkpoint_name(4)]
