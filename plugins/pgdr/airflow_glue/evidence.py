"""Receipts for the evidence log (:mod:`pgdr.evidence`) from Airflow tasks: the plan's log, opened with the signing
key's connection, and who caused the run."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from pgdr.runtime import VIA_ENV_VAR

log = logging.getLogger(__name__)


def open_evidence(plan):
    """The plan's :class:`~pgdr.evidence.EvidenceLog`, or ``None`` when the plan has no ``evidence`` section."""
    from pgdr.airflow_glue.connections import master_keys, open_store
    from pgdr.evidence import EvidenceLog

    if plan.evidence is None:
        return None
    store, _layout = open_store(plan.evidence.storage, plan)
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
    try:
        evidence = open_evidence(plan)
        if evidence is None:
            return None
        ti = context["ti"]
        airflow = {"dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id, "try_number": ti.try_number}
        log_url = getattr(ti, "log_url", None)
        if log_url:
            airflow["log_url"] = log_url
        if record is not None:
            record = (record[0], record[1], record[2]())
        receipt = evidence.append(
            event, actor_of(context), subject, result, {**(details or {}), "airflow": airflow}, record
        )
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
