"""
### pgdr_evidence: the quarterly evidence pack for auditors (and on demand)

Builds the evidence pack of a period from the plan's **evidence log** (the signed, hash-chained receipts every
backup, verification, drill, restore, key rotation and retention run writes) and stores it beside the log, under
`<evidence storage>/evidence-v1/packs/<from>_<to>/`: `pack.html` (for people), `pack.json` (every number),
`chart.png` and `SHA256SUMS`. Per database and server: backups taken against the schedule (missed runs named),
restore tests (count, pass rate, median and worst RTO against the target), PITR verifications, drills with their
action items, incidents with their timelines and MTTR, key rotations and encryption; each section mapped to the
control it evidences (SOC 2 A1.2/A1.3, ISO 27001 A.8.13/A.5.29/A.5.30), with the chain's verification result and
the SHA-256 of `pack.json`. Its own receipt (`evidence_exported`) records that SHA-256 in the chain.

Then **prune_receipts** deletes the receipts older than the plan's `evidence.keep` (400 days by default), oldest
first, never the newest, none still under Object Lock: a signed anchor (`anchor.json`) first names the first receipt
kept, so the chain verifies from there; a `retention_deleted` receipt records it. It deletes nothing while the chain
does not verify, and runs only after the pack was stored.

Scheduled on the first day of each quarter (06:00 UTC) for the quarter before. Trigger it by hand with **from** and
**to** (UTC dates, both included) for any other period; `python -m pgdr evidence export` writes the same pack to a
folder.

**When it fails**: *export_pack*: the plan has no `evidence:` section (add one), its storage or signing-key
connection is missing (the message names it), or the chain does not verify: the pack is still stored (its first
finding names the broken receipt); run `python -m pgdr evidence verify` and find out who changed the bucket.
Findings such as a missed backup do not fail the run: they are in the pack and in the Slack summary.
*prune_receipts*: the chain does not verify (nothing was deleted), or the pruner's connection may not delete there.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import CronTriggerTimetable, Param, dag, task
from pgdr.airflow_glue.defaults import default_args
from pgdr.airflow_glue.notify import run_callbacks
from pgdr.airflow_glue.parsing import builds
from pgdr.plan import load_plan
from pgdr.tasks import call

PLAN = load_plan()


@dag(
    dag_id="pgdr_evidence",
    schedule=CronTriggerTimetable("0 6 1 1,4,7,10 *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["pgdr", "evidence", "audit", "disaster-recovery"],
    default_args=default_args(PLAN, execution_timeout=timedelta(hours=1)),
    **run_callbacks(),
    doc_md=__doc__,
    params={
        "from": Param(
            None,
            type=["null", "string"],
            title="From (UTC date, optional)",
            description="The period's first day (2026-10-01). Leave both empty for the quarter before the run.",
        ),
        "to": Param(
            None,
            type=["null", "string"],
            title="To (UTC date, optional)",
            description="The period's last day, included (2026-12-31).",
        ),
    },
)
def pgdr_evidence():
    @task
    def export_pack() -> dict:
        """Verify the chain, build the pack of the period, store it beside the log, write its receipt."""
        return call("evidence.run_export_pack")

    @task
    def prune_receipts() -> dict:
        """Delete the receipts older than evidence.keep behind a signed anchor (never while the chain is broken)."""
        return call("evidence.run_prune_receipts")

    export_pack() >> prune_receipts()


if builds("pgdr_evidence"):  # all of them, except under pgdr's dag.test() of another DAG
    pgdr_evidence()
