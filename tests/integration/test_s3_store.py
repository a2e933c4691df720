"""S3Store against a real S3-compatible server (moto in server mode, a separate process on loopback)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from weighted_mtp.config.schema import Config
from weighted_mtp.errors import CheckpointError, WMTPError
from weighted_mtp.tracking import S3Store, build_s3_store

REPO_ROOT = Path(__file__).resolve().parents[2]


def raw_keys(s3_bucket: dict[str, str]) -> list[str]:
    client = boto3.client("s3", endpoint_url=s3_bucket["endpoint_url"], region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket["bucket"])
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def store_for(s3_bucket: dict[str, str], prefix: str = "runs/test") -> S3Store:
    config = Config(s3={**s3_bucket, "prefix": prefix})
    store = build_s3_store(config)
    assert store is not None
    return store


def make_checkpoint(path: Path, seed: int, big: bool = False) -> Path:
    """A checkpoint-like tree; `big` adds a file above boto3's multipart threshold (8 MB)."""
    rng = __import__("random").Random(seed)
    (path / "optimizer").mkdir(parents=True)
    (path / "model.safetensors").write_bytes(rng.randbytes(9 * 1024 * 1024 if big else 4096))
    (path / "optimizer" / "rank0.pt").write_bytes(rng.randbytes(1000))
    (path / "state.json").write_text(json.dumps({"step": seed}))
    return path


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_checkpoint_round_trip(s3_bucket, tmp_path):
    store = store_for(s3_bucket)
    local = make_checkpoint(tmp_path / "ckpt", seed=1, big=True)
    uri = store.upload_checkpoint(local, "step_000010")
    assert uri == f"s3://{s3_bucket['bucket']}/runs/test/checkpoints/step_000010"
    assert store.list_checkpoints() == ["step_000010"]
    assert store.latest_complete_checkpoint() == "step_000010"

    keys = raw_keys(s3_bucket)
    assert "runs/test/checkpoints/step_000010/COMPLETE" in keys
    assert "runs/test/checkpoints/step_000010/optimizer/rank0.pt" in keys

    target = tmp_path / "restored"
    target.mkdir()
    (target / "stale.txt").write_text("replaced by the download")
    assert store.download_checkpoint("step_000010", target) == target
    assert tree_bytes(target) == tree_bytes(local)


def test_download_rejects_a_checkpoint_whose_content_changed(s3_bucket, tmp_path):
    store = store_for(s3_bucket)
    store.upload_checkpoint(make_checkpoint(tmp_path / "ckpt", seed=2), "step_1")
    client = boto3.client("s3", endpoint_url=s3_bucket["endpoint_url"], region_name="us-east-1")
    client.put_object(Bucket=s3_bucket["bucket"], Key="runs/test/checkpoints/step_1/state.json", Body=b"{}")
    target = make_checkpoint(tmp_path / "existing", seed=3)
    before = tree_bytes(target)
    with pytest.raises(CheckpointError, match="does not match its manifest"):
        store.download_checkpoint("step_1", target)
    assert tree_bytes(target) == before  # the local copy is untouched
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        store.download_checkpoint("step_404", tmp_path / "missing")


def test_upload_failing_midway_leaves_no_complete_checkpoint(s3_bucket, tmp_path):
    if not Path("/proc/self/mem").exists():
        pytest.skip("needs /proc/self/mem: a file whose read fails")
    store = store_for(s3_bucket)
    store.upload_checkpoint(make_checkpoint(tmp_path / "good", seed=1), "step_1")

    broken = make_checkpoint(tmp_path / "broken", seed=2)
    # Sorted after the other files, so the upload fails with some files already in the bucket.
    (broken / "zz_unreadable.bin").symlink_to("/proc/self/mem")
    with pytest.raises(CheckpointError, match="zz_unreadable|Input/output"):
        store.upload_checkpoint(broken, "step_2")
    keys = raw_keys(s3_bucket)
    assert "runs/test/checkpoints/step_2/model.safetensors" in keys  # really interrupted midway
    assert "runs/test/checkpoints/step_2/COMPLETE" not in keys
    assert store.list_checkpoints() == ["step_1"]
    assert store.latest_complete_checkpoint() == "step_1"
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        store.download_checkpoint("step_2", tmp_path / "out")

    # Re-uploading an existing name: the old marker goes first, so a failure leaves nothing "complete".
    with pytest.raises(CheckpointError):
        store.upload_checkpoint(broken, "step_1")
    assert store.list_checkpoints() == []


UPLOAD_THEN_HANG = """
import sys, time
from pathlib import Path
from weighted_mtp.tracking import S3Store

endpoint, bucket, local_dir, ready = sys.argv[1:5]
store = S3Store(bucket, "runs/test", endpoint_url=endpoint, region="us-east-1")

def hang_on_second_file(request, **_):
    if request.url.endswith("optimizer/rank0.pt"):
        Path(ready).touch()
        time.sleep(600)

store._client.meta.events.register("before-send.s3.PutObject", hang_on_second_file)
store.upload_checkpoint(local_dir, "step_5")
"""


def test_upload_killed_midway_leaves_no_complete_checkpoint_and_prune_cleans_it(s3_bucket, tmp_path):
    store = store_for(s3_bucket)
    local = make_checkpoint(tmp_path / "ckpt", seed=5)
    ready = tmp_path / "second-file-in-flight"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            UPLOAD_THEN_HANG,
            s3_bucket["endpoint_url"],
            s3_bucket["bucket"],
            str(local),
            str(ready),
        ],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")},
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), f"uploader never reached the second file (exit code {proc.poll()})"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    keys = raw_keys(s3_bucket)
    assert keys == ["runs/test/checkpoints/step_5/model.safetensors"]
    assert store.list_checkpoints() == []
    assert store.latest_complete_checkpoint() is None

    store.upload_checkpoint(local, "step_6")
    assert store.prune_checkpoints(keep_last=1) == ["step_5"]  # the leftover of the killed upload
    assert {k.split("/")[3] for k in raw_keys(s3_bucket)} == {"step_6"}


def test_prune_keeps_the_last_k(s3_bucket, tmp_path):
    store = store_for(s3_bucket, prefix="")
    local = make_checkpoint(tmp_path / "ckpt", seed=7)
    for step in (2, 9, 10, 11):  # digits compare as numbers: step_9 is older than step_10
        store.upload_checkpoint(local, f"step_{step}")
    assert store.list_checkpoints() == ["step_2", "step_9", "step_10", "step_11"]
    assert sorted(store.prune_checkpoints(keep_last=2)) == ["step_2", "step_9"]
    assert store.list_checkpoints() == ["step_10", "step_11"]
    assert {k.split("/")[1] for k in raw_keys(s3_bucket)} == {"step_10", "step_11"}
    assert store.prune_checkpoints(keep_last=2) == []


def test_artifacts_round_trip(s3_bucket, tmp_path):
    store = store_for(s3_bucket)
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "eval.json").write_text('{"pass@1": 0.5}')
    (tmp_path / "report" / "plots").mkdir()
    (tmp_path / "report" / "plots" / "loss.svg").write_text("<svg/>")
    assert (
        store.upload_artifacts(tmp_path / "report", "eval/mbpp")
        == f"s3://{s3_bucket['bucket']}/runs/test/artifacts/eval/mbpp"
    )
    assert (
        store.upload_artifact(tmp_path / "report" / "eval.json")
        == f"s3://{s3_bucket['bucket']}/runs/test/artifacts/eval.json"
    )
    assert store.list_artifacts() == ["eval.json", "eval/mbpp/eval.json", "eval/mbpp/plots/loss.svg"]
    assert store.list_artifacts("eval/mbpp/plots") == ["eval/mbpp/plots/loss.svg"]
    out = store.download_artifact("eval/mbpp/plots/loss.svg", tmp_path / "down" / "loss.svg")
    assert out.read_text() == "<svg/>"


def test_credentials_never_appear_in_logs_or_errors(s3_bucket, aws_env, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG, logger="weighted_mtp")
    caplog.set_level(logging.INFO)
    store = store_for(s3_bucket)
    local = make_checkpoint(tmp_path / "ckpt", seed=8)
    store.upload_checkpoint(local, "step_1")
    store.download_checkpoint("step_1", tmp_path / "restored")
    store.prune_checkpoints(keep_last=1)
    errors = []
    for action in (
        lambda: S3Store(
            "no-such-bucket-wmtp", endpoint_url=s3_bucket["endpoint_url"], region="us-east-1"
        ).check(),
        lambda: store.download_checkpoint("missing", tmp_path / "x"),
        lambda: store.upload_artifact(tmp_path / "missing.json"),
    ):
        with pytest.raises(WMTPError) as info:
            action()
        errors.append(str(info.value))
    assert "no-such-bucket-wmtp" in errors[0]
    assert any("uploaded checkpoint step_1" in r.getMessage() for r in caplog.records)
    out, err = capfd.readouterr()
    seen = "\n".join([caplog.text, out, err, repr(store), *errors])
    for secret in (aws_env["AWS_ACCESS_KEY_ID"], aws_env["AWS_SECRET_ACCESS_KEY"]):
        assert secret not in seen


def test_missing_credentials_and_unreachable_endpoint_are_clear_errors(s3_server, aws_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(WMTPError, match="no AWS credentials.*AWS_ACCESS_KEY_ID"):
        build_s3_store(
            Config(s3={"bucket": "b", "endpoint_url": s3_server.endpoint_url, "region": "us-east-1"})
        )

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    store = S3Store("b", endpoint_url="http://127.0.0.1:9", region="us-east-1", max_attempts=1)
    with pytest.raises(WMTPError, match=r"s3: reaching s3://b/weighted-mtp at http://127.0.0.1:9 failed"):
        store.check()
    assert build_s3_store(Config()) is None
