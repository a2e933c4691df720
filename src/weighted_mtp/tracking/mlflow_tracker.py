"""Experiment tracking: the `Tracker` protocol, its MLflow implementation and a no-op stand-in.

The trainer talks to a `Tracker` only, so rank != 0 and runs with tracking disabled use
`NullTracker` and no code path checks "am I rank 0?". `MlflowTracker` writes to any MLflow store:
by default an embedded SQLite database under storage/mlruns (no server), or a tracking server
named by `tracking.uri`. mlflow is imported on first use because importing it takes seconds.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from weighted_mtp.errors import ConfigError, WMTPError
from weighted_mtp.redact import redact_uri, split_credentials

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from weighted_mtp.config.schema import Config

log = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation): longer values are rejected or silently cut by the store.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MODEL_ARTIFACT_PATH = "model"
SERVER_PROBE_TIMEOUT_S = 10.0


@runtime_checkable
class Tracker(Protocol):
    """What the trainer and the pipelines log to. Every method is safe to call on any rank."""

    @property
    def run_id(self) -> str | None: ...

    def start(
        self, config: Config | Mapping[str, Any] | None = None, *, run_id: str | None = None
    ) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_checkpoint(self, location: str, step: int) -> None: ...

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...

    def log_artifacts(self, directory: str | os.PathLike, artifact_path: str | None = None) -> None: ...

    def register_model(self, path: str | os.PathLike, name: str) -> str | None: ...

    def end(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Logs nothing: for ranks other than 0 and for runs with `tracking.enabled: false`."""

    run_id: str | None = None

    def start(self, config: Config | Mapping[str, Any] | None = None, *, run_id: str | None = None) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_checkpoint(self, location: str, step: int) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, directory: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def register_model(self, path: str | os.PathLike, name: str) -> str | None:
        return None

    def end(self, status: str = "FINISHED") -> None:
        pass


# ----------------------------------------------------------------------------- helpers


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"training.lr": "1e-05", ...}; lists become JSON, long values are cut."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{dotted}."))
        else:
            flat[dotted] = _param_value(value)
    return flat


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return _truncate(text, MAX_PARAM_VALUE_LENGTH)


def mlflow_key(key: str) -> str:
    """A metric/param/tag name MLflow accepts: `eval/pass@1` -> `eval/pass_at_1`; other odd characters -> `_`."""
    return re.sub(r"[^/\w.\- :]", "_", key.replace("@", "_at_"))


def _truncate(text: str, limit: int) -> str:
    marker = "...[truncated]"
    return text if len(text) <= limit else text[: limit - len(marker)] + marker


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///relative` or `sqlite:////absolute` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :])


def check_server_reachable(uri: str, timeout_s: float = SERVER_PROBE_TIMEOUT_S) -> None:
    """Fail fast (instead of after MLflow's minutes of retries) when an HTTP tracking server is down.

    Any HTTP answer counts as reachable; only a failure to connect is an error.
    """
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WMTPError(
            f"tracking.uri: cannot reach the MLflow tracking server at {redact_uri(uri)} ({reason}); "
            "start it, fix tracking.uri, or set tracking.enabled=false"
        ) from None


# ----------------------------------------------------------------------------- MLflow


class MlflowTracker:
    """One MLflow run. Create it, `start(config)`, log, `end()`.

    `start(run_id=...)` reopens an earlier run, so a resumed training job keeps one run.
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        *,
        run_name: str | None = None,
        register_models: bool = True,
    ) -> None:
        # Credentials in the URI go to MLflow's own environment variables (unless those are set
        # already); the URI the tracker keeps, logs and hands to the client has none.
        self.uri, user, password = split_credentials(uri)
        if user is not None:
            os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user)
        if password is not None:
            os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", password)
        self.experiment = experiment
        self.run_name = run_name
        self.register_models = register_models
        self._client: MlflowClient | None = None
        self._run_id: str | None = None
        self._ended = False
        self._metric_failures = 0

    @property
    def run_id(self) -> str | None:
        return self._run_id

    def __repr__(self) -> str:
        uri = redact_uri(self.uri)
        return f"MlflowTracker(uri={uri!r}, experiment={self.experiment!r}, run_id={self._run_id!r})"

    # -- lifecycle

    def start(self, config: Config | Mapping[str, Any] | None = None, *, run_id: str | None = None) -> None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        if self._run_id is not None:
            raise RuntimeError("MlflowTracker.start() called twice; make a new tracker for a new run")
        scheme = urllib.parse.urlsplit(self.uri).scheme
        if scheme in ("http", "https"):
            check_server_reachable(self.uri)
        db = sqlite_path(self.uri)
        store_uri = self.uri
        if db is not None:
            db = db.resolve()
            db.parent.mkdir(parents=True, exist_ok=True)
            # MLflow caches one database engine per URI string for the life of the process: a relative
            # path would keep writing where the working directory was the first time
            store_uri = f"sqlite:///{db}"
        try:
            self._client = MlflowClient(tracking_uri=store_uri, registry_uri=store_uri)
            if run_id is not None and not self._run_exists(run_id):
                log.warning("MLflow run %s is not in %s; starting a new run", run_id, redact_uri(self.uri))
                run_id = None
            if run_id is not None:
                self._client.update_run(run_id, status="RUNNING")
                self._run_id = run_id
            else:
                experiment_id = self._experiment_id(db)
                run = self._client.create_run(experiment_id, run_name=self.run_name)
                self._run_id = run.info.run_id
        except MlflowException as exc:
            raise WMTPError(
                f"tracking.uri: MLflow store {redact_uri(self.uri)} refused to start a run: {exc.message}"
            ) from None
        log.info("MLflow run %s in experiment %r at %s", self._run_id, self.experiment, redact_uri(self.uri))
        if config is not None:
            self._log_config(config, resumed=run_id is not None)

    def _run_exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        assert self._client is not None
        try:
            return self._client.get_run(run_id).info.lifecycle_stage != "deleted"
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise

    def _experiment_id(self, db: Path | None) -> str:
        """The experiment's id, created on first use; embedded stores keep artifacts beside the database."""
        assert self._client is not None
        existing = self._client.get_experiment_by_name(self.experiment)
        if existing is not None:
            if existing.lifecycle_stage == "deleted":
                self._client.restore_experiment(existing.experiment_id)
            return existing.experiment_id
        location = (db.parent / "artifacts").resolve().as_uri() if db is not None else None
        return self._client.create_experiment(self.experiment, artifact_location=location)

    def _log_config(self, config: Config | Mapping[str, Any], *, resumed: bool) -> None:
        from weighted_mtp.config import public_dump
        from weighted_mtp.config.schema import Config

        tree = public_dump(config) if isinstance(config, Config) else dict(config)
        params = flatten_params(tree)
        if resumed:
            params = self._params_not_yet_logged(params)
        self.log_params(params)
        if isinstance(config, Config):
            self.set_tags({"wmtp.pipeline": config.experiment.pipeline, "wmtp.model": config.model.name})
        with tempfile.TemporaryDirectory() as tmp:
            from weighted_mtp.config import config_to_yaml

            path = Path(tmp) / "config.yaml"
            text = config_to_yaml(config) if isinstance(config, Config) else json.dumps(tree, indent=2)
            path.write_text(text, encoding="utf-8")
            self.log_artifact(path)

    def _params_not_yet_logged(self, params: dict[str, str]) -> dict[str, str]:
        """MLflow params are immutable: on resume, changed values are kept as `resumed.<key>` tags."""
        assert self._client is not None and self._run_id is not None
        logged = self._client.get_run(self._run_id).data.params
        changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
        if changed:
            log.warning(
                "resumed MLflow run %s with changed settings: %s", self._run_id, ", ".join(sorted(changed))
            )
            self.set_tags({f"resumed.{k}": v for k, v in changed.items()})
        return {k: v for k, v in params.items() if k not in logged}

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED (or FAILED, KILLED). `run_id` stays readable afterwards."""
        if self._client is None or self._run_id is None or self._ended:
            return
        self._client.set_terminated(self._run_id, status=status)
        self._ended = True
        if self._metric_failures:
            log.warning(
                "%d metric batches could not be logged to %s", self._metric_failures, redact_uri(self.uri)
            )

    # -- logging

    def _require_run(self) -> tuple[MlflowClient, str]:
        if self._client is None or self._run_id is None or self._ended:
            raise RuntimeError("MlflowTracker used before start() or after end()")
        return self._client, self._run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        client, run_id = self._require_run()
        from mlflow.entities import Param

        flat = flatten_params(params)
        items = [Param(mlflow_key(key), value) for key, value in flat.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Numbers (or 0-d tensors) at a step. A store failure here is a warning: training goes on."""
        client, run_id = self._require_run()
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        items = [
            Metric(mlflow_key(key), float(value), timestamp, int(step)) for key, value in metrics.items()
        ]
        try:
            for start in range(0, len(items), MAX_METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=items[start : start + MAX_METRICS_PER_BATCH])
        except Exception as exc:  # noqa: BLE001 - losing a metric point must not end a training run
            self._metric_failures += 1
            log.warning("could not log metrics at step %d to %s: %s", step, redact_uri(self.uri), exc)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        client, run_id = self._require_run()
        from mlflow.entities import RunTag

        items = [
            RunTag(mlflow_key(key), _truncate(str(value), MAX_TAG_VALUE_LENGTH))
            for key, value in tags.items()
        ]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, tags=items[start : start + MAX_PARAMS_PER_BATCH])

    def log_checkpoint(self, location: str, step: int) -> None:
        """Where the newest checkpoint lives (a local path or s3:// URI), as run tags."""
        self.set_tags({"checkpoint.latest": location, "checkpoint.latest_step": step})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        client, run_id = self._require_run()
        path = Path(path)
        if not path.exists():
            raise WMTPError(f"{path}: artifact to log does not exist")
        client.log_artifact(run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | os.PathLike, artifact_path: str | None = None) -> None:
        client, run_id = self._require_run()
        directory = Path(directory)
        if not directory.is_dir():
            raise WMTPError(f"{directory}: artifact directory to log does not exist")
        client.log_artifacts(run_id, str(directory), artifact_path)

    def register_model(self, path: str | os.PathLike, name: str) -> str | None:
        """Upload the model directory as the run's `model` artifact and register it as a new version.

        Returns the version number, or None when registration is off or the store has no registry.
        """
        from mlflow.exceptions import MlflowException

        if not self.register_models:
            return None
        client, run_id = self._require_run()
        self.log_artifacts(path, MODEL_ARTIFACT_PATH)
        try:
            try:
                client.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            version = client.create_model_version(
                name, source=f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}", run_id=run_id
            )
        except MlflowException as exc:
            if exc.error_code in ("ENDPOINT_NOT_FOUND", "FEATURE_DISABLED", "NOT_IMPLEMENTED"):
                log.warning(
                    "the MLflow store at %s has no model registry; %r not registered",
                    redact_uri(self.uri),
                    name,
                )
                return None
            raise WMTPError(
                f"tracking: registering model {name!r} at {redact_uri(self.uri)} failed: {exc.message}"
            ) from None
        self.set_tags({"registered_model": f"{name}/{version.version}"})
        log.info("registered model %r version %s", name, version.version)
        return str(version.version)


def build_tracker(config: Config, rank: int = 0, *, run_name: str | None = None) -> Tracker:
    """The run's tracker: MLflow on rank 0 when tracking is enabled, a `NullTracker` otherwise.

    The MLflow run is named `run_name`, by default the experiment's name.
    """
    tracking = config.tracking
    if rank != 0 or not tracking.enabled:
        return NullTracker()
    if not tracking.uri.strip():
        raise ConfigError("tracking.uri: empty; set an MLflow URI or tracking.enabled=false")
    return MlflowTracker(
        tracking.uri,
        tracking.experiment,
        run_name=run_name or config.experiment.name,
        register_models=tracking.register_model,
    )
