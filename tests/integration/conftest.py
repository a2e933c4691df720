"""Real servers on loopback for integration tests: an `mlflow server` and an S3-compatible moto server.

Both are separate processes started once per session (the MLflow server takes seconds to start) and
killed at the end. Tests get fresh state from them by using a unique experiment or bucket.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
MLFLOW_START_TIMEOUT_S = 180.0
MOTO_START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.25)
    tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
    _stop(proc)
    pytest.fail(f"server at {url} did not come up within {timeout_s:.0f}s (exit code {proc.poll()}):\n{tail}")


# Runs the server in the background of its own process group and kills the group once pytest is gone,
# so a test session killed with SIGKILL leaves no server behind on a shared machine.
_WATCHDOG = (
    'pytest_pid=$1; shift; "$@" & while kill -0 "$pytest_pid" 2>/dev/null; do sleep 2; done; kill -9 0'
)


def _start(cmd: list[str], log_path: Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            ["sh", "-c", _WATCHDOG, "watchdog", str(os.getpid()), *cmd],
            cwd=cwd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen) -> None:
    """Kill the server and every worker it spawned (its own process group); its state is disposable."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


@dataclass
class MlflowServer:
    uri: str
    backend_db: Path
    artifacts_dir: Path

    def new_experiment_name(self) -> str:
        return f"test-{uuid.uuid4().hex[:10]}"


@dataclass
class _Launched:
    server: MlflowServer
    proc: subprocess.Popen
    root: Path


_early_mlflow: list[_Launched] = []


def _launch_mlflow(root: Path) -> _Launched:
    port = free_port()
    server = MlflowServer(f"http://127.0.0.1:{port}", root / "mlflow.db", root / "artifacts")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job workers
    cmd = [
        str(BIN / "mlflow"), "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{server.backend_db}",
        "--artifacts-destination", str(server.artifacts_dir),
    ]  # fmt: skip
    return _Launched(server, _start(cmd, root / "server.log", cwd=root, env=env), root)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Launch the MLflow server as soon as a selected test needs it: it starts while other tests run."""
    if (
        any("mlflow_server" in getattr(item, "fixturenames", ()) for item in session.items)
        and not _early_mlflow
    ):
        _early_mlflow.append(_launch_mlflow(Path(tempfile.mkdtemp(prefix="wmtp-mlflow-server-"))))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    while _early_mlflow:
        launched = _early_mlflow.pop()
        _stop(launched.proc)
        shutil.rmtree(launched.root, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """`mlflow server` on 127.0.0.1:<free port>, SQLite backend and proxied artifacts in a temp dir."""
    launched = _early_mlflow[0] if _early_mlflow else _launch_mlflow(tmp_path_factory.mktemp("mlflow_server"))
    try:
        _wait_until_up(
            f"{launched.server.uri}/health",
            launched.proc,
            launched.root / "server.log",
            MLFLOW_START_TIMEOUT_S,
        )
        yield launched.server
    finally:
        _stop(launched.proc)


@dataclass
class S3Server:
    endpoint_url: str

    def new_bucket(self) -> str:
        import boto3

        name = f"wmtp-test-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1").create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3-compatible server as a separate process on 127.0.0.1:<free port>."""
    root = tmp_path_factory.mktemp("s3_server")
    port = free_port()
    proc = _start(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], root / "server.log", cwd=root
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(f"{endpoint}/moto-api/", proc, root / "server.log", MOTO_START_TIMEOUT_S)
        yield S3Server(endpoint)
    finally:
        _stop(proc)


FAKE_ACCESS_KEY_ID = "AKIAWMTPTESTKEY12345"
FAKE_SECRET_ACCESS_KEY = "wmtp/Test+Secret+Key/DoNotLog0123456789"


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """Test credentials in the environment only; the developer's ~/.aws and instance metadata are ignored."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    env = {
        "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def s3_bucket(s3_server: S3Server, aws_env: dict[str, str]) -> dict[str, str]:
    """A fresh, empty bucket on the moto server: the `s3` config section of a run that uses it."""
    return {"bucket": s3_server.new_bucket(), "endpoint_url": s3_server.endpoint_url, "region": "us-east-1"}


@dataclass
class AuthMlflowServer:
    """`mlflow server --app-name basic-auth`: every request needs the admin's user and password."""

    host_port: str
    username: str
    password: str

    def uri(self, with_credentials: bool = True) -> str:
        credentials = f"{self.username}:{self.password}@" if with_credentials else ""
        return f"http://{credentials}{self.host_port}"


@pytest.fixture(scope="session")
def mlflow_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthMlflowServer]:
    root = tmp_path_factory.mktemp("mlflow_auth_server")
    port = free_port()
    server = AuthMlflowServer(f"127.0.0.1:{port}", "admin", "Wmtp-s3cret-Pa55")
    (root / "basic_auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\n"
        f"admin_username = {server.username}\nadmin_password = {server.password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex}
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    cmd = [
        str(BIN / "mlflow"), "server", "--app-name", "basic-auth",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    proc = _start(cmd, root / "server.log", cwd=root, env=env)
    deadline = time.monotonic() + MLFLOW_START_TIMEOUT_S
    try:
        while True:  # any HTTP answer (401 included) means it is up
            try:
                with urllib.request.urlopen(f"http://{server.host_port}/health", timeout=2):
                    break
            except urllib.error.HTTPError:
                break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = (root / "server.log").read_text(errors="replace")[-3000:]
                    pytest.fail(f"the basic-auth MLflow server did not come up:\n{tail}")
                time.sleep(0.25)
        yield server
    finally:
        _stop(proc)
