"""Running pgdr's DAGs in one process, without a scheduler: for the demo and the tests.

:func:`local_airflow_env` points Airflow at a private home (SQLite metadata database, this
checkout's ``dags/`` and ``plugins/``); :func:`load_dag` imports one DAG file fresh, so that it
reads the plan currently in force; :func:`run_dag` runs it with ``dag.test()`` and says how it
ended, naming the failed task, its error and its last log lines.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

from pgdr.local.console import detail, say, task_excerpt
from pgdr.plan import PROJECT_ROOT

DAGS_FOLDER = PROJECT_ROOT / "dags"
PLUGINS_FOLDER = PROJECT_ROOT / "plugins"


def local_airflow_env(airflow_home: Path) -> dict[str, str]:
    """Return the environment variables of a private, single-process Airflow."""
    airflow_home.mkdir(parents=True, exist_ok=True)
    runtime = airflow_home / "run"
    runtime.mkdir(exist_ok=True)
    runtime.chmod(0o700)
    return {
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO"),
        "XDG_RUNTIME_DIR": str(runtime),
        # dag.test() cannot run DAGs with Deadline Alerts (see pgdr.airflow_glue.deadlines).
        "PGDR_DEADLINES": "off",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PLUGINS_FOLDER), os.environ.get("PYTHONPATH")])),
    }


def migrate_metadata_db(env: dict[str, str]) -> None:
    """Create or upgrade the Airflow metadata database of ``env`` (``airflow db migrate``)."""
    airflow = Path(sys.executable).with_name("airflow")
    result = subprocess.run([str(airflow), "db", "migrate"], env={**os.environ, **env}, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def load_dag(dag_id: str):
    """Import ``dags/<dag_id>.py`` afresh and return its DAG."""
    path = DAGS_FOLDER / f"{dag_id}.py"
    spec = importlib.util.spec_from_file_location(f"pgdr_dagfile_{dag_id}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # DAG files call their @dag function without keeping the result; calling it again
    # builds the same DAG from the same (already loaded) plan.
    factory = getattr(module, dag_id, None)
    if factory is None:
        raise LookupError(f"{path} defines no @dag function {dag_id!r}")
    return factory()


def failed_tasks(dag_id: str, run_id: str) -> list[tuple[str, int]]:
    """Return ``(task_id, map_index)`` of the run's failed task instances, first failure first."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (
            session.query(TaskInstance.task_id, TaskInstance.map_index, TaskInstance.end_date)
            .filter_by(dag_id=dag_id, run_id=run_id, state="failed")
            .all()
        )
    return [(task_id, map_index) for task_id, map_index, _end in sorted(rows, key=lambda row: str(row[2]))]


def explain_failure(dag_id: str, run_id: str, log_path: Path | None, since: int) -> None:
    """Say which tasks of a run failed and their errors, the first one's last log lines, and where the log is."""
    for number, (task_id, map_index) in enumerate(failed_tasks(dag_id, run_id)):
        name = task_id if map_index < 0 else f"{task_id}[{map_index}]"
        error, lines = task_excerpt(log_path, since, task_id, map_index) if log_path else ("", [])
        first, *more = error.splitlines() or [""]
        detail(f"task {name} failed" + (f": {first}" if first else ""))
        for line in more:
            detail(f"  {line}")
        if lines and number == 0:  # the first failure is the cause; later ones (a report, a teardown) follow from it
            detail(f"the last log lines of {name}:")
            for line in lines:
                detail(f"  | {line}")
    if log_path:
        detail(f"the whole log: {log_path}")


def run_dag(dag_id: str, log_path: Path | None = None, **test_kwargs):
    """Run one pgdr DAG with ``dag.test()``, say how it ended and, if it failed, which task and why.

    :param log_path: the file the run's log records go to (see :class:`pgdr.local.console.Console`).
    :return: ``(dag_run, state)``.
    """
    say(f"Running {dag_id}")
    since = log_path.stat().st_size if log_path and log_path.exists() else 0
    started = time.monotonic()
    dag_run = load_dag(dag_id).test(**test_kwargs)
    state = str(getattr(dag_run.state, "value", dag_run.state))
    detail(f"{dag_id}: {state} in {time.monotonic() - started:.1f}s")
    if state != "success":
        explain_failure(dag_id, dag_run.run_id, log_path, since)
    return dag_run, state
