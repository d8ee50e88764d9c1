"""``make ui``: the Airflow UI on one machine, started and stopped as a new user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from support import wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_make_ui_serves_the_pgdr_dags_with_a_login_and_ctrl_c_stops_everything(tmp_path):
    from celery_cluster import component_processes_left
    from pgdr.postgres.binaries import free_port

    state = tmp_path / "state"
    state.mkdir()
    tmp_path.chmod(0o755)
    state.chmod(0o755)
    ready = tmp_path / "ready.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PGDR_"))}
    env.update(PGDR_STATE_DIR=str(state), PYTHONPATH=str(ROOT / "plugins"))
    process = subprocess.Popen(
        [sys.executable, "-m", "pgdr.local.ui", "--port", str(free_port()), "--ready-file", str(ready)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(lambda: ready.exists() or process.poll() is not None, timeout=400, interval=1)
        assert process.poll() is None, process.stdout.read().decode(errors="replace")[-3000:]
        info = json.loads(ready.read_text())
        request = urllib.request.Request(
            f"{info['url']}/auth/token",
            method="POST",
            headers={"Content-Type": "application/json"},
            data=json.dumps({"username": info["user"], "password": info["password"]}).encode(),
        )
        token = json.loads(urllib.request.urlopen(request, timeout=30).read())["access_token"]
        request = urllib.request.Request(
            f"{info['url']}/api/v2/dags?limit=100", headers={"Authorization": f"Bearer {token}"}
        )
        dags = wait_for(
            lambda: (
                {d["dag_id"] for d in json.loads(urllib.request.urlopen(request, timeout=30).read())["dags"]}
                >= {"pgdr_backup", "pgdr_restore", "pgdr_verify_restore"}
            ),
            timeout=120,
            interval=2,
        )
        assert dags
        with urllib.request.urlopen(f"{info['url']}/dags/pgdr_restore/trigger", timeout=30) as page:
            assert page.status == 200
        # Ctrl-C: the terminal sends SIGINT to the foreground process group.
        os.killpg(process.pid, signal.SIGINT)
        output = process.communicate(timeout=120)[0].decode(errors="replace")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert f"login: admin / {info['password']}" in output and info["url"] in output
    assert "stopped." in output
    time.sleep(1)
    airflow_session = int((state / "ui" / "airflow.pid").read_text())
    assert component_processes_left(state, {process.pid, airflow_session}) == []
