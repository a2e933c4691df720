"""Checkpoints and artifacts in an S3 bucket (AWS or any S3-compatible server), with boto3.

Layout under s3://bucket/prefix/:
    checkpoints/<name>/<files...>     the checkpoint directory, file by file
    checkpoints/<name>/COMPLETE       JSON manifest (path, size, sha256 of every file), written last
    artifacts/<key>                   anything else (eval reports, plots, exported models)

S3 has no atomic directory rename, so completeness is a marker: a checkpoint exists for listing
and downloading only once its COMPLETE object does. An upload that dies halfway leaves files without
a marker, which `list_checkpoints` ignores and `prune_checkpoints` removes. Re-uploading a name
deletes its marker first, so a half-replaced checkpoint never looks complete either.

Credentials come only from boto3's standard chain (environment, ~/.aws, instance roles); this module
never reads, stores or logs them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weighted_mtp.errors import CheckpointError, WMTPError
from weighted_mtp.io import atomic_directory

if TYPE_CHECKING:
    from weighted_mtp.config.schema import Config

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
MANIFEST_FORMAT = 1
CHECKPOINTS = "checkpoints"
ARTIFACTS = "artifacts"
_DELETE_BATCH = 1000
_HASH_BLOCK = 8 * 1024 * 1024


@dataclass
class _StoredCheckpoint:
    name: str
    completed_at: datetime | None  # the marker's LastModified; None while incomplete
    newest_object_at: datetime
    keys: list[str]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _natural_key(name: str) -> list[Any]:
    """ "step_20" before "step_100": digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", "..") or name.strip() != name:
        raise CheckpointError(
            f"invalid checkpoint name {name!r}: use a single path component, e.g. step_000100"
        )


class S3Store:
    """A bucket prefix holding a run's checkpoints and artifacts."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "weighted-mtp",
        endpoint_url: str | None = None,
        region: str | None = None,
        *,
        max_attempts: int = 5,
        connect_timeout_s: float = 10.0,
    ) -> None:
        import boto3
        from botocore.config import Config as BotoConfig

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        boto_config = BotoConfig(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout_s,
            read_timeout=120,
            # S3-compatible servers (MinIO, moto, Ceph) are usually reached by path, not virtual host.
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        session = boto3.session.Session()
        self._client = session.client("s3", endpoint_url=endpoint_url, region_name=region, config=boto_config)

    def __repr__(self) -> str:
        endpoint = f", endpoint_url={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3Store(bucket={self.bucket!r}, prefix={self.prefix!r}{endpoint})"

    # -- addressing

    def _key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))

    def uri(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{self._key(*parts)}"

    def _where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")

    def _error(self, action: str, exc: Exception) -> WMTPError:
        from botocore.exceptions import NoCredentialsError

        if isinstance(exc, NoCredentialsError):
            return WMTPError(
                f"s3: no AWS credentials found for {self._where()}; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or unset s3.bucket"
            )
        return WMTPError(f"s3: {action} {self._where()} failed: {exc}")

    def check(self) -> None:
        """Fail at start, with a readable message, when the bucket cannot be reached or used."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise self._error("reaching", exc) from None

    # -- checkpoints

    def upload_checkpoint(self, local_dir: str | os.PathLike, name: str) -> str:
        """Upload a checkpoint directory as `name`; it becomes visible once every file is in place."""
        from botocore.exceptions import BotoCoreError, ClientError

        _check_name(name)
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise CheckpointError(f"{local_dir}: checkpoint directory to upload does not exist")
        files = sorted(p for p in local_dir.rglob("*") if p.is_file())
        relative = [p.relative_to(local_dir).as_posix() for p in files]
        if MARKER in relative:
            raise CheckpointError(f"{local_dir / MARKER}: a checkpoint may not contain a file named {MARKER}")
        started = time.monotonic()
        try:
            self.delete_checkpoint(name)
            manifest_files = []
            for path, rel in zip(files, relative):
                size, digest = path.stat().st_size, file_sha256(path)
                self._client.upload_file(str(path), self.bucket, self._key(CHECKPOINTS, name, rel))
                manifest_files.append({"path": rel, "size": size, "sha256": digest})
            manifest = {"format": MANIFEST_FORMAT, "name": name, "files": manifest_files}
            self._client.put_object(
                Bucket=self.bucket,
                Key=self._key(CHECKPOINTS, name, MARKER),
                Body=json.dumps(manifest, indent=1).encode(),
                ContentType="application/json",
            )
        except (BotoCoreError, ClientError) as exc:
            raise self._error(f"uploading checkpoint {name!r} to", exc) from None
        except OSError as exc:
            raise CheckpointError(
                f"{local_dir}: uploading checkpoint {name!r} failed reading a file: {exc}"
            ) from exc
        total = sum(f["size"] for f in manifest_files)
        log.info(
            "uploaded checkpoint %s (%d files, %.1f MB) to %s in %.1fs",
            name,
            len(files),
            total / 1e6,
            self.uri(CHECKPOINTS, name),
            time.monotonic() - started,
        )
        return self.uri(CHECKPOINTS, name)

    def _manifest(self, name: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(CHECKPOINTS, name, MARKER))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._error(f"reading checkpoint {name!r} from", exc) from None
        return json.loads(response["Body"].read())

    def download_checkpoint(self, name: str, local_dir: str | os.PathLike) -> Path:
        """Download a complete checkpoint into `local_dir` (replaced atomically), verifying every file."""
        from botocore.exceptions import BotoCoreError, ClientError

        _check_name(name)
        manifest = self._manifest(name)
        if manifest is None:
            raise CheckpointError(
                f"{self.uri(CHECKPOINTS, name)}: no complete checkpoint "
                "(never uploaded, or its upload was interrupted)"
            )
        local_dir = Path(local_dir)
        try:
            with atomic_directory(local_dir) as tmp:
                for entry in manifest["files"]:
                    target = tmp / entry["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    self._client.download_file(
                        self.bucket, self._key(CHECKPOINTS, name, entry["path"]), str(target)
                    )
                    if target.stat().st_size != entry["size"] or file_sha256(target) != entry["sha256"]:
                        raise CheckpointError(
                            f"{self.uri(CHECKPOINTS, name, entry['path'])}: content does not match its manifest"
                        )
        except (BotoCoreError, ClientError) as exc:
            raise self._error(f"downloading checkpoint {name!r} from", exc) from None
        log.info("downloaded checkpoint %s from %s to %s", name, self.uri(CHECKPOINTS, name), local_dir)
        return local_dir

    def _stored_checkpoints(self) -> list[_StoredCheckpoint]:
        from botocore.exceptions import BotoCoreError, ClientError

        base = self._key(CHECKPOINTS) + "/"
        found: dict[str, _StoredCheckpoint] = {}
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base
            ):
                for obj in page.get("Contents", []):
                    name, _, rest = obj["Key"][len(base) :].partition("/")
                    entry = found.setdefault(name, _StoredCheckpoint(name, None, obj["LastModified"], []))
                    entry.keys.append(obj["Key"])
                    entry.newest_object_at = max(entry.newest_object_at, obj["LastModified"])
                    if rest == MARKER:
                        entry.completed_at = obj["LastModified"]
        except (BotoCoreError, ClientError) as exc:
            raise self._error("listing", exc) from None
        return list(found.values())

    def list_checkpoints(self) -> list[str]:
        """Names of complete checkpoints, oldest first (by completion time, then by name)."""
        complete = [c for c in self._stored_checkpoints() if c.completed_at is not None]
        complete.sort(key=lambda c: (c.completed_at, _natural_key(c.name)))
        return [c.name for c in complete]

    def latest_complete_checkpoint(self) -> str | None:
        names = self.list_checkpoints()
        return names[-1] if names else None

    def _delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": k} for k in keys[start : start + _DELETE_BATCH]]
            self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def delete_checkpoint(self, name: str) -> None:
        """Remove the marker first, so a checkpoint half-deleted by a crash is not taken as complete."""
        from botocore.exceptions import BotoCoreError, ClientError

        _check_name(name)
        prefix = self._key(CHECKPOINTS, name) + "/"
        try:
            self._client.delete_object(Bucket=self.bucket, Key=prefix + MARKER)
            keys = [
                obj["Key"]
                for page in self._client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=prefix
                )
                for obj in page.get("Contents", [])
            ]
            self._delete_keys(keys)
        except (BotoCoreError, ClientError) as exc:
            raise self._error(f"deleting checkpoint {name!r} from", exc) from None

    def prune_checkpoints(self, keep_last: int) -> list[str]:
        """Keep the newest `keep_last` complete checkpoints; delete older ones, and interrupted uploads
        no newer than the newest complete one (uploads of a run are sequential, so those are leftovers).
        Returns the names deleted."""
        if keep_last < 1:
            raise ValueError("keep_last must be at least 1")
        stored = self._stored_checkpoints()
        complete = sorted(
            (c for c in stored if c.completed_at is not None),
            key=lambda c: (c.completed_at, _natural_key(c.name)),
        )
        doomed = complete[: max(0, len(complete) - keep_last)]
        if complete:
            newest = complete[-1].completed_at
            doomed += [c for c in stored if c.completed_at is None and c.newest_object_at <= newest]
        for checkpoint in doomed:
            self.delete_checkpoint(checkpoint.name)
        if doomed:
            log.info("pruned %d old checkpoints from %s", len(doomed), self.uri(CHECKPOINTS))
        return [c.name for c in doomed]

    # -- artifacts

    def upload_artifact(self, local_path: str | os.PathLike, key: str | None = None) -> str:
        """Upload one file to artifacts/<key> (default: its file name); returns its s3:// URI."""
        from botocore.exceptions import BotoCoreError, ClientError

        local_path = Path(local_path)
        if not local_path.is_file():
            raise WMTPError(f"{local_path}: artifact to upload does not exist")
        key = key or local_path.name
        try:
            self._client.upload_file(str(local_path), self.bucket, self._key(ARTIFACTS, key))
        except (BotoCoreError, ClientError) as exc:
            raise self._error(f"uploading artifact {key!r} to", exc) from None
        return self.uri(ARTIFACTS, key)

    def upload_artifacts(self, local_dir: str | os.PathLike, key_prefix: str = "") -> str:
        """Upload a directory tree under artifacts/<key_prefix>/; returns that s3:// URI."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise WMTPError(f"{local_dir}: artifact directory to upload does not exist")
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            self.upload_artifact(path, f"{key_prefix.strip('/')}/{rel}" if key_prefix.strip("/") else rel)
        return self.uri(ARTIFACTS, key_prefix)

    def list_artifacts(self, key_prefix: str = "") -> list[str]:
        """Keys under artifacts/<key_prefix>, relative to artifacts/."""
        from botocore.exceptions import BotoCoreError, ClientError

        base = self._key(ARTIFACTS) + "/"
        prefix = self._key(ARTIFACTS, key_prefix) if key_prefix.strip("/") else base
        try:
            return sorted(
                obj["Key"][len(base) :]
                for page in self._client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=prefix
                )
                for obj in page.get("Contents", [])
            )
        except (BotoCoreError, ClientError) as exc:
            raise self._error("listing artifacts in", exc) from None

    def download_artifact(self, key: str, local_path: str | os.PathLike) -> Path:
        from botocore.exceptions import BotoCoreError, ClientError

        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = local_path.with_name(f".{local_path.name}.download")
        try:
            self._client.download_file(self.bucket, self._key(ARTIFACTS, key), str(tmp))
            os.replace(tmp, local_path)
        except (BotoCoreError, ClientError) as exc:
            tmp.unlink(missing_ok=True)
            raise self._error(f"downloading artifact {key!r} from", exc) from None
        return local_path


def build_s3_store(config: Config) -> S3Store | None:
    """The run's S3 store when `s3.bucket` is set (checked reachable now, not at the first checkpoint)."""
    s3 = config.s3
    if not s3.bucket:
        return None
    store = S3Store(s3.bucket, s3.prefix, endpoint_url=s3.endpoint_url, region=s3.region)
    store.check()
    return store
