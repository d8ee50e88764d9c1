"""What the tasks of ``pgdr_basebackup`` do: decide what is due, take and check a base backup, retention."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from pgdr.airflow_glue.notify import CONTEXT_BACKUP_ID
from pgdr.airflow_glue.task_run import _airflow_info, _now, fail_fast, pitr_server_context, task_workdir

log = logging.getLogger(__name__)


def run_find_base_backups(context) -> list[dict[str, str]]:
    """Body of ``find_due``: which servers get which base backup in this run."""
    from pgdr.physical.basebackup import due_kind
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
    from pgdr.airflow_glue.notify import send_slack
    from pgdr.logical.standby import choose_source
    from pgdr.physical.basebackup import parent_for, take_base_backup

    with fail_fast():
        plan, server, store, archive, catalog = pitr_server_context(job["server"], context)
        entries = catalog.backups()
        parent = parent_for(job["kind"], entries, server.name)
        primary = server_endpoint(server, plan)
        standby = server_endpoint(server, plan, conn_id=server.source_conn_id) if server.source_conn_id else None
        source = choose_source(server, primary, standby)
        if source.note:
            send_slack(f":warning: [pgdr] {source.note}", server.databases[0], context)  # its databases' notify
        with task_workdir(context, f"basebackup-{server.name}") as workdir:
            record = take_base_backup(
                server.name,
                primary,
                store,
                archive.layout,
                workdir,
                archive.url,
                parent,
                _airflow_info(context),
                newest=entries[-1] if entries else None,
                source=source,
            )
    context[CONTEXT_BACKUP_ID] = record.backup_id
    summary = record.summary(store.describe(archive.layout.base_backup_prefix(server.name, record.backup_id)))
    context["outlet_events"][BASE_BACKUP_ASSET].extra = summary
    return summary


def run_check_stored(backup: dict[str, Any], context) -> dict[str, Any]:
    """Body of ``check_stored``: read the stored base backup and check those bytes against its manifest (as they
    stream; ``pg_verifybackup`` on a gzip'd one stored before); write its evidence receipt."""
    from pgdr.airflow_glue.evidence import record_evidence
    from pgdr.physical.cluster import check_streamed, download_chain, is_streamed, verify_backup

    started = _now()
    with fail_fast():
        plan, server, store, archive, catalog = pitr_server_context(backup["server"], context)
        context[CONTEXT_BACKUP_ID] = backup["backup_id"]
        entry = catalog.get(backup["backup_id"])
        with task_workdir(context, f"verifybackup-{server.name}") as workdir:
            # An incremental base backup is checked alone (its files against its own manifest).
            what = (
                f"base backup {entry.backup_id} as stored in "
                f"{store.describe(archive.layout.base_backup_prefix(server.name, entry.backup_id))}"
            )
            if is_streamed(entry):
                check = "SHA-256 and every file against PostgreSQL's backup_manifest, on the stored bytes"
                seconds = check_streamed(entry, store, workdir, None, what)
            else:
                check = "pg_verifybackup on the stored bytes"
                seconds = verify_backup(download_chain([entry], store, workdir)[0], what)
    log.info("Base backup %s as stored is intact (%s; %.1fs).", entry.backup_id, check, seconds)
    if plan.evidence is not None:  # the receipt of an evidence log
        record = entry.record
        details = {
            "kind": record.kind,
            "parent": record.parent,
            "started_at": record.started_at.isoformat(),
            "finished_at": record.finished_at.isoformat(),
            "system_identifier": record.system_identifier,
            "timeline": record.timeline,
            "lsn": [record.start_lsn, record.end_lsn],
            "read_on": record.source or {"source": "primary"},
            "stored_intact": {"check": check, "seconds": round(seconds, 2)},
            "files": [{"key": f.key, "sha256": f.sha256, "size": f.size} for f in record.files],
        }
        record_key = archive.layout.record_key(server.name, entry.backup_id)
        record_evidence(
            context,
            plan,
            "base_backup_taken",
            {"server": server.name, "backup_id": entry.backup_id},
            "ok",
            details,
            (server.pitr.storage.name, record_key, lambda: store.get_bytes(record_key)),
        )
    return {"backup_id": entry.backup_id, "started_at": started, "finished_at": _now(), "seconds": round(seconds, 2)}


def run_pitr_retention(server_name: str, context) -> dict[str, Any]:
    """Body of ``prune_expired``: the recovery-window retention of one server's base backups and WAL; a receipt
    when it deleted something."""
    from pgdr.airflow_glue.evidence import record_evidence
    from pgdr.physical.retention import apply_pitr_retention

    with fail_fast():
        plan, server, store, archive, catalog = pitr_server_context(server_name, context, pruning=True)
        result = apply_pitr_retention(catalog, archive, store, server.pitr, datetime.now(UTC))
    if result["deleted"] or result["deleted_partial"] or result["wal_segments_deleted"]:
        details = {k: result[k] for k in ("deleted", "deleted_partial", "wal_segments_deleted", "kept", "scheduled")}
        details["oldest_recoverable"] = result["oldest_recoverable"]
        record_evidence(context, plan, "retention_deleted", {"server": server.name}, "ok", details)
    return result
