"""A real `mlflow server` for the tests that need one: on 127.0.0.1 at a free port, over the
SQLite store `mlflow.db` of a folder, restartable on the same port with the same store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

START_TIMEOUT_S = 180.0  # the server imports MLflow and migrates the store: many seconds on 2 cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    """`mlflow server` over `root/mlflow.db`, artifacts uploaded through it to `root/artifacts`
    (runs already in the store keep their own artifact locations, which it serves too: what
    `mlflow ui` does for a local store), its log in `root/server.log`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            *(sys.executable, "-m", "mlflow", "server"),
            *("--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"),
            *("--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts"),
            *("--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"),
        ]
        log = open(self.root / "server.log", "ab")  # noqa: SIM115  # the server owns it
        self._process = subprocess.Popen(
            command, stdout=log, stderr=log, start_new_session=True, cwd=self.root
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.answers():
            assert self._process.poll() is None, (self.root / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL to the server and its workers (its own process group)."""
        assert self._process is not None
        os.killpg(self._process.pid, signal.SIGKILL)
        self._process.wait()
        self._process = None

    @property
    def running(self) -> bool:
        return self._process is not None

    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)
