"""What the tasks of ``pgdr_basebackup`` do: decide what is due, take and check a base backup, retention."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from pgdr.airflow_glue.notify import CONTEXT_BACKUP_ID
from pgdr.tasks.common import _airflow_info, fail_fast, pitr_server_context, task_workdir

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def due_kind(entries, full_schedule: str, incremental_schedule: str | None, now: datetime) -> str | None:
    """Say which base backup a scheduled run takes for a server: ``full``, ``incremental`` or ``None``.

    A full one is due when the newest full base backup ended before the last tick of
    ``full_schedule``; else an incremental one when the newest base backup of any kind ended
    before the last tick of ``incremental_schedule``.
    """
    from croniter import croniter

    fulls = [e for e in entries if e.record.kind == "full"]
    if not fulls or fulls[-1].record.finished_at < croniter(full_schedule, now).get_prev(datetime):
        return "full"
    if incremental_schedule and entries[-1].record.finished_at < croniter(incremental_schedule, now).get_prev(datetime):
        return "incremental"
    return None


def run_find_base_backups(context) -> list[dict[str, str]]:
    """Body of ``find_due``: which servers get which base backup in this run."""
    from pgdr.plan import load_plan

    params = context["params"]
    with fail_fast():
        plan = load_plan()
        names = [params["server"]] if params.get("server") else plan.server_names
        wanted = params.get("kind") or "auto"
        due = []
        for name in names:
            plan.server(name)
            if wanted != "auto":
                due.append({"server": name, "kind": wanted})
                continue
            _, server, _, _, catalog = pitr_server_context(name, context)
            entries = catalog.backups()
            kind = due_kind(entries, server.pitr.full_schedule, server.pitr.incremental_schedule, datetime.now(UTC))
            if kind:
                due.append({"server": name, "kind": kind})
            else:
                log.info("Server %s: no base backup due (newest %s).", name, entries[-1].backup_id if entries else None)
    return due


def run_base_backup(job: dict[str, str], context) -> dict[str, Any]:
    """Body of ``take_base_backup``: a full or incremental base backup of one server; emits the asset event."""
    from pgdr.airflow_glue.assets import BASE_BACKUP_ASSET
    from pgdr.airflow_glue.connections import server_endpoint
    from pgdr.physical.basebackup import take_base_backup

    with fail_fast():
        plan, server, store, archive, catalog = pitr_server_context(job["server"], context)
        parent = None
        if job["kind"] == "incremental":
            entries = [e for e in catalog.backups() if e.status != "failed"]
            if not entries:
                log.warning("Server %s has no base backup to build an incremental one on: taking a full one.", server.name)
            else:
                parent = entries[-1]
        with task_workdir(context, f"basebackup-{server.name}") as workdir:
            record = take_base_backup(
                server.name, server_endpoint(server, plan), store, archive.layout, workdir, archive.url, parent,
                _airflow_info(context),
            )
    context[CONTEXT_BACKUP_ID] = record.backup_id
    summary = {
        "server": server.name, "backup_id": record.backup_id, "kind": record.kind, "parent": record.parent,
        "finished_at": record.finished_at.isoformat(), "stored_bytes": record.size, "start_wal": record.start_wal,
        "location": store.describe(archive.layout.base_backup_prefix(server.name, record.backup_id)),
    }
    context["outlet_events"][BASE_BACKUP_ASSET].extra = summary
    return summary


def run_check_stored(backup: dict[str, Any], context) -> dict[str, Any]:
    """Body of ``check_stored``: download the stored base backup and run ``pg_verifybackup`` on those bytes."""
    from pgdr.physical.cluster import download_chain, verify_backup

    started = _now()
    with fail_fast():
        _, server, store, archive, catalog = pitr_server_context(backup["server"], context)
        context[CONTEXT_BACKUP_ID] = backup["backup_id"]
        entry = catalog.get(backup["backup_id"])
        with task_workdir(context, f"verifybackup-{server.name}") as workdir:
            # pg_verifybackup reads tar files as they are; an incremental backup is checked alone.
            folder = download_chain([entry], store, workdir)[0]
            seconds = verify_backup(folder, f"base backup {entry.backup_id} as stored in {store.describe(archive.layout.base_backup_prefix(server.name, entry.backup_id))}")
    log.info("pg_verifybackup: base backup %s as stored is intact (%.1fs).", entry.backup_id, seconds)
    return {"backup_id": entry.backup_id, "started_at": started, "finished_at": _now(), "seconds": round(seconds, 2)}


def run_pitr_retention(server_name: str, context) -> dict[str, Any]:
    """Body of ``prune_expired``: the recovery-window retention of one server's base backups and WAL."""
    from pgdr.physical.retention import decide_pitr_retention, expired_segments

    with fail_fast():
        _, server, store, archive, catalog = pitr_server_context(server_name, context)
        entries = catalog.backups()
        decision = decide_pitr_retention(entries, catalog.partial(), server.pitr.keep_window, datetime.now(UTC))
        for backup_id, why in decision.delete.items():
            log.info("Deleting base backup %s of %s: %s.", backup_id, server.name, why)
            catalog.delete_backup(backup_id)
        for backup_id in decision.delete_partial:
            log.info("Deleting the unfinished base backup %s of %s (no record, older than the grace period).", backup_id, server.name)
            catalog.delete_backup(backup_id)
        segment_size = entries[0].record.wal_segment_size if entries else 16 * 1024 * 1024
        expired = expired_segments(archive.segments(store), decision.delete_wal_before, segment_size)
        if expired:
            log.info("Deleting %d WAL segments older than %s (needed by no kept base backup).", len(expired), decision.delete_wal_before)
            store.delete([s.key for s in expired])
    for backup_id, why in decision.keep.items():
        log.info("Keeping base backup %s of %s: %s.", backup_id, server.name, why)
    return {
        "server": server.name, "kept": sorted(decision.keep), "deleted": sorted(decision.delete),
        "deleted_partial": decision.delete_partial, "wal_segments_deleted": len(expired),
        "oldest_recoverable": decision.oldest_recoverable.isoformat() if decision.oldest_recoverable else None,
    }


