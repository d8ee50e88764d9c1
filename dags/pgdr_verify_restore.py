"""
### pgdr_verify_restore: every backup restored into a scratch database and proven good

A backup nobody has restored is a hope, not a backup. For every backup that `pgdr_backup`
completes (its `pgdr_backups` asset event), this DAG verifies exactly that backup:

1. **create_scratch** (setup): a scratch database unique to the run on the plan's verification
   server; leftovers of killed runs (pgdr's naming scheme and marker only) are dropped first.
2. **restore_and_check**: three phases in one task, each recorded with its own time:
   - *check_checksums*: every stored file downloaded and checked against the manifest's SHA-256.
     A changed, truncated or missing file fails here, at once (no retry).
   - *restore_backup*: `pg_restore -j` as the non-superuser restore role, into a scratch database
     with the backup's encoding and locale; roles the backup names that the verification server
     lacks are created NOLOGIN (and dropped again in drop_scratch if unused).
   - *check_integrity*: exact row counts against the manifest, `pg_amcheck` over tables and
     indexes, sequences restored and ahead of their columns.
3. **validate_and_apply_privileges**: two phases in one task, each recorded with its own time:
   - *validate_data*: Great Expectations: a baseline suite per table (row count, primary keys
     unique and not null, no foreign-key orphans) and the suites in `include/gx/<database>/`.
     Results (JSON) and an HTML report are stored next to the backup.
   - *apply_privileges*: the backup's owners, grants, default privileges, database settings, event
     triggers and publications, as the server's connection: exactly what an incident restore does.
     A backup whose privileges cannot be given back fails here, on the day it is taken.
4. **drop_scratch** (teardown): runs after any failure, without hiding it.
5. **record_verification**: writes `verification.json` next to the backup, `verified` or
   `failed`, with phase durations and the achieved restore time against the plan's RTO.
   Retention always keeps the newest verified backup.

Every `verify_copies_every` (plan, default 7 days) the daily run also restores the newest backup of each second
copy (`copies`) *from the copy*, and records that verification in the copy: the copy is proven, not assumed.

Trigger it by hand with `database` and `backup_id` to verify one backup (`verify_from`: from a copy).
An asset-triggered run also verifies the day's backups newer than the last verified one whose events Airflow 3.3 did not
deliver (a fleet backed up in a burst loses some: apache/airflow#56050); a daily run verifies
any backup that still missed its event, and a backfill verifies the backups taken in its intervals.

**When it fails**: the alert names the task and its message the problem; `verification.json` names the phase.
- *restore_and_check*, "is corrupt and was refused" (phase check_checksums): the stored backup changed since it was
  written. It is marked failed and kept for investigation; restore the previous verified backup if you need one.
- *restore_and_check*, a pg_restore error or a row count / pg_amcheck finding (restore_backup / check_integrity):
  the dump does not restore to what was backed up. Same.
- *validate_and_apply_privileges*, "expectations failed" (phase validate_data): the message lists each with
  table, column and observed value, and the HTML report is next to the backup. Fix the data or the suite.
- *validate_and_apply_privileges*, an owner, grant or setting that cannot be given back (phase apply_privileges):
  the message names it; an incident restore of this backup would stop at the same place.
- *cannot connect*: the verification server is down; the task retries.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import (
    AssetOrTimeSchedule,
    CronDataIntervalTimetable,
    Param,
    dag,
    setup,
    task,
    task_group,
    teardown,
)
from pgdr.airflow_glue.assets import BACKUP_ASSET
from pgdr.airflow_glue.deadlines import dag_deadline
from pgdr.airflow_glue.defaults import default_args
from pgdr.airflow_glue.notify import run_callbacks
from pgdr.airflow_glue.parsing import builds
from pgdr.plan import load_plan
from pgdr.tasks import call

PLAN = load_plan()


@dag(
    dag_id="pgdr_verify_restore",
    schedule=AssetOrTimeSchedule(
        timetable=CronDataIntervalTimetable("0 5 * * *", timezone="UTC"), assets=[BACKUP_ASSET]
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    # One run at a time: an asset-triggered run can then take the backups whose events Airflow 3.3
    # dropped (apache/airflow#56050) without another run verifying them too.
    max_active_runs=1,
    tags=["pgdr", "verify", "disaster-recovery"],
    default_args=default_args(PLAN, execution_timeout=timedelta(hours=4)),
    deadline=dag_deadline(PLAN, "pgdr_verify_restore"),
    **run_callbacks(),
    params={
        "database": Param(
            None,
            type=["null", "string"],
            enum=[None, *PLAN.database_names],
            title="Database",
            values_display={"null": "(the only database in the plan)"},
            description="Verify a backup of this database (default: the only one in the plan).",
        ),
        "backup_id": Param(
            None,
            type=["null", "string"],
            title="Backup id",
            description="The backup to verify, e.g. 20261122T093000Z-3fa2c1. Empty: the newest backup.",
        ),
        "verify_from": Param(
            None,
            type=["null", "string"],
            enum=[None, *sorted({t.name for db in PLAN.databases for t in db.copies})],
            title="Verify from copy",
            values_display={"null": "(the database's own storage target)"},
            description="Restore the backup from one of the database's second copies (the plan's copies) and record "
            "the verification there. The daily run does so by itself every verify_copies_every.",
        ),
    },
    doc_md=__doc__,
)
def pgdr_verify_restore():
    @task(retries=0)
    def find_backups() -> list[dict]:
        """Decide which backups this run verifies (params, asset events, or data interval)."""
        return call("verify.resolve_verification_targets")

    @setup
    @task(map_index_template="{{ pgdr_database }} {{ pgdr_backup_id }}")
    def create_scratch(target: dict) -> str:
        """Create the run's scratch database, after dropping leftovers of killed runs."""
        return call("verify.run_create_scratch", target)

    # Checksums, restore and integrity in one task: one download, one process start instead of three; validation and
    # privileges in one more. A task costs seconds of CPU to schedule and start on a loaded Celery worker, and these
    # boundaries carried no retry value.
    @task(map_index_template="{{ pgdr_database }} {{ pgdr_backup_id }}")
    def restore_and_check(target: dict, scratch: str) -> dict:
        """Download checking every SHA-256, pg_restore -j into the scratch database, then row counts, pg_amcheck
        and sequences."""
        return call("verify.run_restore_and_check", target, scratch)

    @task(map_index_template="{{ pgdr_database }} {{ pgdr_backup_id }}")
    def validate_and_apply_privileges(target: dict, scratch: str) -> dict:
        """Great Expectations (the baseline suite and the user suites), then owners, grants, default privileges and
        database settings, as an incident restore applies them."""
        return call("verify.run_validate_and_apply_privileges", target, scratch)

    @teardown
    @task(map_index_template="{{ pgdr_database }} {{ pgdr_backup_id }}")
    def drop_scratch(target: dict, scratch: str) -> bool:
        """Drop the scratch database, whatever happened."""
        return call("verify.run_drop_scratch", target, scratch)

    # all_done so that a failed verification is recorded too; it then fails itself, so a failed
    # verification never turns the run green. Its own failure is not alerted: the phase's was.
    @task(
        trigger_rule="all_done", on_failure_callback=None, map_index_template="{{ pgdr_database }} {{ pgdr_backup_id }}"
    )
    def record_verification(target: dict) -> dict:
        """Write verified or failed, with timings and the RTO comparison, next to the backup."""
        return call("verify.run_record_verification", target)

    @task_group
    def verify(target: dict):
        scratch = create_scratch(target)
        checked = restore_and_check(target, scratch)
        validated = validate_and_apply_privileges(target, scratch)
        dropped = drop_scratch(target, scratch)
        recorded = record_verification(target)
        checked >> validated >> dropped >> recorded

    verify.expand(target=find_backups())


if builds("pgdr_verify_restore"):  # all of them, except under pgdr's dag.test() of another DAG
    pgdr_verify_restore()
