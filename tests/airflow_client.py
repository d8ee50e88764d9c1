"""A tiny client for Airflow 3's REST API (``/api/v2``), shared by the standalone and Celery harnesses."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from urllib.parse import quote


class AirflowClient:
    """Trigger and watch DAG runs over HTTP. ``token`` is a JWT when the auth manager asks for one."""

    base_url: str
    token: str | None = None

    def log_tail(self, chars: int = 6000) -> str:  # each harness says where its logs are
        return ""

    def api(self, method: str, path: str, body: dict | None = None, timeout: float = 30):
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def login(self, username: str, password: str) -> None:
        """Get a JWT from the simple auth manager (the way the UI logs in)."""
        request = urllib.request.Request(
            self.base_url + "/auth/token",
            data=json.dumps({"username": username, "password": password}).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            self.token = json.loads(response.read())["access_token"]

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        """Unpause ``dag_id``, trigger it with ``conf`` and return the run id."""
        self.api("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        run = self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}})
        return run["dag_run_id"]

    def task_instances(self, dag_id: str, run_id: str, **filters) -> list[dict]:
        """Every task instance of a run (page by page: the API returns at most 100 at a time)."""
        query = "".join(f"&{key}={quote(str(value), safe='')}" for key, value in filters.items())
        path = f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances?limit=100{query}"
        found: list[dict] = []
        while True:
            page = self.api("GET", f"{path}&offset={len(found)}")
            found += page["task_instances"]
            if not page["task_instances"] or len(found) >= page["total_entries"]:
                return found

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 300) -> dict:
        """Poll until the run ends; return it (with ``task_states``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                run = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}")
            except (urllib.error.URLError, ConnectionError, TimeoutError):  # an api-server restarting
                time.sleep(2)
                continue
            if run["state"] in ("success", "failed"):
                tis = self.task_instances(dag_id, run_id)
                run["task_states"] = {
                    t["task_id"] if t["map_index"] < 0 else f"{t['task_id']}[{t['map_index']}]": t["state"] for t in tis
                }
                return run
            time.sleep(2)
        raise TimeoutError(f"{dag_id} run {run_id} did not finish in {timeout}s:\n{self.log_tail()}")
