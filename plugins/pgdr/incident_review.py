"""An incident restore measured: its timeline, MTTR and data-loss window, and the post-incident review it feeds.

An incident has more clocks than a restore. The restore's *achieved RTO* runs from its first
phase to its last (:func:`pgdr.records.achieved_rto`); the incident review needs the time from
the moment the incident was **declared** (given on the form, *Incident declared at*; default: the
moment the restore was triggered) to the moment the application is **served** again:

* time to act: declared → triggered (how long until someone started the restore);
* time to restore: triggered → restored (the copy holds the data);
* time to serve: restored → checks passed → served (the swap in ``replace`` mode; in
  ``new-database`` mode the hand-over, when the report gives the copy to the on-call);
* **MTTR**: declared → served;
* the **data-loss window**: from the recovery point the restore achieved to the failure moment
  (the declared time when the form gives one; otherwise the live server's newest commit when it
  tracks commit timestamps; otherwise the trigger time): the transactions the restored copy lacks.

:func:`read_incident` checks the form's two fields, :func:`incident_measures` computes the
timeline from what the phases returned, :func:`incident_lines` renders it with the post-incident
checklist: what pgdr can fill in itself, and the rest as questions for the review.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from pgdr.identifiers import printable
from pgdr.messages import duration_or_na

log = logging.getLogger(__name__)

MAX_INCIDENT_ID = 120
CLOCK_SKEW = timedelta(minutes=2)  # a declared time this far after the trigger is a clock, not a mistake


def read_incident(params: dict[str, Any], triggered_at: datetime) -> dict[str, Any]:
    """Check the form's *Incident declared at* and *Incident id*; return ``{"id", "declared_at", "triggered_at"}``.

    :param triggered_at: when the restore was asked for (the run's ``run_after``).
    :raises pgdr.incident.InvalidRestoreRequest: saying what to fix in the form.
    """
    from pgdr.incident import InvalidRestoreRequest, parse_timestamp

    raw_id = params.get("incident_id")
    incident_id = str(raw_id).strip() if raw_id is not None else ""
    if incident_id and (printable(incident_id) != incident_id or len(incident_id) > MAX_INCIDENT_ID):
        raise InvalidRestoreRequest(
            f"incident_id {printable(incident_id[:MAX_INCIDENT_ID])!r} must be printable and at most "
            f"{MAX_INCIDENT_ID} characters (a ticket number such as INC-2041). Nothing was touched."
        )
    raw = params.get("incident_declared_at")
    declared = None
    if raw is not None and str(raw).strip():
        declared = parse_timestamp(str(raw))
        declared = declared.astimezone(UTC) if declared else None
        if declared is None:
            raise InvalidRestoreRequest(
                f"incident_declared_at must be a UTC time such as 2026-11-22T09:30:00Z; got {printable(str(raw))!r}. "
                "Leave it empty to count from the moment the restore was triggered. Nothing was touched."
            )
        if declared > triggered_at + CLOCK_SKEW:
            raise InvalidRestoreRequest(
                f"incident_declared_at {declared.isoformat()} is after this restore was triggered "
                f"({triggered_at.isoformat()}): give the moment the incident was declared, in UTC, or leave it empty. "
                "Nothing was touched."
            )
    return {
        "id": incident_id or None,
        "declared_at": declared.isoformat() if declared else None,
        "triggered_at": triggered_at.isoformat(),
    }


def newest_commit(server) -> datetime | None:
    """The live server's newest commit time, when it tracks commit timestamps (``track_commit_timestamp``); else
    ``None``. Never fails the restore: it only sharpens the data-loss window.

    :param server: a :class:`pgdr.postgres.client.PgEndpoint` of the live server.
    """
    from pgdr.postgres.client import connect

    try:
        with connect(server.with_dbname("postgres")) as conn:
            row = conn.execute(
                "SELECT CASE WHEN current_setting('track_commit_timestamp')::bool "
                "THEN (pg_last_committed_xact()).timestamp END"
            ).fetchone()
    except Exception as err:  # noqa: BLE001 - an unreachable or damaged live server is why we restore
        log.info("The live server's newest commit is unknown (%s): the data-loss window ends at the trigger.", err)
        return None
    return row[0] if row else None


def _seconds(start: str | None, end: str | None) -> float | None:
    """:func:`pgdr.records.seconds_between` to a tenth of a second; ``None`` when a moment was not reached."""
    from pgdr.records import seconds_between

    return round(seconds_between(start, end), 1) if start and end else None


def incident_measures(
    plan: dict[str, Any], phases: dict[str, dict | None], status: str, written_at: str
) -> dict[str, Any]:
    """Return the incident's timeline, MTTR and data-loss window from the restore plan and what its phases returned.

    Times a restore did not reach stay ``None`` (a failed restore has no MTTR).
    """
    incident = plan.get("incident") or {}
    triggered = incident.get("triggered_at")
    declared = incident.get("declared_at") or triggered
    first = (plan.get("pitr") or {}).get("started_at") or (phases.get("check_checksums") or {}).get("started_at")
    restored = (phases.get("restore_backup") or {}).get("finished_at")
    checked = (phases.get("apply_privileges") or {}).get("finished_at")
    if status != "restored":
        served, served_by = None, None
    elif plan["mode"] == "replace":
        served, served_by = (phases.get("swap_into_place") or {}).get("finished_at"), "the swap"
    else:
        served, served_by = written_at, "the hand-over of the checked copy"
    if incident.get("declared_at"):
        loss_until, loss_source = incident["declared_at"], "the declared failure"
    elif incident.get("live_newest_commit"):
        loss_until, loss_source = incident["live_newest_commit"], "the live server's newest commit"
    else:
        loss_until, loss_source = triggered, "the trigger (no failure time was given)"
    loss = _seconds(plan.get("recovery_point"), loss_until)
    return {
        "id": incident.get("id"),
        "declared_at": declared,
        "declared_given": bool(incident.get("declared_at")),
        "triggered_at": triggered,
        "restore_started_at": first,
        "restored_at": restored,
        "checks_passed_at": checked,
        "served_at": served,
        "served_by": served_by,
        "time_to_act_seconds": _seconds(declared, triggered),
        "time_to_restore_seconds": _seconds(triggered, restored),
        "time_to_serve_seconds": _seconds(restored, served),
        "mttr_seconds": _seconds(declared, served),
        "recovery_point": plan.get("recovery_point"),
        "data_loss_until": loss_until,
        "data_loss_until_source": loss_source,
        # A recovery point after the failure lost nothing (a PITR to 'latest' past the declaration).
        "data_loss_window_seconds": None if loss is None else max(0.0, loss),
    }


def incident_record(
    kind: str, subject: str, run_id: str, status: str, measures: dict[str, Any], rto_target_seconds: float | None
) -> dict[str, Any]:
    """Return the short record of one incident restore or server recovery the drill's MTTR trend reads.

    :param kind: ``database restore`` or ``server recovery``.
    :param subject: the database or the server restored.
    :param measures: ``id``, ``declared_at``, ``served_at``, ``mttr_seconds``, ``data_loss_window_seconds``.
    """
    return {
        "kind": kind,
        "subject": subject,
        "run_id": run_id,
        "status": status,
        "rto_target_seconds": rto_target_seconds,
        **{k: measures.get(k) for k in INCIDENT_FIELDS},
    }


INCIDENT_FIELDS = ("id", "declared_at", "served_at", "mttr_seconds", "data_loss_window_seconds")
MAX_INCIDENT_RECORDS = 500  # a year of incidents many times over; a bucket flooded with more is not read whole


def store_incident_record(store, layout, record: dict[str, Any]) -> str | None:
    """Store an incident's record where backup retention never deletes it; return its key.

    Never fails the restore it records (its report is already stored): a record that cannot be written is logged
    as an error, and the drill's trend lacks that incident.
    """
    import hashlib
    import json

    key = None
    try:
        stamp = datetime.fromisoformat(record["declared_at"]).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
        name = hashlib.sha256(f"{record['kind']}\0{record['subject']}\0{record['run_id']}".encode()).hexdigest()[:12]
        key = layout.incident_key(stamp, name)
        store.put_bytes(key, json.dumps(record, indent=2).encode())
    except Exception as err:  # noqa: BLE001 - the restore is done and reported; this only feeds a trend
        log.error("The incident's record for the drill's MTTR trend could not be stored (%s): %s", key, err)
        return None
    return key


def incident_records(store, layout, since: datetime) -> list[dict[str, Any]]:
    """Return the incident records of a storage target declared at ``since`` or later, oldest first.

    Anything read from a bucket is untrusted: a record that is not one (not JSON, a wrong type, a time that is not
    one) is skipped with a warning, never a crash of the drill that reads it.
    """
    import json

    found = []
    keys = sorted(o.key for o in store.list(layout.report_key("incidents") + "/") if o.key.endswith(".json"))
    for key in keys[-MAX_INCIDENT_RECORDS:]:
        try:
            record = json.loads(store.get_bytes(key))
            declared = datetime.fromisoformat(record["declared_at"])
            numbers = [record.get(k) for k in ("mttr_seconds", "data_loss_window_seconds", "rto_target_seconds")]
            if not all(n is None or (isinstance(n, int | float) and not isinstance(n, bool)) for n in numbers):
                raise ValueError("a duration is not a number")
            if not all(isinstance(record.get(k), str) for k in ("kind", "subject", "status")):
                raise ValueError("kind, subject or status is not text")
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("Skipping incident record %s: it is not one pgdr wrote (%s).", key, err)
            continue
        if declared.tzinfo is not None and declared >= since:
            found.append(record)
    return sorted(found, key=lambda r: r["declared_at"])


def incident_headline(report: dict[str, Any]) -> list[str]:
    """Return the report's one-line summary of the incident (none for a dry run or a report without one)."""
    measures = report.get("incident")
    if not measures or report["status"] == "dry-run":
        return []
    return [
        "- Incident"
        + (f" {measures['id']}" if measures["id"] else "")
        + f": MTTR {duration_or_na(measures['mttr_seconds'])} (declared {measures['declared_at']}), data-loss window "
        f"{duration_or_na(measures['data_loss_window_seconds'])}"
    ]


def incident_lines(report: dict[str, Any]) -> list[str]:
    """Return the report's markdown sections *Incident* (timeline and measures) and *Post-incident review*."""
    measures, plan = report["incident"], report["plan"]
    rows = [
        ("declared" + ("" if measures["declared_given"] else " (the trigger: no time was given)"), "declared_at"),
        ("restore triggered", "triggered_at"),
        ("restore started", "restore_started_at"),
        ("data restored", "restored_at"),
        ("checks passed, owners and grants applied", "checks_passed_at"),
        (f"served again ({measures['served_by'] or 'not reached'})", "served_at"),
    ]
    lines = [
        "",
        "## Incident" + (f" {measures['id']}" if measures["id"] else ""),
        "",
        "| moment | UTC |",
        "| --- | --- |",
        *[f"| {what} | {measures[key] or 'not reached'} |" for what, key in rows],
        "",
        f"- Time to act (declared to triggered): {duration_or_na(measures['time_to_act_seconds'])}",
        f"- Time to restore (triggered to restored): {duration_or_na(measures['time_to_restore_seconds'])}",
        f"- Time to serve (restored to served): {duration_or_na(measures['time_to_serve_seconds'])}",
        f"- **MTTR** (declared to served): {duration_or_na(measures['mttr_seconds'])}"
        + (
            ""
            if measures["mttr_seconds"] is None
            else f" against an RTO of {duration_or_na(report['rto_target_seconds'])}"
        ),
        f"- **Data-loss window**: {duration_or_na(measures['data_loss_window_seconds'])}, from the recovery point "
        f"{measures['recovery_point']} to {measures['data_loss_until']} ({measures['data_loss_until_source']})",
    ]
    return lines + ["", "## Post-incident review", ""] + _review_lines(report, measures, plan)


def _review_lines(report: dict[str, Any], measures: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    """The post-incident checklist: filled in where pgdr knows the answer, asked where only people do."""
    integrity = report.get("integrity") or {}
    validation = report.get("validation") or {}
    done = report.get("privileges") or {}
    logins = [r for r, found in (done.get("app_roles") or {}).items() if isinstance(found, dict)]
    kept = (
        f"the previous live database is kept as `{plan['keep_live_as']}` (connections disabled, never dropped by "
        "pgdr): the transactions of the data-loss window are in it"
        if plan["mode"] == "replace" and plan.get("keep_live_as")
        else f"the live database `{plan['dbname']}` was not changed: the transactions of the data-loss window are "
        "still in it"
    )
    filled = [
        f"- [x] Timeline recorded (above); triggered by {report['triggered_by']} through "
        f"{report.get('via', 'Airflow')}, run `{report['run_id']}`",
        f"- [x] Backup used: `{plan['backup_id']}` ({plan['backup_status']}), recovery point {plan['recovery_point']}",
        f"- [x] Checks: {integrity.get('tables_checked', 'n/a')} tables and {integrity.get('rows_checked', 'n/a')} "
        f"rows counted exactly, pg_amcheck {'clean' if integrity.get('amcheck_ok') else 'not clean or not run'}; "
        + (
            f"{validation['expectations'] - validation['failed']} of {validation['expectations']} expectations passed"
            if validation
            else "data validation did not run"
        ),
        "- [x] Access review: "
        + (
            f"application logins {', '.join(f'`{r}`' for r in logins)} may do on the copy what they could on the live "
            "database"
            if logins
            else "no application logins are named in the plan (app_roles): compare their privileges by hand"
        )
        + (
            f"; roles created by the restore: {', '.join(printable(r) for r in report['roles_created'])}"
            if report.get("roles_created")
            else ""
        ),
        f"- [x] Data-loss window measured ({duration_or_na(measures['data_loss_window_seconds'])}); {kept}",
    ]
    questions = [
        "- [ ] Root cause: what failed, and why?",
        "- [ ] Detection: how was the incident noticed, and could it have been noticed before "
        f"{measures['declared_at']}?",
        "- [ ] The data-loss window: which of its transactions must be recovered or re-entered, and by whom?",
        "- [ ] Communication: were users and stakeholders told when it started and when it ended?",
        "- [ ] The plan: was the RTO met, and does the runbook, the DR plan or an alert need to change?",
        "- [ ] Action items, each with an owner and a date.",
    ]
    return ["Filled in by pgdr:", "", *filled, "", "For the review:", "", *questions]
