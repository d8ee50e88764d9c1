"""The words of every alert, built in one place.

An alert is read by an on-call engineer, often at night, often on a phone. Each message says
what failed (DAG, database, backup, phase), the first line of the error, whether Airflow will
try again, and where the log is. Secrets never reach a message: error text is scrubbed of
anything that looks like a password in a connection URI or key/value pair.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SECRET_PATTERNS = [
    re.compile(r"(://[^:/@\s]+:)[^@\s]+(@)"),  # scheme://user:password@host
    re.compile(r"(?i)\b(password|passwd|pwd|secret|token|aws_secret_access_key)(\s*[=:]\s*)(\S+)"),
]


def scrub_secrets(text: str) -> str:
    """Mask passwords in URIs and ``password=...`` pairs."""
    text = _SECRET_PATTERNS[0].sub(r"\1********\2", text)
    return _SECRET_PATTERNS[1].sub(lambda m: f"{m.group(1)}{m.group(2)}********", text)


def first_line(error: BaseException | str | None) -> str:
    """Return the first non-empty line of an error, scrubbed, at most 300 characters."""
    if error is None:
        return "no error was recorded (the task may have been killed, or timed out)"
    text = str(error).strip() or type(error).__name__
    line = next((part.strip() for part in text.splitlines() if part.strip()), text)
    line = scrub_secrets(line)
    return line if len(line) <= 300 else line[:297] + "..."


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
    """Return the Slack text of a task failure."""
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


def rto_breach_message(dag_id: str, database: str, backup_id: str, achieved_s: float, target_s: float, run_url: str) -> str:
    """Return the Slack text of a restore that took longer than the plan's RTO."""
    return "\n".join([
        f":warning: [pgdr] RTO breached for database *{database}*: a restore took {format_duration(achieved_s)}, "
        f"the plan promises {format_duration(target_s)}",
        f"Measured by {dag_id} restoring backup `{backup_id}` (download, restore, checks and validation).",
        "The backup itself is good. Act: restore faster (more dump_jobs, a bigger verification server) "
        "or agree a realistic RTO and change it in the plan.",
        f"Run: {run_url}",
    ])
