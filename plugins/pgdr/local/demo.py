"""``make demo``: pgdr's main job on the embedded default, start to finish, on one machine.

Starts (or reuses) an embedded PostgreSQL 18 server under ``.pgdr/postgres`` with the sample
database ``shop``, points a private Airflow (``.pgdr/airflow``, SQLite) at this checkout, and
runs the DAGs with ``dag.test()``: a full backup to the local folder ``.pgdr/backups``, then a
verify-restore of that backup (restore, integrity checks, Great Expectations), and a DR drill
that measures RTO and RPO against the plan. Then point-in-time recovery: the server archives its
WAL with barman-cloud to a local S3 endpoint (moto's server, started here), a base backup is
taken and verified by recovering it in a scratch cluster, a few rows are written and "lost" with
a DELETE, and ``pgdr_restore`` brings the database back as of the second before the DELETE. It
then prints where everything is. Run it again at any time: it reuses the server and the Airflow home.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from pgdr.local.console import Console, default_log_path, detail, say
from pgdr.plan import PROJECT_ROOT

# The demo's (and make ui's) server, Airflow homes and port file; tests point it elsewhere.
STATE_DIR = Path(os.environ.get("PGDR_STATE_DIR") or PROJECT_ROOT / ".pgdr")


DEMO_KEYS = {
    "AWS_ACCESS_KEY_ID": "pgdr-demo",
    "AWS_SECRET_ACCESS_KEY": "pgdr-demo-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def start_local_s3(plan) -> dict:
    """Start moto's S3 server for the plan's PITR targets (barman-cloud writes only to S3); return what the server
    needs.

    :return: ``settings`` and ``environment`` for the embedded server (its archive_command), or
        empty ones when the plan has no PITR server or the archiver is not installed.
    """
    from pgdr.errors import PgdrError
    from pgdr.physical.archive import ArchiveAccess, WalArchive, archiver_bin_dir, check_archiver_runs_as_server_user
    from pgdr.storage.layout import PhysicalLayout

    if not plan.servers:
        return {"settings": {}, "environment": {}}
    try:
        bin_dir = archiver_bin_dir()
        check_archiver_runs_as_server_user(bin_dir, 65534 if os.geteuid() == 0 else None)
    except PgdrError as err:
        say(f"Point-in-time recovery is skipped: {err}")
        return {"settings": {}, "environment": {}}
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from pgdr.postgres.binaries import free_port

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    endpoint = f"http://127.0.0.1:{port}"
    server = plan.servers[0]
    target = server.pitr.storage
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=DEMO_KEYS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DEMO_KEYS["AWS_SECRET_ACCESS_KEY"],
    )
    client.create_bucket(Bucket=target.bucket)
    os.environ[f"AIRFLOW_CONN_{target.aws_conn_id.upper()}"] = json.dumps(
        {
            "conn_type": "aws",
            "login": DEMO_KEYS["AWS_ACCESS_KEY_ID"],
            "password": DEMO_KEYS["AWS_SECRET_ACCESS_KEY"],
            "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        }
    )
    access = ArchiveAccess(endpoint, "us-east-1", DEMO_KEYS["AWS_ACCESS_KEY_ID"], DEMO_KEYS["AWS_SECRET_ACCESS_KEY"])
    archive = WalArchive(
        target.bucket, PhysicalLayout(target.prefix), server.name, access, compression=server.pitr.wal_compression
    )
    say(f"Local S3 endpoint (moto) on {endpoint}: the WAL archive is {archive.describe()}")
    timeout = int(server.pitr.archive_timeout.total_seconds())
    return {"settings": archive.server_settings(timeout, bin_dir), "environment": access.environment()}


def prepare(plan_path: Path | None = None):
    """Start the embedded server with the sample database and configure Airflow; return the server."""
    from pgdr.local.embedded import EmbeddedServer, create_sample_database, state_dir_for
    from pgdr.local.runner import local_airflow_env, migrate_metadata_db
    from pgdr.plan import load_plan

    env = local_airflow_env(STATE_DIR / "airflow")
    os.environ.update(env)
    if plan_path:
        os.environ["PGDR_PLAN"] = str(plan_path)
    archiving = start_local_s3(load_plan())
    port_file = STATE_DIR / "postgres.port"
    port = int(port_file.read_text()) if port_file.exists() else 0
    # Under a private checkout (/root, mode 0700) the server's data directory goes where its user can reach it.
    server_dir = state_dir_for(STATE_DIR / "postgres")
    server = EmbeddedServer(server_dir, port=port, **archiving)
    say(f"Starting the embedded PostgreSQL 18 server ({server.data_dir})")
    try:
        server.start()
    except Exception:  # noqa: BLE001 - the remembered port may be taken now: take a fresh one
        server = EmbeddedServer(server_dir, **archiving)
        server.start()
    port_file.write_text(str(server.port))
    detail(f"listening on 127.0.0.1:{server.port}")
    if not _database_exists(server, "shop"):
        say("Creating the sample database 'shop' (schemas, FKs, enum, partitions, a large object, ~100k rows)")
        create_sample_database(server, "shop")
    os.environ["AIRFLOW_CONN_PGDR_SHOP"] = server.connection_uri("shop")
    os.environ["AIRFLOW_CONN_PGDR_RESTORE"] = server.restore_connection_uri()
    say("Preparing Airflow's metadata database (SQLite, .pgdr/airflow)")
    migrate_metadata_db(env)
    return server


def _database_exists(server, name: str) -> bool:
    import psycopg

    with psycopg.connect(**server.dsn("postgres")) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def run(dag_id: str, **kwargs):
    """Run one pgdr DAG with ``dag.test()``; stop the demo, naming the failed task and the log, if it fails."""
    from pgdr.local.runner import run_dag

    dag_run, state = run_dag(dag_id, LOG_PATH, **kwargs)
    if state != "success":
        raise DemoFailed(f"{dag_id} did not succeed (state {state}).")
    return dag_run


class DemoFailed(Exception):
    """A DAG of the demo did not succeed; what failed has been said."""


def report_backups() -> None:
    """Print where the newest backup of every database is, with its headline numbers."""
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.plan import load_plan

    plan = load_plan()
    for db in plan.databases:
        store, layout = open_store(db.storage, plan)
        entry = BackupCatalog(store, layout, db.name).latest()
        manifest = entry.manifest
        say(f"Newest backup of '{db.name}': {manifest.backup_id} ({entry.status})")
        detail(f"recovery point : {manifest.recovery_point.isoformat()}")
        detail(f"tables / rows  : {len(manifest.row_counts)} / {sum(manifest.row_counts.values())}")
        detail(f"size           : {manifest.size_summary()}")
        detail(f"location       : {store.describe(layout.backup_prefix(db.name, manifest.backup_id))}")
        detail(f"manifest       : {store.describe(layout.manifest_key(db.name, manifest.backup_id))}")


def verify_newest_backups() -> None:
    """Run pgdr_verify_restore on the newest backup of every database and print the outcome."""
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import VERIFICATION_PHASES, BackupCatalog
    from pgdr.messages import format_duration
    from pgdr.plan import load_plan
    from pgdr.records import VerificationRecord

    plan = load_plan()
    for db in plan.databases:
        store, layout = open_store(db.storage, plan)
        catalog = BackupCatalog(store, layout, db.name)
        newest = catalog.latest()
        run("pgdr_verify_restore", run_conf={"database": db.name, "backup_id": newest.backup_id})
        entry = catalog.get(newest.backup_id)
        record = entry.verification or VerificationRecord(entry.status, entry.backup_id)
        say(f"Verification of '{db.name}' backup {entry.backup_id}: {entry.status.upper()}")
        if record.restore_seconds is not None:
            verdict = "within" if record.rto_met else "BREACHES"
            detail(
                f"restore time   : {format_duration(record.restore_seconds)} ({verdict} the RTO of "
                f"{format_duration(record.rto_target_seconds)})"
            )
        for phase in VERIFICATION_PHASES:
            facts = record.phases.get(phase)
            if facts:
                detail(f"  {phase:<16}: {format_duration(facts['seconds'])}")
        integrity = record.integrity or {}
        if integrity:
            detail(
                f"integrity      : {integrity['tables_checked']} tables, {integrity['rows_checked']} rows match the "
                "manifest; pg_amcheck clean"
            )
        validation = record.validation or {}
        if validation:
            detail(
                f"validation     : {validation['expectations'] - validation['failed']} of "
                f"{validation['expectations']} expectations passed ({', '.join(validation['user_suites'])} + "
                "baseline)"
            )
            detail(f"report         : {validation['report']}")
        privileges = record.privileges
        if privileges:
            given = ", ".join(
                f"{privileges[key]} {label}"
                for key, label in (
                    ("owners", "owners"),
                    ("grants", "grants"),
                    ("default_privileges", "default privileges"),
                    ("database_properties", "database settings and grants"),
                )
            )
            detail(f"privileges     : given back after the checks: {given}")


def run_drill() -> None:
    """Run the DR drill and print the report's path and headline numbers."""
    dag_run = run("pgdr_drill")
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        value = (
            session.query(XComModel.value)
            .filter_by(dag_id="pgdr_drill", run_id=dag_run.run_id, task_id="publish_report", key="return_value")
            .scalar()
        )
    result = json.loads(value) if isinstance(value, str) else value
    say(f"DR drill {result['drill_id']}: {result['status'].upper()}")
    for line in result["headline"]:
        detail(f"{line}")
    detail(f"report         : {result['report']}")


def take_and_verify_base_backup(server) -> None:
    """A full base backup of the plan's PITR server, proven by recovering it in a scratch cluster."""
    from pgdr.plan import load_plan

    plan = load_plan()
    if not plan.servers or not server.settings:
        return
    pitr_server = plan.servers[0]
    run("pgdr_basebackup", run_conf={"server": pitr_server.name, "kind": "full"})
    run("pgdr_verify_pitr", run_conf={"server": pitr_server.name})


def show_point_in_time_recovery(server) -> None:
    """A "lost" DELETE undone by restoring the database as of the second before it."""
    import psycopg

    from pgdr.airflow_glue.connections import server_endpoint
    from pgdr.physical.heartbeat import switch_and_wait_archived
    from pgdr.plan import load_plan

    plan = load_plan()
    if not plan.servers or not server.settings:
        return
    pitr_server = plan.servers[0]
    database = plan.database(pitr_server.databases[0])
    say(
        f"Point-in-time recovery: writing 5 rows into {database.dbname}.public.pitr_demo, then losing them with a "
        "DELETE"
    )
    with psycopg.connect(**server.dsn(database.dbname), autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS public.pitr_demo (id serial PRIMARY KEY, note text, at timestamptz DEFAULT "
            "clock_timestamp())"
        )
        conn.execute(
            "INSERT INTO public.pitr_demo (note) SELECT 'written by make demo #' || g FROM generate_series(1, 5) g"
        )
        time.sleep(1.3 - time.time() % 1)
        moment = conn.execute("SELECT date_trunc('second', clock_timestamp() AT TIME ZONE 'UTC')").fetchone()[0]
        time.sleep(1.3 - time.time() % 1)
        deleted = conn.execute("DELETE FROM public.pitr_demo").rowcount
        remaining = conn.execute("SELECT count(*) FROM public.pitr_demo").fetchone()[0]
    stamp = moment.strftime("%Y-%m-%d %H:%M:%S")
    detail(
        f"the last good second: {stamp} UTC; then DELETE removed {deleted} rows ({remaining} left in the live table)"
    )
    switch_and_wait_archived(server_endpoint(pitr_server, plan), pitr_server.pitr.archive_timeout.total_seconds() + 60)
    target = f"{database.dbname}_as_of_{moment:%H%M%S}"
    dag_run = run("pgdr_restore", run_conf={"database": database.name, "backup": stamp, "target_name": target})
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        value = (
            session.query(XComModel.value)
            .filter_by(dag_id="pgdr_restore", run_id=dag_run.run_id, task_id="recover_to_moment", key="return_value")
            .scalar()
        )
    done = json.loads(value) if isinstance(value, str) else value
    recovery = done["pitr"]["recovery"]
    with psycopg.connect(**server.dsn(target)) as conn:
        back = conn.execute("SELECT count(*) FROM public.pitr_demo").fetchone()[0]
    say(f"Restored '{database.name}' as of {stamp} UTC into {target!r}")
    detail(f"achieved recovery point : {recovery['achieved_recovery_point']} (the last transaction replayed)")
    detail(
        f"base backup             : {done['pitr']['base_backup']}, {recovery['wal_bytes_replayed'] / 1e6:.1f} MB of "
        f"WAL replayed in {recovery['replay_seconds']}s"
    )
    detail(f"rows of pitr_demo       : {back} in the restored copy, {remaining} in the live database")
    with psycopg.connect(**server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{target}" WITH (FORCE)')  # the demo leaves nothing behind but backups


LOG_PATH: Path | None = None  # where this run's log records go (set by main)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", type=Path, help="a DR plan other than include/pgdr.yaml")
    parser.add_argument("--keep-running", action="store_true", help="leave the embedded server running")
    parser.add_argument("--verbose", action="store_true", help="stream every log record to the terminal too")
    parser.add_argument("--log-file", type=Path, help="where the log records go (default: .pgdr/logs/demo-<time>.log)")
    args = parser.parse_args(argv)

    global LOG_PATH
    LOG_PATH = (args.log_file or default_log_path(STATE_DIR / "logs", "demo")).resolve()
    with Console(LOG_PATH, verbose=args.verbose):
        say(
            f"pgdr demo: the log records of every task go to {LOG_PATH}"
            + ("" if args.verbose else " (make demo ARGS=--verbose streams them)")
        )
        started = time.monotonic()
        server = None
        try:
            server = prepare(args.plan)
            run("pgdr_backup")
            report_backups()
            verify_newest_backups()
            take_and_verify_base_backup(server)
            run_drill()
            show_point_in_time_recovery(server)
        except DemoFailed as failed:
            say(f"The demo stopped: {failed} What failed and its log lines are above; the whole log is {LOG_PATH}")
            return 1
        finally:
            if server is not None and not args.keep_running:
                server.stop()
        say(f"Done in {time.monotonic() - started:.0f}s. Backups are in " + json.dumps(str(STATE_DIR / "backups")))
    return 0


if __name__ == "__main__":
    from pgdr.local.runner import exit_now

    exit_now(main())
