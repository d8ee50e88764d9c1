"""Exceptions named for the outcome an on-call engineer sees.

Two families matter to Airflow: a :class:`PermanentFailure` cannot be fixed by retrying (a
checksum mismatch, a bad plan, a failed expectation) and is turned into
``AirflowFailException`` by the task layer so it pages at once; everything else is transient
(a refused connection, a timeout) and is retried with backoff.
"""

from __future__ import annotations


class PgdrError(Exception):
    """Base class of every error pgdr raises on purpose."""


class PermanentFailure(PgdrError):
    """A failure that retrying cannot fix; the task fails at once without retries."""


class PlanError(PermanentFailure):
    """The DR plan file is missing, unreadable or invalid."""


class ConnectionNotDefined(PermanentFailure):
    """The plan names an Airflow connection that does not exist."""


class DatabaseUnreachable(PgdrError):
    """The database server did not answer; retrying may help."""


class AuthenticationFailed(PermanentFailure):
    """The server refused the credentials of the Airflow connection."""


class DumpFailed(PgdrError):
    """``pg_dump`` exited with an error."""


class StorageUnavailable(PgdrError):
    """The storage target did not answer or refused a request; retrying may help."""


class BackupNotFound(PermanentFailure):
    """No complete backup (one with a manifest) matches what was asked for."""


class ChecksumMismatch(PermanentFailure):
    """A stored backup file does not match the checksum in its manifest."""


class CompressionUnsupported(PermanentFailure):
    """The PostgreSQL client tools on this worker were built without the compression asked for."""


class WorkSpaceFull(PgdrError):
    """The worker's work directory ran out of space; retrying may pass once space is freed."""


def work_space_full(what: str, where: str, detail: str = "") -> WorkSpaceFull:
    """Return the error of a task whose work directory ``where`` is full, saying what to do."""
    return WorkSpaceFull(
        f"{what} failed: No space left on device in {where}{f' ({detail})' if detail else ''}. The worker needs "
        "room there for the whole backup (about the backup's stored size). Free space on that disk, or point "
        "$PGDR_WORK_DIR at a larger one on every worker; the task will retry. Nothing was stored or restored."
    )
