"""What pgdr's DAG tasks do: thin Airflow-facing functions over the domain modules.

DAG files stay short by calling these. Each function reads the plan and connections at run
time (never at parse time), keeps its work files in a private directory that is always
removed, and turns :class:`~pgdr.errors.PermanentFailure` into ``AirflowFailException`` so that a
failure retrying cannot fix pages at once instead of retrying.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

from pgdr.errors import PermanentFailure
from pgdr.notify import CONTEXT_BACKUP_ID, CONTEXT_DATABASE, on_task_failure
from pgdr.plan import DRPlan

log = logging.getLogger(__name__)

OWNER = "pgdr"
MAX_RETRY_DELAY = timedelta(minutes=30)


def default_args(plan: DRPlan, execution_timeout: timedelta) -> dict[str, Any]:
    """Return the ``default_args`` every pgdr DAG uses: retries with backoff, alerts, timeout."""
    return {
        "owner": OWNER,
        "retries": plan.retries,
        "retry_delay": plan.retry_delay,
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": MAX_RETRY_DELAY,
        "execution_timeout": execution_timeout,
        "on_failure_callback": on_task_failure,
    }


@contextmanager
def fail_fast() -> Iterator[None]:
    """Re-raise a :class:`PermanentFailure` as ``AirflowFailException`` (no retry)."""
    try:
        yield
    except PermanentFailure as err:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(str(err)) from err


@contextmanager
def task_workdir(context, label: str) -> Iterator[Path]:
    """Yield a private work directory for one task try; it is removed whatever happens."""
    from pgdr.backup import work_dir_root

    ti = context["ti"]
    root = work_dir_root()
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"pgdr-{label}-{ti.map_index}-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def backfill_skip_reason(run_type: str, logical_date: datetime | None, queued_at: datetime | None) -> str | None:
    """Say why a backup run must not back up, or ``None`` if it should.

    A backup records the database as it is *now*. A backfill run, or a manual run given a logical
    date in the past, would label today's data with an old date, so it is skipped. A scheduled run
    that starts late (after scheduler downtime) still backs up: a late backup beats none.
    """
    run_type = str(getattr(run_type, "value", run_type))
    if run_type == "backfill":
        return (
            f"This is a backfill run for {logical_date:%Y-%m-%d %H:%M} UTC. A backup can only capture the "
            "database as it is now, so pgdr does not label a fresh dump with a past date. Nothing was done; "
            "backfill pgdr_verify_restore instead to verify the backups taken in that period."
        )
    if run_type == "manual" and logical_date is not None:
        reference = queued_at or datetime.now(timezone.utc)
        if reference - logical_date > timedelta(hours=1):
            return (
                f"This manual run has the past logical date {logical_date:%Y-%m-%d %H:%M} UTC. A backup can "
                "only capture the database as it is now; trigger the DAG without a logical date to back up now."
            )
    return None


def _airflow_info(context) -> dict[str, Any]:
    ti = context["ti"]
    logical_date = context.get("logical_date")
    return {
        "dag_id": ti.dag_id,
        "run_id": ti.run_id,
        "task_id": ti.task_id,
        "try_number": ti.try_number,
        "logical_date": logical_date.isoformat() if logical_date else None,
    }


def run_backup(database: str, context) -> dict[str, Any]:
    """Body of the ``back_up`` task: back up one database and emit the backup asset event."""
    from airflow.sdk.exceptions import AirflowSkipException

    from pgdr.assets import BACKUP_ASSET
    from pgdr.backup import take_backup
    from pgdr.connections import database_endpoint, open_store
    from pgdr.plan import load_plan

    context[CONTEXT_DATABASE] = database
    dag_run = context["dag_run"]
    reason = backfill_skip_reason(dag_run.run_type, context.get("logical_date"), getattr(dag_run, "queued_at", None))
    if reason:
        raise AirflowSkipException(reason)
    with fail_fast():
        plan = load_plan()
        db = plan.database(database)
        endpoint = database_endpoint(db, plan)
        store, layout = open_store(db.storage, plan)
        with task_workdir(context, f"backup-{database}") as workdir:
            result = take_backup(db, endpoint, store, layout, workdir, _airflow_info(context))
    manifest = result.manifest
    context[CONTEXT_BACKUP_ID] = manifest.backup_id
    summary = {
        "database": database,
        "backup_id": manifest.backup_id,
        "location": result.location,
        "manifest_key": result.manifest_key,
        "storage": db.storage.name,
        "recovery_point": manifest.recovery_point.isoformat(),
        "stored_bytes": manifest.stored_size,
        "dump_bytes": manifest.size,
        "tables": len(manifest.row_counts),
        "rows": sum(manifest.row_counts.values()),
    }
    context["outlet_events"][BACKUP_ASSET].extra = summary
    log.info(
        "%s backup %s of database %s: recovery point %s, %d tables, %d rows, %.1f MB dumped, "
        "%.1f MB stored. Manifest: %s",
        "Reused" if result.reused else "Completed", manifest.backup_id, database,
        manifest.recovery_point.isoformat(), summary["tables"], summary["rows"],
        manifest.size / 1e6, manifest.stored_size / 1e6, store.describe(result.manifest_key),
    )
    return summary


def run_retention(database: str, context) -> dict[str, Any]:
    """Body of the ``prune_expired`` task: apply the plan's retention policy to one database."""
    from pgdr.catalog import BackupCatalog
    from pgdr.connections import open_store
    from pgdr.plan import load_plan
    from pgdr.retention import decide_retention

    context[CONTEXT_DATABASE] = database
    with fail_fast():
        plan = load_plan()
        db = plan.database(database)
        store, layout = open_store(db.storage, plan)
        catalog = BackupCatalog(store, layout, database)
        complete, partials = catalog.scan()
        decision = decide_retention(complete, partials, db.retention, datetime.now(timezone.utc))
        keys_by_id = {p.backup_id: list(p.keys) for p in partials}
        for backup_id, why in decision.delete.items():
            log.info("Deleting backup %s of %s: %s.", backup_id, database, why)
            catalog.delete_backup(backup_id)
        for backup_id, why in decision.delete_partial.items():
            log.info("Deleting %s of %s: %s.", backup_id, database, why)
            catalog.delete_backup(backup_id, keys_by_id[backup_id])
    for backup_id, why in decision.keep.items():
        log.info("Keeping backup %s of %s: %s.", backup_id, database, why)
    return {
        "database": database,
        "kept": sorted(decision.keep),
        "deleted": sorted(decision.delete),
        "deleted_partial": sorted(decision.delete_partial),
    }
