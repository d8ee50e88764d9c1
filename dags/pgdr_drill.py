"""
### pgdr_drill: the monthly DR drill, measured against the plan

An end-to-end recovery rehearsal of every database in the plan (or those named in the form),
on the schedule of the plan's `drill` section (default: the first of each month, 03:00 UTC):

1. **rehearse_backup**: a fresh backup through the same code as `pgdr_backup` (scenario
   `full-restore`), or the newest verified backup (scenario `latest-verified`). Scenario
   `primary-target-lost` rehearses a lost region or bucket: every step reads the database's first
   second copy (`copies`) instead, never its storage target, and the RPO is what the copy holds; a
   database without a copy fails, saying that losing its target would lose every backup.
2. **create_scratch** (setup) / **drop_scratch** (teardown): an isolated scratch database.
3. **restore_timed**: checksum, download and `pg_restore`, each timed.
4. **check_timed**: integrity checks and Great Expectations, each timed.
5. **negative_control**: a private copy of one backup file is corrupted; verification must
   reject it. A drill whose negative control passes undetected fails.
6. **measure**: RTO achieved (from fetching the backup to a validated database) against the
   plan's RTO; RPO achieved from the catalog (age of the newest verified backup, worst gap
   between backups over 30 days) against the plan's RPO.
   For each server under point-in-time recovery, **rehearse_pitr** recovers it to the end of its
   WAL archive in a scratch cluster and reports the **RPO achieved**: the drill's start minus the
   newest heartbeat in the recovered cluster, against the server's `rpo`.
7. **publish_report**: markdown, a self-contained HTML page with a trend chart, and JSON under
   the storage target's `v1/reports/drills/`; a Slack summary; the HTML by e-mail.

A missed target is reported with an action item, not a crash. **When it fails**: a phase
failed or the negative control was not rejected; the report's action items say what to do.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, setup, task, task_group, teardown
from pgdr.airflow_glue.deadlines import dag_deadline
from pgdr.airflow_glue.defaults import default_args
from pgdr.airflow_glue.notify import run_callbacks
from pgdr.airflow_glue.parsing import builds
from pgdr.plan import load_plan
from pgdr.tasks import call

PLAN = load_plan()


@dag(
    dag_id="pgdr_drill",
    schedule=PLAN.drill.schedule,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["pgdr", "drill", "disaster-recovery"],
    default_args=default_args(PLAN, execution_timeout=timedelta(hours=4)),
    deadline=dag_deadline(PLAN, "pgdr_drill"),
    **run_callbacks(),
    params={
        "databases": Param(
            None,
            type=["null", "array"],
            items={"type": "string", "enum": PLAN.database_names},
            title="Databases",
            description="Rehearse only these databases (default: all in the plan).",
        ),
        "scenario": Param(
            "full-restore",
            type="string",
            enum=["full-restore", "latest-verified", "primary-target-lost"],
            title="Scenario",
            description="full-restore: take a fresh backup, then restore it. latest-verified: restore the newest "
            "verified backup, as an incident restore would. primary-target-lost: the storage targets are gone (a lost "
            "region, a deleted bucket): restore the newest verified backup from each database's second copy, RPO "
            "measured from what the copy holds.",
        ),
    },
    doc_md=__doc__,
)
def pgdr_drill():
    @task(retries=0)
    def select_databases() -> list[str]:
        """The databases to rehearse."""
        return call("drill.select_databases")

    @task(map_index_template="{{ pgdr_database }}")
    def rehearse_backup(database: str) -> dict:
        """A fresh backup (or the newest verified one), timed."""
        return call("drill.run_rehearse_backup", database)

    @setup
    @task(map_index_template="{{ pgdr_database }}")
    def create_scratch(database: str) -> str:
        """An isolated scratch database for the rehearsal."""
        return call("drill.run_create_scratch", database)

    @task(map_index_template="{{ pgdr_database }}")
    def restore_timed(database: str, backup: dict, scratch: str) -> dict:
        """Checksum, download and restore, each timed."""
        return call("drill.run_restore_timed", database, backup)

    @task(map_index_template="{{ pgdr_database }}")
    def check_timed(database: str, backup: dict, scratch: str) -> dict:
        """Integrity checks and validation, each timed."""
        return call("drill.run_check_timed", database, backup)

    @task(map_index_template="{{ pgdr_database }}")
    def negative_control(database: str, backup: dict) -> dict:
        """Corrupt a private copy of one file: verification must reject it."""
        return call("drill.run_negative_control", database, backup)

    @teardown
    @task(map_index_template="{{ pgdr_database }}")
    def drop_scratch(database: str, scratch: str) -> bool:
        """Drop the scratch database, whatever happened."""
        return call("drill.run_drop_scratch", database)

    @task(trigger_rule="all_done", on_failure_callback=None, map_index_template="{{ pgdr_database }}")
    def measure(database: str) -> dict:
        """RTO and RPO achieved against the plan, whatever happened."""
        return call("drill.run_measure", database)

    @task(map_index_template="{{ pgdr_server }}")
    def rehearse_pitr(server: str) -> dict:
        """Point-in-time recovery to the end of the archive: the RPO achieved, from the newest heartbeat recovered."""
        return call("drill.run_rehearse_pitr", server)

    @task(trigger_rule="all_done", on_failure_callback=None)
    def publish_report() -> dict:
        """The report (markdown, HTML, JSON), Slack and e-mail; fails if a drill failed."""
        return call("drill.run_publish_report")

    @task_group
    def rehearse(database: str):
        backup = rehearse_backup(database)
        scratch = create_scratch(database)
        backup >> scratch
        restored = restore_timed(database, backup, scratch)
        checked = check_timed(database, backup, scratch)
        control = negative_control(database, backup)
        dropped = drop_scratch(database, scratch)
        restored >> checked >> dropped
        [dropped, control] >> measure(database)

    report = publish_report()
    rehearse.expand(database=select_databases()) >> report
    if PLAN.servers:
        rehearse_pitr.expand(server=PLAN.server_names) >> report


if builds("pgdr_drill"):  # all of them, except under pgdr's dag.test() of another DAG
    pgdr_drill()
