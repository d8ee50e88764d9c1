"""Receipts for the evidence log (:mod:`pgdr.evidence`) from Airflow tasks: the plan's log, opened with the signing
key's connection, and who caused the run."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from pgdr.runtime import VIA_ENV_VAR

log = logging.getLogger(__name__)


def open_evidence(plan, pruning: bool = False):
    """The plan's :class:`~pgdr.evidence.EvidenceLog`, or ``None`` when the plan has no ``evidence`` section;
    ``pruning``: with the storage target's pruner connection (the one that may delete)."""
    from pgdr.airflow_glue.connections import master_keys, open_store
    from pgdr.evidence import EvidenceLog

    if plan.evidence is None:
        return None
    store, _layout = open_store(plan.evidence.storage, plan, pruning=pruning)
    keys = master_keys(plan.evidence.key_conn_id, "the signing key of the evidence log", plan)
    return EvidenceLog(store, plan.evidence.storage.prefix, keys)


def actor_of(context) -> str:
    """Who caused this run, as an auditor reads it: ``schedule``, ``Airflow user <name>``, the command line with its
    OS user, an asset event, a backfill."""
    via = os.environ.get(VIA_ENV_VAR)
    if via:
        return via
    dag_run = context.get("dag_run")
    run_type = str(getattr(dag_run, "run_type", "") or "").lower()
    user = getattr(dag_run, "triggering_user_name", None)
    if "scheduled" in run_type:
        return "schedule"
    if "asset" in run_type:
        return "asset event (a new backup to verify)"
    if "backfill" in run_type:
        return f"backfill by Airflow user {user}" if user else "backfill"
    return f"Airflow user {user}" if user else "manual trigger (user not recorded)"


def record_evidence(
    context,
    plan,
    event: str,
    subject: dict[str, Any],
    result: str,
    details: dict[str, Any] | None = None,
    record: tuple[str, str, Callable[[], bytes]] | None = None,
) -> int | None:
    """Append a receipt of this task's work (its last act); return its number, ``None`` when the plan keeps no
    evidence log or it could not be written.

    :param record: the full record the receipt stands for: its storage target's name, its key, and a function that
        reads it (called only when the plan keeps a log).

    It never fails the task: the work is done, and a retry would do it again. A receipt that cannot be written is
    logged as an error saying what is missing from the log.
    """
    details = {**(details or {}), "airflow": airflow_of(context)}
    return append_receipt(plan, event, actor_of(context), subject, result, details, record)


def airflow_of(context) -> dict[str, Any]:
    """Where a receipt's work ran in Airflow: DAG, run, task, try, and the log's address when known."""
    ti = context.get("ti")
    airflow = {k: getattr(ti, k, None) for k in ("dag_id", "run_id", "task_id", "try_number")}
    if getattr(ti, "log_url", None):
        airflow["log_url"] = ti.log_url
    return airflow


def append_receipt(
    plan,
    event: str,
    actor: str,
    subject: dict[str, Any],
    result: str,
    details: dict[str, Any],
    record: tuple[str, str, Callable[[], bytes]] | None = None,
) -> int | None:
    """:func:`record_evidence` for work done outside a task too (the command line): the receipt's number, or
    ``None`` (no log, or it could not be written: logged as an error, never raised)."""
    try:
        evidence = open_evidence(plan)
        if evidence is None:
            return None
        if record is not None:
            record = (record[0], record[1], record[2]())
        receipt = evidence.append(event, actor, subject, result, details, record)
    except Exception as err:  # noqa: BLE001 - the receipt must not undo the work it records
        log.error(
            "The evidence receipt '%s' of %s could not be written: %s. The work itself is done and recorded beside "
            "the backup; the evidence log lacks this receipt (evidence verify cannot show a receipt never written). "
            "Fix the evidence storage or key connection.",
            event,
            subject,
            err,
        )
        return None
    log.info("Evidence receipt %d (%s) written to %s.", receipt.seq, event, evidence.describe())
    return receipt.seq


def server_recovery_receipt(
    plan, server_name: str, actor: str, report: dict[str, Any] | None, error: str | None = None, airflow=None
) -> int | None:
    """The receipt of a whole-server recovery (``recover-server``, or ``pgdr_restore`` in mode server): its target,
    recovery point, timeline, MTTR and data-loss window when it finished; the error when it failed."""
    from pgdr.physical.server_recovery import server_incident_measures, server_rto_seconds

    if plan.evidence is None:
        return None
    where = {"airflow": airflow} if airflow else {}
    if report is None:
        details: dict[str, Any] = {"mode": "server", "error": (error or "")[:2000], **where}
        return append_receipt(plan, "restore_failed", actor, {"server": server_name}, "failed", details)
    details = {
        "mode": "server",
        "target": report.get("target"),
        "recovery_point": report.get("achieved_recovery_point"),
        "host": report.get("host"),
        "data_dir": report.get("data_dir"),
        "triggered_by": report.get("triggered_by"),
        "achieved_rto_seconds": report.get("achieved_rto_seconds"),
        "rto_target_seconds": server_rto_seconds(plan, plan.server(server_name)),
        "phase_seconds": report.get("phase_seconds"),
        "report": report.get("report"),
        "incident": server_incident_measures(report),
        **where,
    }
    return append_receipt(plan, "restore_finished", actor, {"server": server_name}, "ok", details)


def plan_facts(plan) -> dict[str, Any]:
    """What the evidence pack (:mod:`pgdr.evidence_pack`) needs of the plan: each database's and server's schedules,
    targets and encryption settings (names of connections, never a key)."""

    def storage_encryption(target) -> str | None:
        parts = [f"SSE {target.sse}" if target.sse else "", "Object Lock" if target.object_lock else ""]
        return ", ".join(p for p in parts if p) or None

    return {
        "plan": str(plan.path),
        "databases": [
            {
                "name": db.name,
                "in_plan": True,
                "schedule": plan.backup_schedule,
                "rto_target_s": db.rto.total_seconds(),
                "rpo_target_s": db.rpo.total_seconds(),
                "encryption": f"master key {db.encryption_key_conn_id}" if db.encryption_key_conn_id else None,
                "storage_encryption": storage_encryption(db.storage),
            }
            for db in plan.databases
        ],
        "servers": [
            {
                "name": s.name,
                "rpo_target_s": s.pitr.rpo.total_seconds(),
                "schedules": [c for c in (s.pitr.full_schedule, s.pitr.incremental_schedule) if c],
            }
            for s in plan.servers
        ],
    }


def export_evidence_pack(plan, since, until, now=None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Verify the plan's evidence log and build the pack of ``since``..``until``: ``(pack, files)`` (see
    :func:`pgdr.evidence_pack.pack_files`). :class:`~pgdr.errors.PgdrError` when the plan keeps no log."""
    from datetime import UTC, datetime

    from pgdr.airflow_glue.connections import open_store
    from pgdr.errors import PgdrError
    from pgdr.evidence_pack import build_pack, pack_files

    evidence = open_evidence(plan)
    if evidence is None:
        raise PgdrError(
            f"the DR plan {plan.path} keeps no evidence log, so there is nothing to export: add an 'evidence:' "
            "section (storage, key_conn_id) and the tasks write a signed receipt of every backup, verification and "
            "restore"
        )
    if since >= until:
        raise PgdrError(f"the period is empty: --from {since.isoformat()} is not before --to {until.isoformat()}")
    report = evidence.verify(since, until, lambda name: open_store(plan.storages[name], plan)[0])
    chain = {
        "ok": report.ok,
        "summary": report.summary(),
        "checked": report.checked,
        "first_receipt": report.first_seq,
        "last_receipt": report.last_seq,
        "last_receipt_sha256": report.last_digest,
        "problems": [*report.problems, *report.record_mismatches][:50],
    }
    receipts = [(r.seq, r.body) for r in evidence.receipts()]
    pack = build_pack(receipts, plan_facts(plan), since, until, now or datetime.now(UTC), chain, evidence.describe())
    return pack, pack_files(pack)


def pack_prefix(evidence, since, until) -> str:
    """Where the pgdr_evidence DAG stores the pack of a period, beside the chain: ``<log>/packs/<from>_<to>/``."""
    return f"{evidence.root}/packs/{since:%Y-%m-%d}_{until:%Y-%m-%d}/"
