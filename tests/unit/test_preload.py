"""The Celery workers' preload: what it imports starts no thread (a fork after it is safe), it corrects the task
supervisor's wait for an exiting task, and the configuration docker-compose.yaml names is Airflow's own plus the
preload."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from support import aws_connection

ROOT = Path(__file__).resolve().parents[2]


def test_the_preload_imports_its_libraries_and_starts_no_thread():
    code = (
        "import threading, sys\n"
        "import pgdr.airflow_glue.preload as p\n"
        "assert 'great_expectations' in sys.modules and p.SECONDS, p.SECONDS\n"
        "assert p.SUPERVISOR_WAITS_ON_EXIT  # pgdr.airflow_glue.task_exit, in the pool processes the worker forks\n"
        "print('threads', threading.active_count(), sorted(p.SECONDS))\n"
        # A task forked after it makes its S3 client from botocore files the worker has already parsed.
        "import botocore.loaders as L\n"
        "from support import botocore_read_recorder\n"
        "read = []\n"
        "L.JSONFileLoader.load_file = botocore_read_recorder(read)\n"
        "from airflow.providers.amazon.aws.hooks.s3 import S3Hook\n"
        "from pgdr.airflow_glue.connections import s3_client\n"
        "client = s3_client(S3Hook(aws_conn_id='pgdr_s3'))\n"
        "assert client.meta.endpoint_url == 'http://127.0.0.1:9' and read == [], read\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={"PYTHONPATH": f"{ROOT / 'plugins'}:{ROOT / 'tests'}", "AIRFLOW_CONN_PGDR_S3": aws_connection(9)},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    threads = [line for line in out.splitlines() if line.startswith("threads ")]
    assert threads[0].startswith("threads 1 ["), out  # the main thread only, after the import


def test_compose_points_the_workers_at_airflows_celery_config_plus_the_preload():
    from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG
    from pgdr.airflow_glue.celery_config import CELERY_CONFIG

    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    setting = compose["x-airflow-common"]["environment"]["AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS"]
    assert setting == "pgdr.airflow_glue.celery_config.CELERY_CONFIG"
    assert {k: v for k, v in CELERY_CONFIG.items() if k != "imports"} == DEFAULT_CELERY_CONFIG
    assert CELERY_CONFIG["imports"] == ("pgdr.airflow_glue.preload",)


def test_a_worker_with_an_unreadable_aws_config_still_starts_and_its_tasks_say_what_is_wrong(tmp_path):
    """The read-ahead of botocore's files fails with the worker's AWS config file; the preload logs it and goes on,
    and a task's client then fails with botocore's own message naming the file."""
    config = tmp_path / "aws-config"
    config.write_text("[default\nregion = x\n")  # no closing bracket
    code = (
        "import pgdr.airflow_glue.preload as p\n"
        "assert p.BOTOCORE_LOADERS == {} and p.SUPERVISOR_WAITS_ON_EXIT\n"
        "from airflow.providers.amazon.aws.hooks.s3 import S3Hook\n"
        "from pgdr.airflow_glue.connections import s3_client\n"
        "try:\n"
        "    s3_client(S3Hook(aws_conn_id='pgdr_s3'))\n"
        "except Exception as err:\n"
        "    print('task:', err)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={
            "PYTHONPATH": str(ROOT / "plugins"),
            "AIRFLOW_CONN_PGDR_S3": aws_connection(9),
            "AWS_CONFIG_FILE": str(config),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "pgdr preload: botocore's files not read ahead (Unable to parse config file" in output
    assert f"task: Unable to parse config file: {config}" in output
