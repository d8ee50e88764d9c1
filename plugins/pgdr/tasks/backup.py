"""What the tasks of ``pgdr_backup`` do: take one database's backup, apply its retention."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from pgdr.airflow_glue.notify import CONTEXT_BACKUP_ID, CONTEXT_DATABASE
from pgdr.airflow_glue.task_run import _airflow_info, fail_fast, task_workdir

log = logging.getLogger(__name__)


def run_backup(database: str, context) -> dict[str, Any]:
    """Body of the ``back_up`` task: back up one database and emit the backup asset event."""
    from airflow.sdk.exceptions import AirflowSkipException

    from pgdr.airflow_glue.assets import BACKUP_ASSET
    from pgdr.airflow_glue.connections import database_endpoint, encryption_keys, open_store
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
    return summary


def run_retention(database: str, context) -> dict[str, Any]:
    """Body of the ``prune_expired`` task: apply the plan's retention policy to one database."""
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.logical.retention import apply_retention
    from pgdr.plan import load_plan

    context[CONTEXT_DATABASE] = database
    with fail_fast():
        plan = load_plan()
        db = plan.database(database)
        store, layout = open_store(db.storage, plan, pruning=True)
        return apply_retention(BackupCatalog(store, layout, database), db.retention, datetime.now(UTC))
