"""``make demo``: pgdr's main job on the embedded default, start to finish, on one machine.

Starts (or reuses) an embedded PostgreSQL 18 server under ``.pgdr/postgres`` with the sample
database ``shop``, points a private Airflow (``.pgdr/airflow``, SQLite) at this checkout, and
runs the DAGs with ``dag.test()``: a full backup to the local folder ``.pgdr/backups``, then a
verify-restore of that backup (restore, integrity checks, Great Expectations), and a DR drill
that measures RTO and RPO against the plan. It then prints where everything is. Run it again at any time: it reuses the server and the Airflow home.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pgdr.plan import PROJECT_ROOT

STATE_DIR = PROJECT_ROOT / ".pgdr"


def _say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def prepare(plan_path: Path | None = None):
    """Start the embedded server with the sample database and configure Airflow; return the server."""
    from pgdr.local.embedded import EmbeddedServer, create_sample_database
    from pgdr.local.runner import local_airflow_env, migrate_metadata_db

    env = local_airflow_env(STATE_DIR / "airflow")
    os.environ.update(env)
    if plan_path:
        os.environ["PGDR_PLAN"] = str(plan_path)
    port_file = STATE_DIR / "postgres.port"
    port = int(port_file.read_text()) if port_file.exists() else 0
    server = EmbeddedServer(STATE_DIR / "postgres", port=port)
    _say(f"Starting the embedded PostgreSQL 18 server ({server.data_dir})")
    try:
        server.start()
    except Exception:  # noqa: BLE001 - the remembered port may be taken now: take a fresh one
        server = EmbeddedServer(STATE_DIR / "postgres")
        server.start()
    port_file.write_text(str(server.port))
    print(f"    listening on 127.0.0.1:{server.port}")
    if not _database_exists(server, "shop"):
        _say("Creating the sample database 'shop' (schemas, FKs, enum, partitions, a large object, ~100k rows)")
        create_sample_database(server, "shop")
    os.environ["AIRFLOW_CONN_PGDR_SHOP"] = server.connection_uri("shop")
    os.environ["AIRFLOW_CONN_PGDR_RESTORE"] = server.restore_connection_uri()
    _say("Preparing Airflow's metadata database (SQLite, .pgdr/airflow)")
    migrate_metadata_db(env)
    return server


def _database_exists(server, name: str) -> bool:
    import psycopg

    with psycopg.connect(**server.dsn("postgres")) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def run(dag_id: str, **kwargs):
    """Run one pgdr DAG with ``dag.test()`` and fail loudly if the run does not succeed."""
    from pgdr.local.runner import load_dag

    _say(f"Running {dag_id}")
    started = time.monotonic()
    dag_run = load_dag(dag_id).test(**kwargs)
    state = str(getattr(dag_run.state, "value", dag_run.state))
    print(f"    {dag_id}: {state} in {time.monotonic() - started:.1f}s")
    if state != "success":
        sys.exit(f"{dag_id} did not succeed (state {state}); its task logs are above.")
    return dag_run


def report_backups() -> None:
    """Print where the newest backup of every database is, with its headline numbers."""
    from pgdr.airflow_glue.connections import open_store
    from pgdr.plan import load_plan
    from pgdr.storage.catalog import BackupCatalog

    plan = load_plan()
    for db in plan.databases:
        store, layout = open_store(db.storage, plan)
        entry = BackupCatalog(store, layout, db.name).latest()
        manifest = entry.manifest
        _say(f"Newest backup of '{db.name}': {manifest.backup_id} ({entry.status})")
        print(f"    recovery point : {manifest.recovery_point.isoformat()}")
        print(f"    tables / rows  : {len(manifest.row_counts)} / {sum(manifest.row_counts.values())}")
        print(f"    size           : {manifest.size_summary()}")
        print(f"    location       : {store.describe(layout.backup_prefix(db.name, manifest.backup_id))}")
        print(f"    manifest       : {store.describe(layout.manifest_key(db.name, manifest.backup_id))}")


def verify_newest_backups() -> None:
    """Run pgdr_verify_restore on the newest backup of every database and print the outcome."""
    from pgdr.airflow_glue.connections import open_store
    from pgdr.messages import format_duration
    from pgdr.plan import load_plan
    from pgdr.storage.catalog import VERIFICATION_PHASES, BackupCatalog

    plan = load_plan()
    for db in plan.databases:
        store, layout = open_store(db.storage, plan)
        catalog = BackupCatalog(store, layout, db.name)
        newest = catalog.latest()
        run("pgdr_verify_restore", run_conf={"database": db.name, "backup_id": newest.backup_id})
        entry = catalog.get(newest.backup_id)
        record = entry.verification or {}
        _say(f"Verification of '{db.name}' backup {entry.backup_id}: {entry.status.upper()}")
        if record.get("restore_seconds") is not None:
            verdict = "within" if record["rto_met"] else "BREACHES"
            print(f"    restore time   : {format_duration(record['restore_seconds'])} ({verdict} the RTO of {format_duration(record['rto_target_seconds'])})")
        for phase in VERIFICATION_PHASES:
            facts = record.get("phases", {}).get(phase)
            if facts:
                    print(f"      {phase:<16}: {format_duration(facts['seconds'])}")
        integrity = record.get("integrity", {})
        if integrity:
            print(f"    integrity      : {integrity['tables_checked']} tables, {integrity['rows_checked']} rows match the manifest; pg_amcheck clean")
        validation = record.get("validation", {})
        if validation:
            print(f"    validation     : {validation['expectations'] - validation['failed']} of {validation['expectations']} expectations passed ({', '.join(validation['user_suites'])} + baseline)")
            print(f"    report         : {validation['report']}")


def run_drill() -> None:
    """Run the DR drill and print the report's path and headline numbers."""
    dag_run = run("pgdr_drill")
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        value = session.query(XComModel.value).filter_by(
            dag_id="pgdr_drill", run_id=dag_run.run_id, task_id="publish_report", key="return_value"
        ).scalar()
    result = json.loads(value) if isinstance(value, str) else value
    _say(f"DR drill {result['drill_id']}: {result['status'].upper()}")
    for line in result["headline"]:
        print(f"    {line}")
    print(f"    report         : {result['report']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", type=Path, help="a DR plan other than include/pgdr.yaml")
    parser.add_argument("--keep-running", action="store_true", help="leave the embedded server running")
    args = parser.parse_args(argv)

    server = prepare(args.plan)
    try:
        run("pgdr_backup")
        report_backups()
        verify_newest_backups()
        run_drill()
    finally:
        if not args.keep_running:
            server.stop()
    _say("Done. Backups are in " + json.dumps(str(STATE_DIR / "backups")))


if __name__ == "__main__":
    main()
