"""A real ``airflow standalone`` for end-to-end tests, driven through the Airflow 3 REST API.

It runs the project's DAGs with the LocalExecutor and a SQLite metadata database, with
parallelism kept low for a 2-core machine, and sees the same connections as the tests (the
embedded PostgreSQL, the Slack receiver, the SMTP server). Ready in about 30 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from airflow_client import AirflowClient
from pgdr.airflow_glue.task_exit import write_local_settings
from pgdr.local.runner import DAGS_FOLDER, PLUGINS_FOLDER
from pgdr.postgres.binaries import free_port

PGDR_DAGS = {"pgdr_backup", "pgdr_verify_restore", "pgdr_restore"}


class Standalone(AirflowClient):
    """One ``airflow standalone`` process group and a tiny REST client for it."""

    def __init__(self, home: Path, extra_env: dict[str, str]):
        self.home = home
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        home.mkdir(parents=True, exist_ok=True)
        write_local_settings(home)  # as `make ui` does: each task's exit seen at once, not up to 5 s later
        venv_bin = str(Path(sys.executable).parent)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PGDR_"))},
            "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.base_url,
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            # The plan is written before the start and never changes: each DAG file is parsed once (a changed one
            # still at once, by its time of change), not every 5 s (a quarter of a core on a 2-core machine).
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "3600",
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "300",
            "PYTHONPATH": str(PLUGINS_FOLDER),
            "XDG_RUNTIME_DIR": str(home),
            **extra_env,
        }
        self.log_path = home / "standalone.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 240) -> Standalone:
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "airflow"), "standalone"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.home,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"airflow standalone exited early:\n{self.log_tail()}")
            try:
                health = self.api("GET", "/api/v2/monitor/health")
                dags = {d["dag_id"] for d in self.api("GET", "/api/v2/dags?limit=100")["dags"]}
                if health["scheduler"]["status"] == "healthy" and PGDR_DAGS <= dags:
                    return self
            except (urllib.error.URLError, ConnectionError, KeyError, TimeoutError):
                pass
            time.sleep(2)
        self.stop()
        raise TimeoutError(f"airflow standalone was not ready in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
