"""Running pgdr's DAGs in one process, without a scheduler: for the demo and the tests.

:func:`local_airflow_env` points Airflow at a private home (SQLite metadata database, this
checkout's ``dags/`` and ``plugins/``); :func:`load_dag` imports one DAG file fresh, so that it
reads the plan currently in force; :func:`run_dag` runs it with ``dag.test()``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

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
    result = subprocess.run(
        [str(airflow), "db", "migrate"], env={**os.environ, **env}, capture_output=True, text=True
    )
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
