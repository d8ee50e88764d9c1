"""What the task of ``pgdr_evidence`` does: build the evidence pack of a period and store it beside the log."""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from pgdr.airflow_glue.task_run import fail_fast

log = logging.getLogger(__name__)


def quarter_before(moment: datetime) -> tuple[datetime, datetime]:
    """The calendar quarter before the one ``moment`` is in: its first instant and its last (UTC)."""
    moment = moment.astimezone(UTC)
    first_of_this = datetime(moment.year, 3 * ((moment.month - 1) // 3) + 1, 1, tzinfo=UTC)
    last = first_of_this - timedelta(microseconds=1)
    return datetime(last.year, 3 * ((last.month - 1) // 3) + 1, 1, tzinfo=UTC), last


def period_of(params: dict[str, Any], run_at: datetime) -> tuple[datetime, datetime]:
    """The period a run exports: the form's ``from``/``to`` (UTC dates or times; ``to``'s whole day), or the
    quarter before the run. :class:`~pgdr.errors.PgdrError` for one without the other, or a date that is not one."""
    from pgdr.errors import PgdrError
    from pgdr.evidence_pack import utc_bound

    since, until = params.get("from"), params.get("to")
    if not since and not until:
        return quarter_before(run_at)
    if not since or not until:
        raise PgdrError("give both 'from' and 'to' (UTC dates, e.g. 2026-10-01 and 2026-12-31), or neither")
    return utc_bound(since), utc_bound(until, end_of_day=True)


def run_export_pack(context) -> dict[str, Any]:
    """Body of ``export_pack``: the pack of the period, stored under ``<log>/packs/<from>_<to>/``; its receipt;
    a Slack summary. Fails (after storing the pack) when the chain does not verify."""
    from airflow.sdk.exceptions import AirflowFailException

    from pgdr.airflow_glue.evidence import export_evidence_pack, open_evidence, pack_prefix, record_evidence
    from pgdr.airflow_glue.notify import send_slack
    from pgdr.evidence_pack import findings
    from pgdr.plan import load_plan

    with fail_fast():
        plan = load_plan()
        dag_run = context["dag_run"]
        run_at = getattr(dag_run, "run_after", None) or getattr(dag_run, "logical_date", None) or datetime.now(UTC)
        since, until = period_of(context["params"], run_at)
        pack, files = export_evidence_pack(plan, since, until)
        evidence = open_evidence(plan)
        prefix = pack_prefix(evidence, since, until)
        for name, data in files.items():
            evidence.store.put_bytes(prefix + name, data)
    location = evidence.store.describe(prefix + "pack.html")
    digest = hashlib.sha256(files["pack.json"]).hexdigest()
    found = findings(pack)
    period = f"{since:%Y-%m-%d} to {until:%Y-%m-%d}"
    details = {
        "period": pack["period"],
        "pack_json_sha256": digest,
        "files": {n: hashlib.sha256(b).hexdigest() for n, b in files.items() if n != "SHA256SUMS"},
        "chain_ok": pack["chain"]["ok"],
        "findings": len(found),
        "location": location,
    }
    result = "ok" if pack["chain"]["ok"] else "failed"
    record_evidence(context, plan, "evidence_exported", {"period": period}, result, details)
    icon = ":page_facing_up:" if pack["chain"]["ok"] else ":red_circle:"
    lines = [f"{icon} [pgdr] Evidence pack {period}: {pack['chain']['summary']}. {location} (SHA-256 {digest[:16]}…)"]
    lines += [f"• {f}" for f in found[:10]] + ([f"… and {len(found) - 10} more in the pack"] if len(found) > 10 else [])
    send_slack("\n".join(lines), None, context)
    log.info("Evidence pack %s stored in %s; %d findings.", period, location, len(found))
    if not pack["chain"]["ok"]:
        raise AirflowFailException(
            f"The evidence pack {period} is stored ({location}), but the evidence chain does not verify: "
            f"{pack['chain']['summary']}. Run python -m pgdr evidence verify and find out who changed the bucket."
        )
    return {"period": period, "location": location, "pack_json_sha256": digest, "findings": len(found)}


def run_prune_receipts(context) -> dict[str, Any]:
    """Body of ``prune_receipts``: delete the receipts older than the plan's ``evidence.keep`` behind a signed
    anchor (:meth:`pgdr.evidence.EvidenceLog.prune`); a receipt of what was deleted."""
    from pgdr.airflow_glue.evidence import open_evidence, record_evidence
    from pgdr.errors import PgdrError
    from pgdr.plan import load_plan

    with fail_fast():
        plan = load_plan()
        evidence = open_evidence(plan, pruning=True)
        if evidence is None:
            raise PgdrError(f"the DR plan {plan.path} keeps no evidence log: add an 'evidence:' section")
        done = evidence.prune(plan.evidence.keep)
    if done["held_until"]:
        log.info(
            "Receipts due for pruning are under Object Lock until %s: a later run deletes them.", done["held_until"]
        )
    if done["deleted"]:
        details = {**done, "keep_days": plan.evidence.keep.total_seconds() / 86400}
        record_evidence(context, plan, "retention_deleted", {"evidence": "receipts"}, "ok", details)
    log.info(
        "%d receipts older than %s deleted from %s; the chain starts at receipt %d.",
        done["deleted"],
        done["cutoff"],
        evidence.describe(),
        done["first_kept"],
    )
    return done
