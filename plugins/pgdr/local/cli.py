"""Break-glass restore: ``python -m pgdr restore`` and ``python -m pgdr list``, for when Airflow is down.

On the worst day Airflow may be down with everything else, its metadata database perhaps on the
very server that failed. This command needs only the DR plan, the connections (``AIRFLOW_CONN_*``
variables or ``--connections FILE``) and the storage target. It runs **the same**
``pgdr_restore`` DAG in this process, on a private, throw-away metadata database, so every check,
the swap rules and the report are those of a restore triggered from the Airflow form; it never
touches the production Airflow's metadata database, scheduler or API server.

``list`` reads the storage target directly: every backup of a database, its status, recovery
point and size, to choose one without the UI.

Exit status: 0 when the restore succeeded (or the dry run planned), 1 when it failed, 2 for bad
arguments. Ctrl-C during the restore drops the half-restored copy (never the live database).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from pgdr.runtime import STOP_REQUESTED_ENV_VAR, VIA_ENV_VAR


def _print(text: str = "") -> None:
    print(text, flush=True)


def load_connections(path: Path) -> dict[str, str]:
    """Read ``{conn_id: connection}`` (Airflow's JSON form or a URI) and return ``AIRFLOW_CONN_*`` variables."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"pgdr: cannot read the connections file {path}: {err}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"pgdr: {path} must hold a JSON object of connection ids to connections")
    env = {}
    for conn_id, value in data.items():
        env[f"AIRFLOW_CONN_{conn_id.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env


def list_backups(database: str) -> int:
    """Print every backup of ``database`` with its status, recovery point and size; newest first."""
    from pgdr.airflow_glue.connections import open_store
    from pgdr.plan import load_plan
    from pgdr.storage.catalog import BackupCatalog

    plan = load_plan()
    db = plan.database(database)
    store, layout = open_store(db.storage, plan)
    catalog = BackupCatalog(store, layout, db.name)
    backups = catalog.backups()
    _print(f"Backups of {db.name!r} in {store.describe(layout.database_prefix(db.name))}, newest first:")
    _print(f"  {'backup':<24} {'status':<11} {'recovery point (UTC)':<26} size")
    for entry in reversed(backups):
        _print(f"  {entry.backup_id:<24} {entry.status:<11} {entry.recovery_point.isoformat():<26} "
               f"{entry.manifest.size_summary()}")
    if not backups:
        _print("  (none)")
    for damaged in catalog.damaged:
        _print(f"  DAMAGED {damaged.backup_id}: {damaged.problem}")
    return 0


class _Progress(threading.Thread):
    """Print each task of the run as it starts and ends, with its duration, from the metadata database."""

    def __init__(self, dag_id: str):
        super().__init__(daemon=True)
        self.dag_id, self.stop, self.seen = dag_id, threading.Event(), {}

    def poll(self) -> None:
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session

        with create_session() as session:
            rows = session.query(TaskInstance.task_id, TaskInstance.state, TaskInstance.start_date, TaskInstance.end_date).filter(
                TaskInstance.dag_id == self.dag_id).all()
        rows.sort(key=lambda row: (row[2] is None, row[2] or 0, row[3] is None, row[3] or 0))
        for task_id, state, start, end in rows:
            state = str(getattr(state, "value", state) or "")
            if self.seen.get(task_id) == state:
                continue
            self.seen[task_id] = state
            if state == "running":
                _print(f"  ... {task_id} started")
            elif state in ("success", "failed", "skipped", "upstream_failed"):
                took = f" in {(end - start).total_seconds():.1f}s" if start and end else ""
                _print(f"  {'ok ' if state == 'success' else '-- ' if state == 'skipped' else 'XX '}{task_id} {state}{took}")

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self.poll()
            except Exception as err:  # noqa: BLE001 - progress is a courtesy; the run's outcome is read after
                if os.environ.get("PGDR_DEBUG"):
                    _print(f"(progress: {err!r})")


def _stop(signum, frame) -> None:
    """Ctrl-C: interrupt the running task (it drops its own half-restored copy) and stop every later one."""
    if not os.environ.get(STOP_REQUESTED_ENV_VAR):
        _print("\npgdr: stopping (Ctrl-C). The running task cleans up after itself; no later task will run.")
    os.environ[STOP_REQUESTED_ENV_VAR] = "1"
    raise KeyboardInterrupt


def restore(args: argparse.Namespace) -> int:
    """Run ``pgdr_restore`` in this process with the command's fields as the form's; return the exit status."""
    from pgdr.local.runner import load_dag

    given = {"database": args.database, "backup": args.backup, "mode": args.mode, "confirm": args.confirm,
             "target_name": args.target_name, "tables": args.tables, "target_conn_id": args.target_conn_id,
             "dry_run": args.dry_run}
    conf = {key: value for key, value in given.items() if value is not None}  # the form's defaults for the rest
    _print(f"pgdr: restoring {args.database!r} from {args.backup!r} ({args.mode}) with the pgdr_restore DAG, in this process")
    dag = load_dag("pgdr_restore")
    progress = _Progress("pgdr_restore")
    progress.start()
    signal.signal(signal.SIGINT, _stop)
    started = time.monotonic()
    try:
        dag_run = dag.test(run_conf=conf)
    except KeyboardInterrupt:
        progress.stop.set()
        _print("\npgdr: interrupted. The live database was not touched; a half-restored copy made by this run is "
               "dropped by the restore task as it stops (look for <database>_restored_* / _restoring_* if it was not).")
        return 130
    except Exception as err:  # noqa: BLE001 - the form's own refusal (a wrong field), said as the UI says it
        progress.stop.set()
        _print(f"pgdr: the request was refused: {err}")
        return 2
    finally:
        progress.stop.set()
    progress.join(2)
    progress.poll()
    return _summarise(dag_run, time.monotonic() - started)


def _summarise(dag_run, seconds: float) -> int:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    from pgdr.incident import render_plan

    def xcom(task_id: str):
        with create_session() as session:
            value = session.query(XComModel.value).filter_by(
                dag_id="pgdr_restore", run_id=dag_run.run_id, task_id=task_id, key="return_value").scalar()
        return json.loads(value) if isinstance(value, str) else value

    state = str(getattr(dag_run.state, "value", dag_run.state))
    planned, report = xcom("plan_restore"), xcom("write_report")
    if planned:
        _print("\nRestore plan:\n" + render_plan(planned))
    if report:
        _print("\nFinal state:")
        for role, facts in (report.get("final_state") or {}).items():
            where = f"{facts['size_bytes'] / 1e6:.1f} MB" if facts.get("exists") else "does not exist"
            closed = "" if facts.get("allows_connections", True) else ", connections disabled"
            _print(f"  {role:<13}: {facts['name']} ({where}{closed})")
        _print(f"\nReport: {report['report']}")
    _print(f"\npgdr_restore {state} in {seconds:.1f}s.")
    if os.environ.get(STOP_REQUESTED_ENV_VAR):
        _print("pgdr: stopped by Ctrl-C before the restore finished.")
        return 130
    if state != "success":
        _print("The live database was not changed unless the report says it was; the task errors are above.")
    return 0 if state == "success" else 1


def _private_airflow() -> Path:
    """Point Airflow at a fresh, throw-away home with its own SQLite metadata database; migrate it."""
    from pgdr.local.runner import local_airflow_env, migrate_metadata_db

    home = Path(tempfile.mkdtemp(prefix="pgdr-breakglass-"))
    env = local_airflow_env(home)
    env["AIRFLOW__LOGGING__LOGGING_LEVEL"] = os.environ.get("PGDR_LOG_LEVEL", "WARNING")
    os.environ.update(env)
    _print(f"pgdr: private Airflow metadata database in {home} (the production Airflow is not used)")
    migrate_metadata_db(env)
    return home


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pgdr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", type=Path, help="the DR plan (default: $PGDR_PLAN or include/pgdr.yaml)")
    parser.add_argument("--connections", type=Path, help="a JSON file of {conn_id: connection}, as AIRFLOW_CONN_* values")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="list the backups of a database, from the storage target")
    listing.add_argument("--database", required=True)
    run = commands.add_parser("restore", help="restore a database with the pgdr_restore DAG, without a running Airflow")
    run.add_argument("--database", required=True, help="a database of the DR plan")
    run.add_argument("--backup", default="latest-verified", help="latest-verified (default), latest, a backup id, or a UTC time")
    run.add_argument("--mode", default="new-database", help="new-database (default) or replace")
    run.add_argument("--confirm", help="replace mode: the live database's name, typed exactly")
    run.add_argument("--target-name", help="new-database mode: the new database's name")
    run.add_argument("--tables", action="append", help='a table to restore, as SQL writes it ("Sales Dept".orders); repeat for more')
    run.add_argument("--target-conn-id", help="restore onto another server of the plan (new-database mode)")
    run.add_argument("--dry-run", action="store_true", help="print the restore plan and stop")
    keygen = commands.add_parser("keygen", help="print a new master key for client-side encryption, as an Airflow connection")
    keygen.add_argument("--key-id", help="the new key's id (default: key-<UTC date and time>)")
    args = parser.parse_args(argv)
    if args.command == "keygen":
        return print_new_key(args.key_id)

    if args.plan:
        os.environ["PGDR_PLAN"] = str(args.plan.resolve())
    if args.connections:
        os.environ.update(load_connections(args.connections))
    from pgdr.errors import PgdrError

    if args.command == "list":
        try:
            return list_backups(args.database)
        except PgdrError as err:
            _print(f"pgdr: {err}")
            return 1
    home = _private_airflow()
    os.environ[VIA_ENV_VAR] = f"the command line (python -m pgdr restore) as {_who()}"
    try:
        return restore(args)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def print_new_key(key_id: str | None) -> int:
    """Print a fresh master key as the Airflow connection that holds it (to stdout only, once)."""
    import json
    from datetime import UTC, datetime

    from pgdr.storage.encryption import KEY_ID, new_master_key

    key_id = key_id or f"key-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    if not KEY_ID.match(key_id):
        _print(f"pgdr: {key_id!r} is not a key id: letters, digits and _.:- only, at most 128.")
        return 2
    connection = {"conn_type": "generic", "login": key_id, "password": new_master_key(), "extra": {"previous_keys": {}}}
    _print(f"# A new master key {key_id!r}. Keep a copy in your key escrow: backups encrypted under it cannot be")
    _print("# restored without it. Rotating: move the connection's current login/password into previous_keys first.")
    _print(json.dumps(connection))
    return 0


def _who() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


if __name__ == "__main__":
    sys.exit(main())
