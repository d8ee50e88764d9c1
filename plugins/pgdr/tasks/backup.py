"""What the tasks of ``pgdr_backup`` do: take one database's backup, apply its retention."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from pgdr.airflow_glue.notify import CONTEXT_BACKUP_ID, CONTEXT_DATABASE
from pgdr.airflow_glue.task_run import _airflow_info, fail_fast, task_workdir

log = logging.getLogger(__name__)


def run_backup(database: str, context) -> dict[str, Any]:
    """Body of the ``back_up`` task: back up one database, emit the backup asset event, write its receipt."""
    import hashlib

    from airflow.sdk.exceptions import AirflowSkipException

    from pgdr.airflow_glue.assets import BACKUP_ASSET
    from pgdr.airflow_glue.connections import database_endpoint, encryption_keys, open_store
    from pgdr.airflow_glue.evidence import record_evidence
    from pgdr.airflow_glue.notify import send_slack
    from pgdr.logical.backup import backfill_skip_reason, backup_summary, take_backup
    from pgdr.logical.standby import choose_source
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
        standby = database_endpoint(db, plan, conn_id=db.source_conn_id) if db.source_conn_id else None
        source = choose_source(db, endpoint, standby)
        if source.note:
            send_slack(f":warning: [pgdr] {source.note}", database, context)
        with task_workdir(context, f"backup-{database}") as workdir:
            result = take_backup(
                db,
                source.endpoint,
                store,
                layout,
                workdir,
                _airflow_info(context),
                keys=keys,
                on_blocking=lambda text: send_slack(f":warning: [pgdr] {text}", database, context),
                primary=source.primary_mark_from,
            )
    manifest = result.manifest
    context[CONTEXT_BACKUP_ID] = manifest.backup_id
    summary = {**backup_summary(db, result, store), **source.summary()}
    context["outlet_events"][BACKUP_ASSET].extra = summary
    if plan.evidence is not None:  # the receipt of an evidence log
        files = "\n".join(sorted(f"{f.key} {f.sha256}" for f in manifest.files))
        details = {
            **{k: summary[k] for k in ("recovery_point", "stored_bytes", "dump_bytes", "tables", "rows", "storage")},
            "reused": result.reused,
            "encrypted_under": manifest.encryption.key_id if manifest.encryption else None,
            "files": len(manifest.files),
            # the stored files' checksums, as the manifest lists them (a manifest is rewritten by key rotation; its
            # files never are)
            "files_sha256": hashlib.sha256(files.encode()).hexdigest(),
            "manifest": store.describe(result.manifest_key),
        }
        record_evidence(
            context, plan, "backup_taken", {"database": db.name, "backup_id": manifest.backup_id}, "ok", details
        )
    return summary


def run_retention(database: str, context) -> dict[str, Any]:
    """Body of the ``prune_expired`` task: apply the plan's retention policy to one database; a receipt when it
    deleted something."""
    from pgdr.airflow_glue.connections import open_store
    from pgdr.airflow_glue.evidence import record_evidence
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.logical.retention import apply_retention
    from pgdr.plan import load_plan

    context[CONTEXT_DATABASE] = database
    with fail_fast():
        plan = load_plan()
        db = plan.database(database)
        store, layout = open_store(db.storage, plan, pruning=True)
        result = apply_retention(BackupCatalog(store, layout, database), db.retention, datetime.now(UTC))
    if result["deleted"] or result["deleted_partial"]:
        details = {k: result[k] for k in ("deleted", "deleted_partial", "kept", "scheduled")}
        details["policy"] = {"keep_last": db.retention.keep_last, "keep_days": db.retention.keep_days}
        record_evidence(context, plan, "retention_deleted", {"database": db.name}, "ok", details)
    return result
