"""What the tasks of ``pgdr_backup`` do: take one database's backup, apply its retention."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from pgdr.airflow_glue.notify import CONTEXT_BACKUP_ID, CONTEXT_DATABASE
from pgdr.tasks.common import _airflow_info, fail_fast, task_workdir

log = logging.getLogger(__name__)


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
        reference = queued_at or datetime.now(UTC)
        if reference - logical_date > timedelta(hours=1):
            return (
                f"This manual run has the past logical date {logical_date:%Y-%m-%d %H:%M} UTC. A backup can "
                "only capture the database as it is now; trigger the DAG without a logical date to back up now."
            )
    return None


def run_backup(database: str, context) -> dict[str, Any]:
    """Body of the ``back_up`` task: back up one database and emit the backup asset event."""
    from airflow.sdk.exceptions import AirflowSkipException

    from pgdr.airflow_glue.assets import BACKUP_ASSET
    from pgdr.airflow_glue.connections import database_endpoint, encryption_keys, open_store
    from pgdr.logical.backup import take_backup
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
        keys = encryption_keys(db, plan)  # before the dump: a missing key fails in a second, not after an hour
        with task_workdir(context, f"backup-{database}") as workdir:
            result = take_backup(db, endpoint, store, layout, workdir, _airflow_info(context), keys=keys)
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
        "%s backup %s of database %s: recovery point %s, %d tables, %d rows, %s. Manifest: %s",
        "Reused" if result.reused else "Completed", manifest.backup_id, database,
        manifest.recovery_point.isoformat(), summary["tables"], summary["rows"],
        manifest.size_summary(), store.describe(result.manifest_key),
    )
    return summary


def run_retention(database: str, context) -> dict[str, Any]:
    """Body of the ``prune_expired`` task: apply the plan's retention policy to one database."""
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.logical.retention import decide_retention
    from pgdr.plan import load_plan

    context[CONTEXT_DATABASE] = database
    with fail_fast():
        plan = load_plan()
        db = plan.database(database)
        store, layout = open_store(db.storage, plan)
        catalog = BackupCatalog(store, layout, database)
        complete, partials = catalog.scan()
        decision = decide_retention(complete, partials, db.retention, datetime.now(UTC))
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
