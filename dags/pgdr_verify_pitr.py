"""
### pgdr_verify_pitr: every PITR chain recovered to a moment on a worker, and proven exact

A WAL archive nobody has replayed is a hope. For each server under point-in-time recovery,
after each base backup (`pgdr_base_backups` asset event) and daily:

1. **plan_recovery**: two heartbeat rows are written on the live server a second apart, their
   WAL is archived, and the recovery target is the moment between them. The newest base backup
   that ended before it is chosen, with its chain (full + incrementals).
2. **recover_cluster** (setup): every segment from the chain's start is in the archive (a gap
   is named with the window it costs), the chain is read once (SHA-256 of the stored bytes,
   every file checked against PostgreSQL's manifest as it is extracted; `pg_verifybackup` for a
   gzip'd base backup stored before 2026-12), `pg_combinebackup` joins the chain, `pg_verifybackup` checks
   the result, and a scratch cluster on the worker (same major version, private socket, no
   archiving) replays archived WAL up to the target and promotes.
3. **check_recovery_target**: the first heartbeat is there, the second is not, and every older
   heartbeat is there: the target was hit exactly.
4. **check_databases**: `pg_amcheck`, sequences and Great Expectations suites on every plan
   database of the server, as recovered.
5. **stop_cluster** (teardown): the scratch cluster is stopped and removed, whatever happened.
6. **record_verification**: `verification.json` next to the base backup: verified or failed,
   the achieved recovery point, replay time and WAL bytes replayed.

**When it fails**: *WAL segment ... is missing*: the archive has a gap; take a full base backup
now. *The check against PostgreSQL's manifest rejected* (*pg_verifybackup rejected*): the stored
base backup is damaged. *archive_command is failing*:
fix the server's archiver. *missed its target*: replay was not exact; investigate before relying
on PITR. *server binaries*: install the base backup's PostgreSQL major on the worker
(`$PGDR_PG_BIN`).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronDataIntervalTimetable, Param, dag, setup, task, task_group, teardown
from pgdr.airflow_glue.assets import BASE_BACKUP_ASSET
from pgdr.airflow_glue.defaults import default_args
from pgdr.airflow_glue.notify import run_callbacks
from pgdr.airflow_glue.parsing import builds
from pgdr.plan import load_plan
from pgdr.tasks import call

PLAN = load_plan()


@dag(
    dag_id="pgdr_verify_pitr",
    schedule=AssetOrTimeSchedule(
        timetable=CronDataIntervalTimetable("30 5 * * *", timezone="UTC"), assets=[BASE_BACKUP_ASSET]
    )
    if PLAN.servers
    else None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # a leftover scratch cluster is then never another live run's
    tags=["pgdr", "verify", "pitr", "disaster-recovery"],
    default_args=default_args(PLAN, execution_timeout=timedelta(hours=6)),
    **run_callbacks(),
    params={
        "server": Param(
            None,
            type=["null", "string"],
            enum=[None, *PLAN.server_names],
            title="Server",
            values_display={"null": "(the servers of the triggering events, or all)"},
            description="Verify this server only (default: the servers of the triggering events, or all).",
        ),
    },
    doc_md=__doc__,
)
def pgdr_verify_pitr():
    @task(retries=0)
    def find_servers() -> list[str]:
        """Decide which servers this run verifies."""
        return call("verify_pitr.run_find_servers")

    @task(map_index_template="{{ pgdr_server }}")
    def plan_recovery(server: str) -> dict:
        """Write heartbeats, archive their WAL, choose the target and the chain."""
        return call("verify_pitr.run_plan_recovery", server)

    @setup
    @task(map_index_template="{{ pgdr_server }}")
    def recover_cluster(recovery: dict) -> dict:
        """Check WAL, download and check the chain, combine, and recover a scratch cluster to the target."""
        return call("verify_pitr.run_recover_cluster", recovery)

    @task(map_index_template="{{ pgdr_server }}")
    def check_recovery_target(cluster: dict) -> dict:
        """Every heartbeat up to the target is recovered, none after it."""
        return call("verify_pitr.run_check_target", cluster)

    @task(map_index_template="{{ pgdr_server }}")
    def check_databases(cluster: dict) -> dict:
        """pg_amcheck, sequences and GX suites of each plan database on the recovered server."""
        return call("verify_pitr.run_check_databases", cluster)

    @teardown
    @task(map_index_template="{{ pgdr_server }}")
    def stop_cluster(server: str) -> bool:
        """Stop and remove the scratch cluster, whatever happened."""
        return call("verify_pitr.run_stop_cluster", server)

    # all_done so that a failed verification is recorded too; it then fails itself.
    @task(trigger_rule="all_done", on_failure_callback=None, map_index_template="{{ pgdr_server }}")
    def record_verification(server: str) -> dict:
        """Write verified or failed, with the achieved recovery point, next to the base backup."""
        return call("verify_pitr.run_record_pitr_verification", server)

    @task_group
    def verify(server: str):
        recovery = plan_recovery(server)
        cluster = recover_cluster(recovery)
        target_checked = check_recovery_target(cluster)
        databases_checked = check_databases(cluster)
        stopped = stop_cluster(server)
        target_checked >> databases_checked >> stopped >> record_verification(server)
        cluster >> stopped

    verify.expand(server=find_servers())


if builds("pgdr_verify_pitr"):  # all of them, except under pgdr's dag.test() of another DAG
    pgdr_verify_pitr()
