"""
### pgdr_backup: logical backups of every database in the DR plan

For each database in the plan (`include/pgdr.yaml`, or `$PGDR_PLAN`), one mapped task group
(`protect_<server>`: one per source server, whose dumps share the pool `pgdr_<server>`):

1. **back_up**: `pg_dump` in directory format from an exported snapshot (never waiting for a
   lock longer than the plan's `lock_wait_timeout`; a warning, or with `yield_after` giving way,
   when it holds up another session), exact row counts read from the dump itself (the source is
   read once), every file compressed by pg_dump itself (the plan's
   `compression`, gzip:1 by default), checksummed (SHA-256) and uploaded to the plan's storage
   target, and the manifest written **last**. A backup without a manifest does not exist.
   Emits a `pgdr_backups` asset event, which triggers `pgdr_verify_restore` for that backup.
2. **prune_expired**: applies the retention policy (keep the newest N, keep D days, always keep
   the newest verified backup) and removes partial uploads left by killed runs.

Backfills and manual runs with a past logical date skip: a backup can only capture the present.

**SLA**: the run must finish within the tightest RPO of the plan, counted from when it was
queued: Slack warns at 80 %, and at 100 % Slack and the plan's e-mail recipients are told.

**When it fails**: one Slack message per failed run (or a log line if Slack is not set up)
names each failed database, phase and error; a recovery message follows the next good run.
- *cannot connect / refused*: the source server is down or unreachable; the task retries with
  backoff. Check the server, then clear the failed task.
- *refused the credentials*: fix the Airflow connection named in the alert; clear the task.
- *S3 endpoint could not be reached*: storage is down; nothing half-written is visible
  (no manifest). Clear the task when storage is back.
- *connection ... is not defined*: create the Airflow connection the plan names.

A failed backup never deletes an older one: the last good backup stays restorable.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, task, task_group
from pgdr.airflow_glue.assets import BACKUP_ASSET
from pgdr.airflow_glue.deadlines import dag_deadline
from pgdr.airflow_glue.defaults import default_args
from pgdr.airflow_glue.notify import run_callbacks
from pgdr.airflow_glue.parsing import builds
from pgdr.airflow_glue.pools import databases_by_server, pool_name
from pgdr.plan import load_plan
from pgdr.tasks import call

PLAN = load_plan()
# A backup run slower than the tightest RPO breaks that RPO by itself.


@dag(
    dag_id="pgdr_backup",
    schedule=PLAN.backup_schedule,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["pgdr", "backup", "disaster-recovery"],
    default_args=default_args(PLAN, execution_timeout=timedelta(hours=4)),
    deadline=dag_deadline(PLAN, "pgdr_backup"),
    **run_callbacks(),
    doc_md=__doc__,
)
def pgdr_backup():
    @task(outlets=[BACKUP_ASSET], map_index_template="{{ pgdr_database }}")
    def back_up(database: str) -> dict:
        """Dump, compress, checksum and upload one database; write its manifest last."""
        return call("backup.run_backup", database)

    @task(map_index_template="{{ pgdr_database }}")
    def prune_expired(database: str, backup: dict) -> dict:
        """Delete backups the retention policy no longer keeps, and stale partial uploads."""
        return call("backup.run_retention", database)

    # One mapped group per source server: its dumps run in that server's pool, so a fleet never
    # runs more than backup.max_dumps_per_server dumps against one server at once.
    for server, databases in databases_by_server(PLAN).items():

        @task_group(group_id=f"protect_{server}")
        def protect(database: str, pool: str = pool_name(server)):
            prune_expired(database, back_up.override(pool=pool)(database))

        protect.expand(database=databases)


if builds("pgdr_backup"):  # all of them, except under pgdr's dag.test() of another DAG
    pgdr_backup()
