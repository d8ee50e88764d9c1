"""Break-glass restore: ``python -m pgdr restore``, ``recover-server``, ``list`` and ``undelete``, for when Airflow
is down.

On the worst day Airflow may be down with everything else, its metadata database perhaps on the
very server that failed. This command needs only the DR plan, the connections (``AIRFLOW_CONN_*``
variables or ``--connections FILE``) and the storage target. It runs **the same**
``pgdr_restore`` DAG in this process, on a private, throw-away metadata database, so every check,
the swap rules and the report are those of a restore triggered from the Airflow form; it never
touches the production Airflow's metadata database, scheduler or API server.

``recover-server`` recovers a whole lost server of the plan onto the host it runs on, from its
base backups and WAL archive, with no Airflow at all (:mod:`pgdr.physical.server_recovery`).

``list`` reads the storage target directly: every backup of a database, its status, recovery
point and size, to choose one without the UI. ``undelete`` brings back what someone deleted on a
target under S3 Object Lock (the locked versions behind the delete markers).

The terminal shows one line a task as it starts and ends, the restore plan and the final state;
every log record goes to a file whose path is printed first (``--verbose`` streams them too), and
a failed task's error and last log lines are printed with that path.

Exit status: 0 when the restore succeeded (or the dry run planned), 1 when it failed, 2 for bad
arguments. Ctrl-C during the restore drops the half-restored copy (never the live database).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

from pgdr.local.console import Console, default_log_path, plain
from pgdr.runtime import STOP_REQUESTED_ENV_VAR, VIA_ENV_VAR

_print = plain


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


def _database_target(database: str, restore_from: str | None):
    """``(plan, db, target)``: the plan in force, its ``database`` and the storage target ``--from`` names (``None``:
    its own); ``None`` when ``--from`` names no target of it (said on the terminal)."""
    from pgdr.plan import load_plan

    plan = load_plan()
    db = plan.database(database)
    try:
        return plan, db, db.storage_named(restore_from)
    except ValueError as err:
        _print(f"pgdr: --from: {err}.")
        return None


def list_backups(database: str, restore_from: str | None = None) -> int:
    """Print every backup of ``database`` with its status, recovery point and size; newest first.

    :param restore_from: a copy target of the database (``--from``) to list instead of its storage target.
    """
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog

    found = _database_target(database, restore_from)
    if found is None:
        return 1
    plan, db, target = found
    store, layout = open_store(target, plan)
    catalog = BackupCatalog(store, layout, db.name)
    backups = catalog.backups()
    _print(f"Backups of {db.name!r} in {store.describe(layout.database_prefix(db.name))}, newest first:")
    _print(f"  {'backup':<24} {'status':<11} {'recovery point (UTC)':<26} size")
    for entry in reversed(backups):
        _print(
            f"  {entry.backup_id:<24} {entry.status:<11} {entry.recovery_point.isoformat():<26} "
            f"{entry.manifest.size_summary()}"
        )
    if not backups:
        _print("  (none)")
    for damaged in catalog.damaged:
        _print(f"  DAMAGED {damaged.backup_id}: {damaged.problem}")
    return 0


def undelete_backups(
    database: str | None, restore_from: str | None = None, dry_run: bool = False, server: str | None = None
) -> int:
    """Bring back the objects of ``database`` (or of PITR ``server``: its base backups and WAL archive) hidden by
    delete markers on a storage target under Object Lock.

    On such a target pgdr never makes a delete marker (its retention deletes versions once their lock has ended),
    so every marker there is someone else's delete (stolen credentials, a mistaken ``aws s3 rm``): the locked
    versions behind it are intact, and removing the marker makes the newest of them the object again.
    """
    from pgdr.airflow_glue.connections import open_archive, open_store
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.physical.catalog import BaseBackupCatalog
    from pgdr.plan import load_plan

    if (database is None) == (server is None):
        _print("pgdr: undelete: give --database or --server (one of them).")
        return 2
    plan = load_plan()
    subject = plan.database(database) if database else plan.server(server)
    own = subject.storage if database else subject.pitr.storage
    try:
        target = (subject.storage_named if database else subject.pitr.storage_named)(restore_from)
    except ValueError as err:
        _print(f"pgdr: --from: {err}.")
        return 1
    if target.object_lock is None:
        _print(
            f"pgdr: undelete is for a storage target under Object Lock, and {target.name!r} has no object_lock in the "
            "plan: there pgdr's own retention may have left the delete markers (on a versioned bucket), and removing "
            "them would bring back backups it pruned. Use aws s3api list-object-versions and delete-object "
            "--version-id by hand if you must."
        )
        return 1
    # removing a marker is a delete: the pruner's to make
    if database:
        store, layout = open_store(target, plan, pruning=True)
        prefixes, what = [layout.database_prefix(subject.name)], f"{subject.name!r}"
    else:
        store, layout, _archive = open_archive(subject, plan, None if target == own else target, pruning=True)
        prefixes = [layout.server_prefix(subject.name), layout.wal_segments_prefix(subject.name)]
        what = f"server {subject.name!r}"
    markers = [m for prefix in prefixes for m in store.hidden(prefix)]
    where = " and ".join(store.describe(prefix) for prefix in prefixes)
    if not markers:
        _print(f"pgdr: nothing of {what} is hidden by a delete marker in {where}.")
        return 0
    _print(f"pgdr: {len(markers)} objects of {what} in {where} are hidden by delete markers:")
    for marker in markers[:20]:
        _print(f"  {marker.key} (deleted {marker.modified:%Y-%m-%d %H:%M:%S} UTC)")
    if len(markers) > 20:
        _print(f"  ... and {len(markers) - 20} more")
    if dry_run:
        _print("pgdr: --dry-run: nothing changed.")
        return 0
    store.undelete(markers)
    option = f"--database {subject.name}" if database else f"--server {subject.name}"
    if database:
        count = f"{len(BackupCatalog(store, layout, subject.name).backups())} backups"
        check = f"python -m pgdr list {option}{f' --from {target.name}' if restore_from else ''}"
    else:
        count = f"{len(BaseBackupCatalog(store, layout, subject.name).backups())} base backups"
        check = "pgdr_health checks its WAL for gaps"
    _print(
        f"pgdr: removed {len(markers)} delete markers; {what} has {count} there again ({check}). Find out who deleted "
        "them."
    )
    return 0


def verify_evidence(since: str | None, until: str | None) -> int:
    """Walk the evidence log: every receipt present, linked to the one before, signed; the receipts dated from
    ``since`` to ``until`` checked against the records they point to. Exit 0 when it all holds, 1 otherwise."""
    from pgdr.airflow_glue.connections import open_store
    from pgdr.airflow_glue.evidence import open_evidence
    from pgdr.evidence_pack import utc_bound
    from pgdr.plan import load_plan

    plan = load_plan()
    evidence = open_evidence(plan)
    if evidence is None:
        _print(
            f"pgdr: the DR plan {plan.path} keeps no evidence log: add an 'evidence:' section (storage, key_conn_id) "
            "and the tasks write a signed receipt of every backup, verification and restore."
        )
        return 1
    report = evidence.verify(
        utc_bound(since), utc_bound(until, end_of_day=True), lambda name: open_store(plan.storages[name], plan)[0]
    )
    _print(f"pgdr: {evidence.describe()}: {report.summary()}.")
    for problem in [*report.problems, *report.record_mismatches][1:]:
        _print(f"  - {problem}")
    return 0 if report.ok else 1


def export_evidence(since: str | None, until: str | None, out: Path | None) -> int:
    """Write the evidence pack of ``since``..``until`` to ``out``: exit 0 when the chain verifies and every promise
    held, 1 when the pack has findings (it is written either way: findings are evidence too)."""
    import hashlib

    from pgdr.airflow_glue.evidence import export_evidence_pack
    from pgdr.errors import PgdrError
    from pgdr.evidence_pack import findings, utc_bound
    from pgdr.plan import load_plan

    if not since or not until or out is None:
        raise PgdrError("evidence export needs the period and a folder: --from 2026-10-01 --to 2026-12-31 --out pack/")
    pack, files = export_evidence_pack(load_plan(), utc_bound(since), utc_bound(until, end_of_day=True))
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    digest = hashlib.sha256(files["pack.json"]).hexdigest()
    _print(f"pgdr: the evidence pack of {since} to {until} is in {out.resolve()} (pack.json SHA-256 {digest}).")
    _print(f"pgdr: {pack['chain']['summary']}.")
    found = findings(pack)
    for line in found:
        _print(f"  - {line}")
    if not found:
        _print("pgdr: no findings: every scheduled backup taken, every restore test passed within its RTO.")
    return 1 if found else 0


class _Progress(threading.Thread):
    """Print each task of the run as it starts and ends, with its duration, from the metadata database.

    It reads the task states with plain SQL on a connection of its own and never imports Airflow nor
    touches its ORM: ``dag.test()`` imports Airflow's models in the main thread while this thread
    runs, and an ORM query here would configure SQLAlchemy's mappers, which imports more models,
    while the main thread holds their module locks (a deadlock that hung the command forever).
    """

    QUERY = (
        "SELECT task_id, map_index, state, (julianday(end_date) - julianday(start_date)) * 86400 FROM task_instance "
        "WHERE dag_id = ? ORDER BY start_date IS NULL, start_date, end_date IS NULL, end_date"
    )

    def __init__(self, metadata_db: Path, dag_id: str):
        super().__init__(name="pgdr-progress", daemon=True)
        self.metadata_db, self.dag_id, self.stop, self.seen = metadata_db, dag_id, threading.Event(), {}

    def poll(self) -> None:
        if not self.metadata_db.exists():
            return
        connection = sqlite3.connect(f"{self.metadata_db.as_uri()}?mode=ro", uri=True, timeout=2)
        try:
            rows = connection.execute(self.QUERY, (self.dag_id,)).fetchall()
        finally:
            connection.close()
        for task_id, map_index, state, seconds in rows:
            name = task_id if map_index is None or map_index < 0 else f"{task_id}[{map_index}]"
            state = state or ""
            if self.seen.get(name) == state:
                continue
            self.seen[name] = state
            took = f" in {seconds:.1f}s" if seconds is not None else ""
            if state == "running":
                _print(f"  ... {name} started")
            elif state == "up_for_retry":
                _print(f"  !! {name} failed{took}; it will be retried")
            elif state in ("success", "failed", "skipped", "upstream_failed"):
                mark = "ok " if state == "success" else "-- " if state == "skipped" else "XX "
                _print(f"  {mark}{name} {state}{took}")

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self.poll()
            except sqlite3.Error as err:  # the database is busy or not created yet: the next poll reads it
                if os.environ.get("PGDR_DEBUG"):
                    _print(f"(progress: {err!r})")


def _stop(signum, frame) -> None:
    """Ctrl-C: interrupt the running task (it drops its own half-restored copy) and stop every later one."""
    if not os.environ.get(STOP_REQUESTED_ENV_VAR):
        _print("\npgdr: stopping (Ctrl-C). The running task cleans up after itself; no later task will run.")
    os.environ[STOP_REQUESTED_ENV_VAR] = "1"
    raise KeyboardInterrupt


def restore(args: argparse.Namespace, home: Path, log_path: Path) -> int:
    """Run ``pgdr_restore`` in this process with the command's fields as the form's; return the exit status."""
    given = {
        "database": args.database,
        "backup": args.backup,
        "mode": args.mode,
        "confirm": args.confirm,
        "target_name": args.target_name,
        "tables": args.tables,
        "target_conn_id": args.target_conn_id,
        "dry_run": args.dry_run,
        "restore_roles": args.restore_roles,
        "restore_role_passwords": args.with_passwords,
        "restore_from": args.restore_from,
        "incident_declared_at": args.declared,
        "incident_id": args.incident,
    }
    conf = {key: value for key, value in given.items() if value is not None}  # the form's defaults for the rest
    _print("pgdr: loading the pgdr_restore DAG")
    from pgdr.local.runner import dag_test, explain_failure, load_dag

    dag = load_dag("pgdr_restore")
    progress = _Progress(home / "airflow.db", "pgdr_restore")
    signal.signal(signal.SIGINT, _stop)
    _print("pgdr: starting the pgdr_restore DAG")
    started, since = time.monotonic(), log_path.stat().st_size
    progress.start()
    try:
        dag_run = dag_test(dag, run_conf=conf)
    except KeyboardInterrupt:
        progress.stop.set()
        _print(
            "\npgdr: interrupted. The live database was not touched; a half-restored copy made by this run is "
            "dropped by the restore task as it stops (look for <database>_restored_* / _restoring_* if it was not)."
        )
        return 130
    except Exception as err:  # noqa: BLE001 - the form's own refusal (a wrong field), said as the UI says it
        progress.stop.set()
        _print(f"pgdr: the request was refused: {err}")
        return 2
    finally:
        progress.stop.set()
    progress.join(5)
    progress.poll()
    status = _summarise(dag_run, time.monotonic() - started)
    if status == 1:
        explain_failure("pgdr_restore", dag_run.run_id, log_path, since)
    return status


def _summarise(dag_run, seconds: float) -> int:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    from pgdr.incident import render_plan

    def xcom(task_id: str):
        with create_session() as session:
            value = (
                session.query(XComModel.value)
                .filter_by(dag_id="pgdr_restore", run_id=dag_run.run_id, task_id=task_id, key="return_value")
                .scalar()
            )
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
        _print("The live database was not changed unless the report says it was; what failed is below.")
    return 0 if state == "success" else 1


def recover_server(args: argparse.Namespace) -> int:
    """Recover a whole server of the plan onto this host (no Airflow services); return the exit status."""
    from datetime import UTC, datetime

    from pgdr.incident import InvalidRestoreRequest, parse_timestamp
    from pgdr.incident_review import read_incident

    target = None if args.to.strip() == "latest" else parse_timestamp(args.to)
    if args.to.strip() != "latest" and target is None:
        _print(f"pgdr: --to must be 'latest' or a UTC time such as 2026-11-26T09:40:59Z; got {args.to!r}.")
        return 2
    try:
        incident = read_incident(
            {"incident_declared_at": args.declared, "incident_id": args.incident}, datetime.now(UTC)
        )
    except InvalidRestoreRequest as err:
        _print(f"pgdr: {str(err).replace('incident_declared_at', '--declared').replace('incident_id', '--incident')}")
        return 2
    declared = parse_timestamp(incident["declared_at"]) if incident["declared_at"] else None
    args.incident = incident["id"]
    log_path = (args.log_file or default_log_path(log_folder(), "pgdr-recover-server")).resolve()
    _print(f"pgdr: the log records go to {log_path}" + ("" if args.verbose else " (--verbose streams them)"))
    with Console(log_path, verbose=args.verbose):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        faulthandler.register(signal.SIGUSR1, file=2, all_threads=True)
        status = _recover_server(args, target, declared)
    _print(f"pgdr: the whole log is {log_path}")
    return status


def _recover_server(args: argparse.Namespace, target, declared) -> int:
    from pgdr.airflow_glue.connections import resources
    from pgdr.airflow_glue.evidence import server_recovery_receipt
    from pgdr.errors import PgdrError, StorageUnavailable
    from pgdr.messages import server_recovery_failed, server_recovery_summary
    from pgdr.physical.server_recovery import (
        ServerRecovery,
        ServerRecoveryRefused,
        plan_server_recovery,
        render_server_plan,
        render_server_report,
    )

    server = None
    actor = f"the command line (python -m pgdr recover-server) as {_who()}"
    try:
        res = resources()
        server = res.plan.server(args.server)
        try:
            source = server.pitr.storage_named(args.restore_from)
        except ValueError as err:
            _print(f"pgdr: --from: {err}. Nothing was changed.")
            return 2
        source = None if source is server.pitr.storage else source
        if args.dry_run:
            with tempfile.TemporaryDirectory(prefix="pgdr-recover-plan-") as work:
                plan = plan_server_recovery(
                    server, res, target, args.data_dir, Path(work), args.delta, args.pause, source, args.proof
                )
            _print("Recovery plan (dry run, nothing was changed):\n" + render_server_plan(plan))
            return 0
        recovery = ServerRecovery(
            server,
            res,
            target,
            args.data_dir,
            port=args.port,
            pause=args.pause,
            delta=args.delta,
            os_user=args.os_user,
            declared_at=declared,
            incident_id=args.incident,
            triggered_by=actor,
            source=source,
            proof=args.proof,
        )
        try:
            report = recovery.run(say=lambda text: _print(f"pgdr: {text}"))
        except (PgdrError, KeyboardInterrupt) as err:  # a refusal too: the incident's timeline has the attempt
            server_recovery_receipt(res.plan, server.name, actor, None, str(err) or "interrupted (Ctrl-C)")
            raise
        server_recovery_receipt(res.plan, server.name, actor, report)
    except ServerRecoveryRefused as err:  # nothing was changed: the on-call reads it here, the team needs no alert
        _print(f"pgdr: {err}")
        return 1
    except PgdrError as err:
        text = str(err)
        if isinstance(err, StorageUnavailable) and server is not None and server.pitr.copies and not args.restore_from:
            text += (
                f" Server {server.name!r} also has its base backups and WAL in "
                f"{', '.join(repr(c.name) for c in server.pitr.copies)}: to recover from there, run this again with "
                f"--from {server.pitr.copies[0].name}."
            )
        _print(f"pgdr: {text}")
        _tell_the_team(server_recovery_failed(args.server, args.to.strip(), socket.getfqdn(), text))
        return 1
    except KeyboardInterrupt:
        _print("\npgdr: interrupted. The old host was not touched; run again with --delta to finish this directory.")
        return 130
    _print("\n" + render_server_report(report))
    _print(f"pgdr: report stored at {report['report']}")
    _tell_the_team(server_recovery_summary(report))
    return 0


def _tell_the_team(text: str) -> None:
    """Post a break-glass outcome to the plan's Slack, as the DAG's report does; never fail the command for it."""
    from pgdr.airflow_glue.notify import send_slack

    try:
        if send_slack(text, None, {}):
            _print("pgdr: the outcome was posted to Slack.")
        else:
            _print("pgdr: no Slack connection is configured (the plan's notify.slack_conn_id): tell the team yourself.")
    except Exception as err:  # noqa: BLE001 - the recovery is done; a Slack outage must not hide that
        _print(f"pgdr: could not post the outcome to Slack ({type(err).__name__}: {err}); tell the team yourself.")


def _private_airflow() -> Path:
    """Point Airflow at a fresh, throw-away home with its own SQLite metadata database, and create its tables.

    This imports Airflow and all its models in the main thread, before any other thread starts.
    """
    from pgdr.local.runner import create_metadata_db, local_airflow_env

    home = Path(tempfile.mkdtemp(prefix="pgdr-breakglass-"))
    env = local_airflow_env(home)
    # INFO: the task logs go to the log file, and a failed task's lines are found there by dag.test()'s markers.
    env["AIRFLOW__LOGGING__LOGGING_LEVEL"] = os.environ.get("PGDR_LOG_LEVEL", "INFO")
    os.environ.update(env)  # before Airflow is imported: it reads its configuration once
    _print(
        f"pgdr: importing Airflow and preparing a private metadata database in {home} (the production Airflow is "
        "not used)"
    )
    if not create_metadata_db(home):
        _print("pgdr: the private metadata database was built from Airflow's models; later runs start from a copy")
    return home


def _common_options(parser: argparse.ArgumentParser, on_subcommand: bool) -> None:
    """``--plan``, ``--connections`` and friends, accepted before or after the subcommand.

    On a subcommand their default is SUPPRESS, so that an option given before the subcommand is not
    overwritten by the subcommand's default.
    """
    default = argparse.SUPPRESS if on_subcommand else None
    parser.add_argument(
        "--plan", type=Path, default=default, help="the DR plan (default: $PGDR_PLAN or include/pgdr.yaml)"
    )
    parser.add_argument(
        "--connections",
        type=Path,
        default=default,
        help="a JSON file of {conn_id: connection}, as AIRFLOW_CONN_* values",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS if on_subcommand else False,
        help="stream every log record to the terminal too (they always go to the log file)",
    )
    parser.add_argument(
        "--log-file",
        type=Path,
        default=default,
        help="where the log records go (default: pgdr-restore-<time>-<pid>.log, or pgdr-recover-server-..., in "
        "$PGDR_LOG_DIR, else the temporary directory)",
    )


def log_folder() -> Path:
    """Return where a command's log file goes unless ``--log-file`` says: ``$PGDR_LOG_DIR`` (created if missing), else
    the temporary directory."""
    folder = os.environ.get("PGDR_LOG_DIR")
    if not folder:
        return Path(tempfile.gettempdir())
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pgdr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _common_options(parser, on_subcommand=False)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="list the backups of a database, from the storage target")
    _common_options(listing, on_subcommand=True)
    listing.add_argument("--database", required=True)
    listing.add_argument("--from", dest="restore_from", help="a copy target of the database (the plan's copies)")
    run = commands.add_parser("restore", help="restore a database with the pgdr_restore DAG, without a running Airflow")
    _common_options(run, on_subcommand=True)
    run.add_argument("--database", required=True, help="a database of the DR plan")
    run.add_argument(
        "--from",
        dest="restore_from",
        help="read the backup from this copy target of the database (the plan's copies), e.g. when its storage "
        "target is unreachable",
    )
    run.add_argument(
        "--backup",
        default="latest-verified",
        help="latest-verified (default), latest (a PITR server: the end of its WAL archive), latest-dump, a backup "
        "id, or a UTC time",
    )
    run.add_argument(
        "--mode",
        default="new-database",
        help="new-database (default), replace, or server (the whole server, onto its plan's restore target; on the "
        "new host itself, recover-server is the direct way)",
    )
    run.add_argument("--confirm", help="replace mode: the live database's name; server mode: the server's; exactly")
    run.add_argument("--target-name", help="new-database mode: the new database's name")
    run.add_argument(
        "--tables", action="append", help='a table to restore, as SQL writes it ("Sales Dept".orders); repeat for more'
    )
    run.add_argument("--target-conn-id", help="restore onto another server of the plan (new-database mode)")
    run.add_argument("--dry-run", action="store_true", help="print the restore plan and stop")
    run.add_argument(
        "--declared",
        help="when the incident was declared, UTC (default: now): MTTR and the data-loss window count from it",
    )
    run.add_argument("--incident", help="the incident's id (a ticket such as INC-2041), for the report")
    run.add_argument(
        "--restore-roles",
        action="store_true",
        help="create the roles the backup names that the server lacks, as on the source server",
    )
    run.add_argument(
        "--with-passwords",
        action="store_true",
        help="with --restore-roles: give the created roles their password hashes from the backup",
    )
    whole = commands.add_parser(
        "recover-server",
        help="recover a whole lost server of the plan onto this host, from its base backups and WAL archive",
    )
    _common_options(whole, on_subcommand=True)
    whole.add_argument("--server", required=True, help="a server of the plan (its servers: entry)")
    whole.add_argument(
        "--to", required=True, help="'latest' (the end of the WAL archive) or a UTC time, e.g. 2026-11-26T09:40:59Z"
    )
    whole.add_argument("--data-dir", required=True, type=Path, help="the new data directory (empty or missing)")
    whole.add_argument("--port", type=int, help="the port the recovered server listens on (default: its own)")
    whole.add_argument("--pause", action="store_true", help="stop at the target without promoting, for a look")
    whole.add_argument(
        "--delta", action="store_true", help="reuse a non-empty data directory: replace only the files that differ"
    )
    whole.add_argument("--os-user", help="the account the server runs as (needed when run as root)")
    whole.add_argument(
        "--declared", help="when the failure was declared, UTC (default: now): ends the data-loss window"
    )
    whole.add_argument("--incident", help="the incident's id (a ticket such as INC-2041), for the report")
    whole.add_argument(
        "--from",
        dest="restore_from",
        help="recover from this copy of the server's archive and base backups (the plan's pitr.copies), e.g. when "
        "its storage target is unreachable",
    )
    whole.add_argument(
        "--proof",
        choices=["quick", "thorough"],
        help="how the server is proven before it is handed over (default: the plan's recovery_proof, else quick): "
        "quick checks every page, unique keys, counts, sequences and your suites; thorough also looks every row up "
        "in every index and runs pgdr's baseline expectations (about 4 s more per GB on two cores)",
    )
    whole.add_argument("--dry-run", action="store_true", help="print the recovery plan and stop")
    undelete = commands.add_parser(
        "undelete",
        help="bring back a database's backups, or a server's base backups and WAL, someone deleted on a storage "
        "target under Object Lock (its locked versions are intact behind delete markers)",
    )
    _common_options(undelete, on_subcommand=True)
    undelete.add_argument("--database", help="a protected database: its logical backups")
    undelete.add_argument("--server", help="a PITR server: its base backups and WAL archive")
    undelete.add_argument("--from", dest="restore_from", help="a copy target of it (the plan's copies)")
    undelete.add_argument("--dry-run", action="store_true", help="list what is hidden and stop")
    evidence = commands.add_parser(
        "evidence", help="the evidence log: verify its chain of signed receipts (the plan's evidence section)"
    )
    _common_options(evidence, on_subcommand=True)
    evidence.add_argument("action", choices=["verify", "export"])
    evidence.add_argument(
        "--from",
        dest="since",
        help="verify: check records of receipts from this UTC date or time on; export: the period's first day (needed)",
    )
    evidence.add_argument("--to", dest="until", help="... up to this UTC date (the whole day) or time")
    evidence.add_argument("--out", type=Path, help="export: the folder the pack is written to (made if missing)")
    keygen = commands.add_parser(
        "keygen", help="print a new master key for client-side encryption, as an Airflow connection"
    )
    keygen.add_argument("--key-id", help="the new key's id (default: key-<UTC date and time>)")
    args = parser.parse_args(argv)
    if args.command == "keygen":
        return print_new_key(args.key_id)

    if args.plan:
        os.environ["PGDR_PLAN"] = str(args.plan.resolve())
    if args.connections:
        os.environ.update(load_connections(args.connections))
    from pgdr.errors import PgdrError

    if args.command in ("list", "undelete", "evidence"):
        try:
            if args.command == "evidence" and args.action == "export":
                return export_evidence(args.since, args.until, args.out)
            if args.command == "evidence":
                return verify_evidence(args.since, args.until)
            if args.command == "undelete":
                return undelete_backups(args.database, args.restore_from, args.dry_run, args.server)
            return list_backups(args.database, args.restore_from)
        except PgdrError as err:
            _print(f"pgdr: {err}")
            return 1
    if args.command == "recover-server":
        return recover_server(args)
    log_path = (args.log_file or default_log_path(log_folder(), "pgdr-restore")).resolve()
    _print(
        f"pgdr: restoring {args.database!r} from {args.backup!r} ({args.mode}) with the pgdr_restore DAG, in this "
        "process"
    )
    _print(f"pgdr: the log records go to {log_path}" + ("" if args.verbose else " (--verbose streams them)"))
    with Console(log_path, verbose=args.verbose):
        # `kill -USR1 <pid>` writes every thread's stack to the log (fd 2 now): what a command that seems stuck waits
        # for.
        faulthandler.register(signal.SIGUSR1, file=2, all_threads=True)
        home = _private_airflow()
        os.environ[VIA_ENV_VAR] = f"the command line (python -m pgdr restore) as {_who()}"
        try:
            return restore(args, home, log_path)
        finally:
            shutil.rmtree(home, ignore_errors=True)
            _print(f"pgdr: the whole log is {log_path}")


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
    from pgdr.local.runner import exit_now

    exit_now(main())
