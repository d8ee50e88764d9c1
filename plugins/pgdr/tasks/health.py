"""What the tasks of ``pgdr_health`` do: check every database and the workers, alert on changes of state."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from pgdr.airflow_glue.connections import resources
from pgdr.airflow_glue.metrics import emit_metrics
from pgdr.airflow_glue.notify import CONTEXT_DATABASE
from pgdr.airflow_glue.task_run import fail_fast

log = logging.getLogger(__name__)


def run_health_database(database: str, context) -> list[dict[str, Any]]:
    """Body of ``check_database``: source, storage, backup ages; emits metrics. Never fails on a bad check."""
    from dataclasses import asdict

    from pgdr.health import check_database

    context[CONTEXT_DATABASE] = database
    with fail_fast():
        res = resources()
        db = res.plan.database(database)
    results, extra = check_database(db, res, datetime.now(UTC))
    emit_metrics(results, extra)
    return [asdict(r) for r in results]


def run_health_server(server_name: str, context) -> list[dict[str, Any]]:
    """Body of ``check_server``: heartbeat, archiver and WAL archive lag of one PITR server; emits metrics."""
    from dataclasses import asdict

    from pgdr.airflow_glue.task_run import CONTEXT_SERVER
    from pgdr.health import check_pitr_server, log_results

    context[CONTEXT_SERVER] = server_name
    context[CONTEXT_DATABASE] = f"server {server_name}"
    with fail_fast():
        res = resources()
        server = res.plan.server(server_name)
    results, extra = check_pitr_server(server, res, datetime.now(UTC), f"pgdr_health {context['ti'].run_id}")
    emit_metrics(results, extra)
    log_results(results, f"server {server_name}")
    return [asdict(r) for r in results]


def run_health_workers(context) -> list[dict[str, Any]]:
    """Body of ``check_workers``: free space where pgdr keeps its work files."""
    from dataclasses import asdict

    from pgdr.health import check_free_space
    from pgdr.plan import load_plan
    from pgdr.workdir import work_dir_root

    result = check_free_space(work_dir_root(), load_plan().health.min_free_gb)
    emit_metrics([result])
    log.log(logging.INFO if result.ok else logging.WARNING, "%s", result.detail)
    return [asdict(result)]


EVIDENCE_CURSOR = "evidence-chain-cursor"
EVIDENCE_FULL_WALK_EVERY = timedelta(days=1)


def run_health_evidence(context) -> list[dict[str, Any]]:
    """Body of ``check_evidence``: the evidence log's chain, from the receipt the last run checked to the newest,
    and the whole chain once a day (a receipt edited behind the cursor is found then). ``[]`` without a log."""
    from dataclasses import asdict

    from pgdr.airflow_glue.alert_journal import AlertJournal
    from pgdr.airflow_glue.evidence import open_evidence
    from pgdr.health import CheckResult
    from pgdr.messages import first_line
    from pgdr.plan import load_plan

    plan = load_plan()
    if plan.evidence is None:
        return []
    now = datetime.now(UTC)
    journal = AlertJournal.for_plan()
    cursor = journal.get_state(EVIDENCE_CURSOR) or {}
    try:
        walked_at = datetime.fromisoformat(cursor["full_at"])
        after = (int(cursor["seq"]), str(cursor["digest"]))
    except (KeyError, TypeError, ValueError):  # none yet, or not one pgdr wrote
        walked_at, after = None, None
    full = after is None or walked_at is None or now - walked_at > EVIDENCE_FULL_WALK_EVERY
    try:
        evidence = open_evidence(plan)
        report = evidence.verify(after=None if full else after)
    except Exception as err:  # noqa: BLE001 - the failure is the result
        result = CheckResult("evidence_chain", "plan", False, f"the evidence log cannot be read: {first_line(err)}")
    else:
        if report.ok and report.last_seq:
            at = now if full else walked_at
            journal.set_state(
                EVIDENCE_CURSOR, {"seq": report.last_seq, "digest": report.last_digest, "full_at": at.isoformat()}
            )
        detail = report.summary() if full or not report.ok else f"{report.summary()} (checked since the last run)"
        if not report.ok:
            detail += f". python -m pgdr evidence verify lists every problem; the log is {evidence.describe()}"
        result = CheckResult("evidence_chain", "plan", report.ok, detail, float(len(report.problems)))
    emit_metrics([result])
    log.log(logging.INFO if result.ok else logging.WARNING, "%s", result.detail)
    return [asdict(result)]


def _health_receipt(failing, recovered, context) -> None:
    """The evidence receipt of health checks that changed state: which started failing (and why), which recovered."""
    from pgdr.airflow_glue.evidence import record_evidence
    from pgdr.plan import load_plan

    plan = load_plan()
    if plan.evidence is None:  # no evidence log
        return

    def listed(results) -> list[dict[str, str]]:
        return [{"check": r.check, "database": r.database, "detail": r.detail} for r in results]

    record_evidence(
        context,
        plan,
        "health_state_changed",
        {"checks": sorted(f"{r.database}:{r.check}" for r in (*failing, *recovered))},
        "failed" if failing else "ok",
        {"failing": listed(failing), "recovered": listed(recovered)},
    )


def run_health_alerts(results: list[list[dict[str, Any]]], context) -> dict[str, Any]:
    """Body of ``alert_on_changes``: one Slack message for the checks that changed state, if any."""
    from pgdr.airflow_glue.alert_journal import AlertJournal
    from pgdr.airflow_glue.notify import send_slack
    from pgdr.health import CheckResult, transitions
    from pgdr.messages import transition_message

    flat = [CheckResult(**r) for group in results for r in (group or [])]
    failing, recovered = transitions(flat, AlertJournal.for_plan())
    if failing or recovered:
        send_slack(transition_message(failing, recovered), None, context)
        _health_receipt(failing, recovered, context)
    still = [r for r in flat if not r.ok]
    log.info("%d checks, %d failing (%d new), %d recovered.", len(flat), len(still), len(failing), len(recovered))
    return {
        "checks": len(flat),
        "failing": [f"{r.database}:{r.check}" for r in still],
        "newly_failing": len(failing),
        "recovered": len(recovered),
    }
