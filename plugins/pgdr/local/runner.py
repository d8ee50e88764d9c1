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
import threading
import time
from contextlib import contextmanager
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
        # dag.test() stores the DAGs of the folder before its run, among them those its tasks trigger (pgdr_restore's
        # pgdr_verify_restore). By default Airflow skips a DAG stored less than 30 s before: under a plan changed
        # meanwhile, the triggered DAG was the old plan's, and the trigger was refused (its database not a choice).
        "AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL": "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PLUGINS_FOLDER), os.environ.get("PYTHONPATH")])),
    }


def metadata_db_template() -> Path | None:
    """Where this user keeps an empty metadata database of the installed Airflow, for :func:`create_metadata_db`.

    Keyed by the versions of Airflow and its providers (their tables), so an upgrade makes a new one. In
    ``$PGDR_CACHE_DIR``, else ``$XDG_CACHE_HOME/pgdr``, else ``~/.cache/pgdr``; ``None`` for an account with no
    home (never a directory other users could write into).
    """
    import hashlib
    from importlib import metadata

    names = sorted(
        f"{dist.metadata['Name']}=={dist.version}"
        for dist in metadata.distributions()
        if (dist.metadata["Name"] or "").lower().startswith("apache-airflow")
    )
    key = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    if os.environ.get("PGDR_CACHE_DIR"):
        cache = Path(os.environ["PGDR_CACHE_DIR"])
    elif os.environ.get("XDG_CACHE_HOME"):
        cache = Path(os.environ["XDG_CACHE_HOME"]) / "pgdr"
    else:
        try:
            cache = Path.home() / ".cache" / "pgdr"
        except (RuntimeError, KeyError):  # no $HOME and no entry in the password database
            return None
    return cache / f"airflow-metadata-{key}.sqlite"


def create_metadata_db(airflow_home: Path) -> bool:
    """Create the empty SQLite metadata database of the private Airflow at ``airflow_home`` (its environment already
    in force, see :func:`local_airflow_env`), and import Airflow's models in the calling thread.

    Building it from Airflow's models (``initdb``) takes about 10 seconds: most of the start of a break-glass
    command. The first run keeps a copy of the empty database (:func:`metadata_db_template`); later runs copy it in
    milliseconds, after checking it, and build it afresh if the copy is missing, unreadable or not a metadata
    database. Returns whether the copy was used.
    """
    template, db = metadata_db_template(), airflow_home / "airflow.db"
    copied = template is not None and _copy_template(template, db)  # before Airflow opens the file
    from airflow.models import import_all_models
    from sqlalchemy.orm import configure_mappers

    import_all_models()  # in this thread, before any other starts (pgdr.local.cli's progress thread)
    configure_mappers()
    if copied:
        return True
    from airflow.utils.db import initdb

    initdb()
    if template is not None:
        _keep_template(db, template)
    return False


def _copy_template(template: Path, db: Path) -> bool:
    import shutil
    import sqlite3

    if not template.is_file():
        return False
    try:
        shutil.copyfile(template, db)
        with sqlite3.connect(db) as conn:
            checked = conn.execute("PRAGMA quick_check").fetchone()
            revision = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            runs = conn.execute("SELECT count(*) FROM dag_run").fetchone()
        conn.close()
        if checked == ("ok",) and revision and runs == (0,):
            return True
        reason = f"quick_check {checked}, alembic revision {revision}, {runs} DAG runs"
    except (OSError, sqlite3.Error) as err:
        reason = f"{type(err).__name__}: {err}"
    import logging

    logging.getLogger(__name__).warning(
        "The cached empty Airflow metadata database %s is not usable (%s): building a new one.", template, reason
    )
    db.unlink(missing_ok=True)
    return False


def _keep_template(db: Path, template: Path) -> None:
    """Keep an empty copy of ``db`` as ``template`` (written aside, then renamed: a parallel run never reads half)."""
    import logging
    import sqlite3

    partial = template.with_name(f".{template.name}.{os.getpid()}")
    try:
        template.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with sqlite3.connect(db) as source, sqlite3.connect(partial) as copy:
            source.backup(copy)  # consistent, write-ahead log included
        source.close()
        copy.close()
        os.replace(partial, template)
    except (OSError, sqlite3.Error) as err:
        partial.unlink(missing_ok=True)
        logging.getLogger(__name__).info("Could not keep a copy of the empty metadata database: %s", err)


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


def dag_test(dag, **test_kwargs):
    """Run ``dag`` with ``dag.test(**test_kwargs)``, its idle polls brisk (see :func:`brisk_dag_test_polls`), and the
    DAG files it parses building only ``dag`` (:mod:`pgdr.airflow_glue.parsing`)."""
    from pgdr.airflow_glue.parsing import only_building

    with brisk_dag_test_polls(), only_building(dag.dag_id):
        return dag.test(**test_kwargs)


# dag.test() sleeps a whole second each time a pass of its loop finds nothing to run, which is every level of a chain
# of skipped or upstream-failed tasks: a dry-run restore spent 5 of its 13 s so. Its first idle polls in a row (a
# second's worth) are made this short; later ones (a task waiting for its retry delay) keep the second.
BRISK_POLL_S, BRISK_POLLS = 0.05, 20


class _BriskPolls:
    """The state of :func:`brisk_dag_test_polls` in this process (one loop at a time runs dag.test())."""

    lock = threading.Lock()
    users = 0
    sleep = None  # time.sleep as it was
    dag_file = None  # the file of DAG.test, whose sleeps are the polls
    streak, last_end = 0, 0.0  # idle polls in a row, and when the last one ended


def _polls_briskly(seconds: float) -> None:
    """``time.sleep`` while :func:`brisk_dag_test_polls` is in force: dag.test()'s own idle polls are shortened, every
    other caller (any thread) sleeps as asked. Imports nothing and takes no lock (threads of an Airflow process)."""
    caller = sys._getframe(1).f_code
    if caller.co_name == "test" and caller.co_filename == _BriskPolls.dag_file:
        now = time.monotonic()
        _BriskPolls.streak = _BriskPolls.streak + 1 if now - _BriskPolls.last_end < 0.5 else 1
        if _BriskPolls.streak <= BRISK_POLLS:
            seconds = min(seconds, BRISK_POLL_S)
        _BriskPolls.sleep(seconds)
        _BriskPolls.last_end = time.monotonic()
        return
    _BriskPolls.sleep(seconds)


@contextmanager
def brisk_dag_test_polls():
    """Shorten ``dag.test()``'s idle polls while the block runs: Airflow's loop has no setting for them."""
    from airflow.sdk.definitions import dag as dag_module

    with _BriskPolls.lock:
        if _BriskPolls.users == 0:
            _BriskPolls.dag_file, _BriskPolls.sleep = dag_module.__file__, time.sleep
            _BriskPolls.streak, _BriskPolls.last_end = 0, 0.0
            time.sleep = _polls_briskly
        _BriskPolls.users += 1
    try:
        yield
    finally:
        with _BriskPolls.lock:
            _BriskPolls.users -= 1
            if _BriskPolls.users == 0:
                time.sleep = _BriskPolls.sleep


def exit_now(status: int):
    """End the process with ``status`` as soon as what it wrote is out: the exit handlers run (logging flushes and
    closes its files, ``weakref.finalize`` cleanups run), the standard streams are flushed, and the interpreter's
    teardown of the heap Airflow leaves (its models, the in-process execution API and its threads) is skipped: it took
    2.6 s of a 12.6 s dry-run restore, after the last line was printed."""
    import atexit

    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can be said on it
                pass
        os._exit(status)


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
    dag_run = dag_test(load_dag(dag_id), **test_kwargs)
    state = str(getattr(dag_run.state, "value", dag_run.state))
    detail(f"{dag_id}: {state} in {time.monotonic() - started:.1f}s")
    if state != "success":
        explain_failure(dag_id, dag_run.run_id, log_path, since)
    return dag_run, state
