"""
### pgdr_copy: a second copy of every backup, in another bucket (another region or account)

For each database whose plan names `copies` (storage targets), one mapped task **copy_backups** copies every
complete backup that is not yet in each copy target: its files inside S3 (`CopyObject`) when both buckets are
reached through one AWS connection, streamed through the worker otherwise; then every file is **read back from
the copy** and its SHA-256 compared with the manifest, and only then the manifest is written there, last. A
backup whose verification record appears later gets it copied too. Each copy keeps the database's retention on its
own: a deletion at the source (by retention or by anyone else) is never followed.

Runs when a backup is stored (the `pgdr_backups` asset) and every day at 04:00 UTC (catch-up). `pgdr_health`
checks every few minutes that each copy holds every backup stored more than the plan's `copy_rpo` ago
(`copy_lag.<target>`, gauge `pgdr.copy_lag_seconds.<db>.<target>`).

**When it fails**: *could not be reached / access denied*: the copy bucket or its connection; the task retries,
copies made so far stay. *differs from its manifest at the source*: the backup itself is damaged; run
pgdr_verify_restore on it and find out what changed the bucket. *reads back as ... not the ... of the manifest*:
what was written to the copy is not what was sent; it was removed and the next run tries again.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, dag, task
from pgdr.airflow_glue.assets import BACKUP_ASSET
from pgdr.airflow_glue.defaults import default_args
from pgdr.airflow_glue.notify import run_callbacks
from pgdr.plan import load_plan
from pgdr.tasks import call

PLAN = load_plan()


@dag(
    dag_id="pgdr_copy",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 4 * * *", timezone="UTC"), assets=[BACKUP_ASSET]),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # two runs would copy the same backup twice
    tags=["pgdr", "copy", "disaster-recovery"],
    default_args=default_args(PLAN, execution_timeout=timedelta(hours=6)),
    **run_callbacks(),
    doc_md=__doc__,
)
def pgdr_copy():
    @task(map_index_template="{{ pgdr_database }}")
    def copy_backups(database: str) -> dict:
        """Copy the backups missing in each copy target of one database; check them there; retention there."""
        return call("copy.run_copy", database)

    copy_backups.expand(database=[db.name for db in PLAN.databases if db.copies])


pgdr_copy()
