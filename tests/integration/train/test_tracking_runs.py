"""A training run logs to a real `mlflow server`, and resumes from its checkpoints in a real S3 server (moto)."""

from __future__ import annotations

import json
import shutil
import urllib.parse
import urllib.request
from typing import Any

from conftest import REFERENCE, assert_same_losses

from weighted_mtp.train.checkpoint import checkpoint_name


def rest_get(uri: str, endpoint: str, **query: Any) -> dict[str, Any]:
    url = f"{uri}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query, doseq=True)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def rest_post(uri: str, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{uri}/api/2.0/mlflow/{endpoint}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def test_tracked_run_logs_to_mlflow_and_resumes_from_s3_on_a_fresh_machine(
    micro_workspace, reference_losses, mlflow_server, s3_bucket
) -> None:
    from weighted_mtp.tracking import S3Store

    ws = micro_workspace
    experiment = mlflow_server.new_experiment_name()
    name = f"tracked-{experiment}"
    remote = (
        "tracking.enabled=true",
        f"tracking.uri={mlflow_server.uri}",
        f"tracking.experiment={experiment}",
        "tracking.register_model=true",
        f"s3.bucket={s3_bucket['bucket']}",
        f"s3.endpoint_url={s3_bucket['endpoint_url']}",
        f"s3.region={s3_bucket['region']}",
        "training.keep_last=2",
    )
    ws.run(name, *REFERENCE, *remote)
    assert_same_losses(ws.losses(name), reference_losses, 1e-6)

    # MLflow, through the server's REST API
    uri = mlflow_server.uri
    experiment_id = rest_get(uri, "experiments/get-by-name", experiment_name=experiment)["experiment"][
        "experiment_id"
    ]
    runs = rest_post(uri, "runs/search", {"experiment_ids": [experiment_id]})["runs"]
    assert len(runs) == 1 and runs[0]["info"]["status"] == "FINISHED"
    run_id = runs[0]["info"]["run_id"]
    params = {p["key"]: p["value"] for p in runs[0]["data"]["params"]}
    assert params["training.max_steps"] == "6" and params["model.name"] == "micro"
    history = rest_get(uri, "metrics/get-history", run_id=run_id, metric_key="loss")["metrics"]
    assert [(m["step"], m["value"]) for m in history] == sorted(ws.losses(name).items())
    for key in ("tokens_per_s", "step_time_s", "memory/peak_gib", "head2/ce", "lr", "grad_norm"):
        assert rest_get(uri, "metrics/get-history", run_id=run_id, metric_key=key)["metrics"], key
    tags = {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}
    store = S3Store(
        s3_bucket["bucket"],
        f"weighted-mtp/{name}",
        endpoint_url=s3_bucket["endpoint_url"],
        region=s3_bucket["region"],
    )
    assert tags["checkpoint.latest"] == store.uri("checkpoints", checkpoint_name(6))
    registered = rest_get(uri, "registered-models/get", name=f"{name}-micro")["registered_model"]  # <experiment>-<model>
    assert registered["latest_versions"][0]["run_id"] == run_id

    # S3 kept the last two checkpoints; on a fresh machine the newest left there (step 4) is resumed
    assert store.list_checkpoints() == [checkpoint_name(4), checkpoint_name(6)]
    shutil.rmtree(ws.runs / name)
    store.delete_checkpoint(checkpoint_name(6))
    ws.run(name, *REFERENCE, *remote, "--resume")
    log = ws.log_tail(name)
    assert "downloaded checkpoint" in log and "resuming from" in log
    resumed = ws.losses(name)
    assert sorted(resumed) == [5, 6]
    assert_same_losses(resumed, {s: reference_losses[s] for s in (5, 6)}, 1e-6)
    # the resumed job continued the same MLflow run
    runs = rest_post(uri, "runs/search", {"experiment_ids": [experiment_id]})["runs"]
    assert [r["info"]["run_id"] for r in runs] == [run_id]
