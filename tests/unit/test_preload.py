"""The Celery workers' preload: what it imports starts no thread (a fork after it is safe), it corrects the task
supervisor's wait for an exiting task, and the configuration docker-compose.yaml names is Airflow's own plus the
preload."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_the_preload_imports_its_libraries_and_starts_no_thread():
    code = (
        "import threading, sys\n"
        "import pgdr.airflow_glue.preload as p\n"
        "assert 'great_expectations' in sys.modules and p.SECONDS, p.SECONDS\n"
        "assert p.SUPERVISOR_WAITS_ON_EXIT  # pgdr.airflow_glue.task_exit, in the pool processes the worker forks\n"
        "print(threading.active_count(), sorted(p.SECONDS))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT / "plugins")},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert out.splitlines()[-1].startswith("1 ["), out  # the main thread only


def test_compose_points_the_workers_at_airflows_celery_config_plus_the_preload():
    from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG
    from pgdr.airflow_glue.celery_config import CELERY_CONFIG

    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    setting = compose["x-airflow-common"]["environment"]["AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS"]
    assert setting == "pgdr.airflow_glue.celery_config.CELERY_CONFIG"
    assert {k: v for k, v in CELERY_CONFIG.items() if k != "imports"} == DEFAULT_CELERY_CONFIG
    assert CELERY_CONFIG["imports"] == ("pgdr.airflow_glue.preload",)
