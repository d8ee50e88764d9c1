"""
### pgdr_copy: a second copy of every backup and of the WAL archive, in another bucket (another region or account)

For each database whose plan names `copies` (storage targets), one mapped task **copy_backups** copies every
complete backup that is not yet in each copy target: its files inside S3 (`CopyObject`) when both buckets are
reached through one AWS connection, streamed through the worker otherwise; then every file is **read back from
the copy** and its SHA-256 compared with the manifest, and only then the manifest is written there, last. A
backup whose verification record appears later gets it copied too. Each copy keeps the database's retention on its
own: a deletion at the source (by retention or by anyone else) is never followed.

For each server under point-in-time recovery whose plan names `pitr.copies`, one mapped task **copy_server**
copies the WAL files its archive holds and the copy lacks, then the base backups (files read back and checked
against the base backup's record, the record last), and keeps the server's `keep_window` there. The server's
archive_command writes one destination: the copy of the WAL *follows* it, as recent as this DAG's last run.

Runs when a backup or a base backup is stored (the `pgdr_backups` and `pgdr_base_backups` assets) and every day at
04:00 UTC (catch-up); to keep a copy's WAL within minutes of the archive, trigger it more often (an external
schedule, or a shorter `pitr.copy_rpo` makes health say when it is not). `pgdr_health` checks every few minutes that
each copy holds every backup stored more than the plan's `copy_rpo` ago (`copy_lag.<target>`, gauge
`pgdr.copy_lag_seconds.<db or server>.<target>`); for a server it names a WAL segment missing in the copy and the
recovery window that breaks.

**When it fails**: *could not be reached / access denied*: the copy bucket or its connection; the task retries,
copies made so far stay. *differs from its manifest at the source*: the backup itself is damaged; run
pgdr_verify_restore on it and find out what changed the bucket. *reads back as ... not the ... of the manifest*:
what was written to the copy is not what was sent; it was removed and the next run tries again.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, dag, task
from pgdr.airflow_glue.assets import BACKUP_ASSET, BASE_BACKUP_ASSET
from pgdr.airflow_glue.defaults import default_args
from pgdr.airflow_glue.notify import run_callbacks
from pgdr.airflow_glue.parsing import builds
from pgdr.plan import load_plan
from pgdr.tasks import call

PLAN = load_plan()


@dag(
    dag_id="pgdr_copy",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("0 4 * * *", timezone="UTC"), assets=BACKUP_ASSET | BASE_BACKUP_ASSET
    ),
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

    @task(map_index_template="{{ pgdr_server }}")
    def copy_server(server: str) -> dict:
        """Copy the WAL files and base backups missing in each copy target of one server; check them there."""
        return call("copy.run_copy_server", server)

    copy_backups.expand(database=[db.name for db in PLAN.databases if db.copies])
    copy_server.expand(server=[s.name for s in PLAN.servers if s.pitr.copies])


if builds("pgdr_copy"):  # all of them, except under pgdr's dag.test() of another DAG
    pgdr_copy()
