"""The words of every alert, built in one place.

An alert is read by an on-call engineer, often at night, often on a phone. Each message says
what failed (DAG, database, backup, phase), the first line of the error, whether Airflow will
try again, and where the log is. Secrets never reach a message: error text is scrubbed of
anything that looks like a password in a connection URI or key/value pair.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_SECRET_PATTERNS = [
    re.compile(r"(://[^:/@\s]+:)[^@\s]+(@)"),  # scheme://user:password@host
    re.compile(r"(?i)\b(password|passwd|pwd|secret|token|aws_secret_access_key)(\s*[=:]\s*)(\S+)"),
]


def scrub_secrets(text: str) -> str:
    """Mask passwords in URIs and ``password=...`` pairs."""
    text = _SECRET_PATTERNS[0].sub(r"\1********\2", text)
    return _SECRET_PATTERNS[1].sub(lambda m: f"{m.group(1)}{m.group(2)}********", text)


ERROR_LIMIT = 600
_CUT = " [...] "


def shorten(line: str, limit: int = ERROR_LIMIT) -> str:
    """Return ``line`` cut to at most ``limit`` characters by dropping its middle, at word breaks.

    pgdr's errors say what failed first and what to do last, and a long path or server message
    in between must not push the advice out of the alert; so the start and the end both stay.
    """
    if len(line) <= limit:
        return line
    room = limit - len(_CUT)
    head, tail = line[: room // 2], line[len(line) - (room - room // 2) :]
    head = head.rsplit(" ", 1)[0] if " " in head[len(head) // 2 :] else head
    tail = tail.split(" ", 1)[1] if " " in tail[: len(tail) // 2] else tail
    return head + _CUT + tail


def first_line(error: BaseException | str | None) -> str:
    """Return the first non-empty line of an error, scrubbed, at most ``ERROR_LIMIT`` characters."""
    if error is None:
        return "no error was recorded (the task may have been killed, or timed out)"
    text = str(error).strip() or type(error).__name__
    line = next((part.strip() for part in text.splitlines() if part.strip()), text)
    return shorten(scrub_secrets(line))


@dataclass(frozen=True)
class TaskFailure:
    """The facts of one failed task, as the failure callback gathers them."""

    dag_id: str
    task_id: str
    run_id: str
    database: str | None
    backup_id: str | None
    error: str
    try_number: int
    max_tries: int
    log_url: str
    will_retry: bool = False


def failure_message(failure: TaskFailure) -> str:
    """Return the text of one task failure (logged by the task; Slack gets the run's message)."""
    subject = f"{failure.dag_id}"
    if failure.database:
        subject += f" for database *{failure.database}*"
    lines = [f":red_circle: [pgdr] {subject} failed in phase `{failure.task_id}`"]
    if failure.backup_id:
        lines.append(f"Backup: `{failure.backup_id}`")
    lines.append(f"Error: {failure.error}")
    attempts = f"Attempt {failure.try_number} of {failure.max_tries}"
    lines.append(f"{attempts}: Airflow will retry." if failure.will_retry else f"{attempts}: no more retries; act now.")
    lines.append(f"Run: {failure.run_id}")
    lines.append(f"Log: {failure.log_url}")
    return "\n".join(lines)


def format_duration(seconds: float) -> str:
    """Return ``1h 02m``, ``4m 05s`` or ``12.3s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def rto_breach_message(
    dag_id: str, database: str, backup_id: str, achieved_s: float, target_s: float, run_url: str
) -> str:
    """Return the Slack text of a restore that took longer than the plan's RTO."""
    return "\n".join(
        [
            f":warning: [pgdr] RTO breached for database *{database}*: a restore took "
            f"{format_duration(achieved_s)}, the plan promises {format_duration(target_s)}",
            f"Measured by {dag_id} restoring backup `{backup_id}` (download, restore, checks and validation).",
            "The backup itself is good. Act: restore faster (more dump_jobs, a bigger verification server) or agree "
            "a realistic RTO and change it in the plan.",
            f"Run: {run_url}",
        ]
    )


def short_duration(td) -> str:
    """Return a plan-style duration: ``30m``, ``1h``, ``1h 30m``, ``45s``, ``2d``."""
    seconds = int(td.total_seconds()) if hasattr(td, "total_seconds") else int(td)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{v}{u}" for v, u in ((days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")) if v]
    return " ".join(parts) or "0s"


def run_url(base_url: str, dag_id: str, run_id: str) -> str:
    """Return the link to a DAG run in the Airflow UI."""
    from urllib.parse import quote

    return f"{base_url.rstrip('/')}/dags/{dag_id}/runs/{quote(run_id, safe='')}"


def run_failure_message(
    dag_id: str, run_id: str, failures: list[TaskFailure], url: str, journal_error: str | None = None
) -> str:
    """Return the one Slack message of a failed run, naming every failed phase and its error."""
    databases = sorted({f.database for f in failures if f.database})
    scope = f" for database{'s' if len(databases) > 1 else ''} *{', '.join(databases)}*" if databases else ""
    lines = [f":red_circle: [pgdr] {dag_id}{scope} failed"]
    for failure in failures[:5]:
        where = f"phase `{failure.task_id}`" + (
            f" ({failure.database})" if failure.database and len(databases) > 1 else ""
        )
        backup = f", backup `{failure.backup_id}`" if failure.backup_id else ""
        lines.append(f"- {where}{backup}: {failure.error}")
        lines.append(
            f"  Attempt {failure.try_number} of {failure.max_tries}: no more retries; act now. Log: {failure.log_url}"
        )
    if len(failures) > 5:
        lines.append(f"- and {len(failures) - 5} more failed tasks")
    if not failures:
        detail = f" (the alert journal could not be read: {first_line(journal_error)})" if journal_error else ""
        lines.append(f"No task recorded its error{detail}; open the run to see which task failed and why.")
    lines.append(f"Run: {run_id} {url}")
    return "\n".join(lines)


def recovery_message(dag_id: str, run_id: str, failing_since: str | None, failed_run: str | None, url: str) -> str:
    """Return the Slack message sent when a DAG that was failing succeeds again."""
    since = f" (failing since {failing_since}, run {failed_run})" if failing_since else ""
    return "\n".join(
        [
            f":large_green_circle: [pgdr] {dag_id} recovered: run {run_id} succeeded{since}.",
            f"Run: {url}",
        ]
    )


def deadline_message(
    kind: str, dag_id: str, scope: str, target: str, run_id: str, queued_at: str, deadline_time: str, url: str
) -> str:
    """Return the Slack text of a deadline warning (``warning``) or miss (``missed``)."""
    if kind == "warning":
        head = (
            f":hourglass_flowing_sand: [pgdr] SLA at risk: {dag_id} {scope} has used 80% of its {target} and is "
            "still running"
        )
        act = "Check the run: is it slow, stuck or waiting for a worker?"
    else:
        head = f":rotating_light: [pgdr] SLA missed: {dag_id} {scope} did not finish within its {target}"
        act = "The promise in the DR plan is broken for this run: find out why, and tell whoever relies on it."
    return "\n".join([head, f"Run {run_id}, queued at {queued_at}, deadline {deadline_time}.", act, f"Run: {url}"])


def sla_miss_email(
    dag_id: str, scope: str, target: str, run_id: str, queued_at: str, deadline_time: str, url: str
) -> tuple[str, str]:
    """Return the subject and HTML body of an SLA-miss e-mail."""
    import html

    subject = f"[pgdr] SLA missed: {dag_id} {scope} ({target})".replace("  ", " ")
    rows = "".join(
        f"<tr><th align='left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
        for k, v in (
            ("DAG", dag_id),
            ("Scope", scope),
            ("Target", target),
            ("Run", run_id),
            ("Queued at", queued_at),
            ("Deadline", deadline_time),
        )
    )
    body = (
        f"<p>The run below of <b>{html.escape(dag_id)}</b> did not finish within its {html.escape(target)}, as the "
        f"DR plan promises.</p><table>{rows}</table><p><a href='{html.escape(url)}'>Open the run in "
        "Airflow</a></p><p>The run goes on; this message is about time. Find out why it is slow, and tell whoever "
        "relies on the target.</p><p>-- pgdr</p>"
    )
    return subject, body


SUPERUSER_RESTORE_WARNING = (
    "WARNING: restore_as_superuser is set for this database: the restore ran as a superuser, so code in the "
    "restored schema ran with superuser rights. Remove the setting unless you trust every owner of its schemas."
)


RESTORE_AS_SUPERUSER_CAVEAT = (
    "only if you trust every owner of its schemas, because restored code then runs as a superuser (README, Security "
    "model). Retrying cannot fix this."
)


def duration_or_na(seconds: float | None) -> str:
    """Return ``seconds`` as a duration, ``n/a`` when unknown."""
    return format_duration(seconds) if seconds is not None else "n/a"


def restore_summary(report: dict[str, Any], location: str) -> str:
    """Return the Slack text that sums up a restore."""
    plan = report["plan"]
    icon = ":white_check_mark:" if report["status"] == "restored" else ":red_circle:"
    head = f"{icon} [pgdr] Restore of *{plan['database']}* {report['status']}: backup `{plan['backup_id']}` "
    head += f"(recovery point {plan['recovery_point']}) into `{plan['target']}` ({plan['mode']})"
    lines = [
        head,
        f"Triggered by {report['triggered_by']}. Achieved RTO {duration_or_na(report['achieved_rto_seconds'])}, "
        f"target {duration_or_na(report['rto_target_seconds'])}.",
    ]
    measures = report.get("incident")
    if measures and measures["mttr_seconds"] is not None:
        lines.append(
            ("Incident " + measures["id"] + ": " if measures["id"] else "")
            + f"MTTR {duration_or_na(measures['mttr_seconds'])} from the declaration at {measures['declared_at']}; "
            f"data-loss window {duration_or_na(measures['data_loss_window_seconds'])}."
        )
    if plan["mode"] == "replace" and report["status"] == "restored":
        lines.append(
            f"`{plan['dbname']}` now holds the restored data; the previous database is kept as "
            f"`{plan['keep_live_as']}`."
        )
    if report["failed_phase"]:
        lines.append(f"Failed in phase {report['failed_phase']}; the live database was not changed.")
    lines.append(f"Report: {location}")
    return "\n".join(lines)


def pitr_target_words(target: str) -> str:
    """Return a recovery target as a sentence says it: ``2026-11-26T09:40:59+00:00 UTC``, or the end of the archive."""
    return "the end of the archive (latest)" if target == "latest" else f"{target} UTC"


def server_recovery_summary(report: dict[str, Any]) -> str:
    """Return the Slack text of a whole server recovered onto a new host, from its report."""
    loss = report["data_loss_window_seconds"]
    incident = f"(incident {report['incident_id']}) " if report.get("incident_id") else ""
    return (
        f":white_check_mark: [pgdr] Server {report['server']} {report['status']} on {report['host']} {incident}"
        f"({report['data_dir']}): recovery point {report['achieved_recovery_point']}, data-loss window "
        f"{format_duration(loss) if loss is not None else 'unknown'}, achieved RTO "
        f"{format_duration(report['achieved_rto_seconds'])}. archive_mode is off until it archives into a new "
        f"prefix. Report: {report['report']}"
    )


def server_recovery_failed(server: str, target: str, host: str, error: str) -> str:
    """Return the Slack text of a whole-server recovery that failed on ``host`` (the command-line path)."""
    return (
        f":x: [pgdr] The recovery of server {server} to {pitr_target_words(target)} on {host} failed: {error}\n"
        "The old host was not contacted. Run it again with --delta on the same data directory to finish it "
        "(files already in place are kept when they match the backup)."
    )


def restore_not_planned(plan: dict[str, Any] | None) -> str | None:
    """Return why a restore has nothing to report on (its planning or its point-in-time recovery
    failed), or ``None``."""
    if not plan:
        return "The restore was not planned (plan_restore failed; its alert and log say why). Nothing was touched."
    if plan.get("pitr") and not plan.get("backup_id") and not plan["dry_run"]:
        return (
            f"The point-in-time recovery of {plan['database']} to {pitr_target_words(plan['pitr']['target'])} failed "
            f"in recover_to_moment (its alert and log say why); the live database {plan['dbname']!r} was not changed."
        )
    return None


def drill_summary(report: dict[str, Any], headline: list[str], location: str) -> str:
    """Return the Slack text of a drill: its verdict, one line per database and server, the report's place."""
    icon = ":white_check_mark:" if report["status"] == "pass" else ":warning:"
    return "\n".join(
        [f"{icon} [pgdr] DR drill {report['drill_id']}: {report['status'].upper()}", *headline, f"Report: {location}"]
    )


def verification_failed(backup_id: str, database: str, phase: str, copy: str | None = None) -> str:
    """Return why a verify-restore marked a backup failed (restored from copy target ``copy``, if one)."""
    if copy:
        return (
            f"Backup {backup_id} of database {database!r} in copy {copy!r} is marked FAILED there: phase {phase} did "
            "not succeed restoring it from the copy (its own alert and log say why). The copy of this backup is kept; "
            "do not rely on it for a restore from the copy, and compare it with the source's (pgdr_copy copies a "
            "backup only once)."
        )
    return (
        f"Backup {backup_id} of database {database!r} is marked FAILED: phase {phase} did not succeed (its own "
        "alert and log say why). The backup is kept; do not rely on it for a restore."
    )


def restore_failed(plan: dict[str, Any], phase: str, report: str) -> str:
    """Return why a restore failed: the phase, and that the live database was not changed."""
    return (
        f"The restore of {plan['database']} from backup {plan['backup_id']} failed in phase {phase}; the live "
        f"database {plan['dbname']!r} was not changed. Report: {report}"
    )


def transition_message(failing: list, recovered: list) -> str:
    """Return one Slack message for every health check that changed state in this run (``CheckResult``s)."""
    lines = []
    if failing:
        lines.append(":red_circle: [pgdr] health check failing:")
        lines += [f"- {r.database}: {r.check}: {r.detail}" for r in failing]
    if recovered:
        lines.append(":large_green_circle: [pgdr] health check recovered:")
        lines += [f"- {r.database}: {r.check}: {r.detail}" for r in recovered]
    return "\n".join(lines)
