"""Backups from a hot standby, so that the primary does not read a single table for them (#31).

A database of the plan may name ``source_conn_id``: a streaming replica of its server; so may a PITR server, for its
base backups (:mod:`pgdr.physical.basebackup`, which says what differs there). Before each backup pgdr asks
the primary for its current WAL position and the standby how far it has replayed:

- its lag is how long it takes to replay everything the primary had written when asked (0 when it has already);
  pgdr waits for that at most ``max_standby_lag`` (and 10 s), then takes the time since the last transaction it
  replayed (an upper bound: the primary may have written no transaction since);
- a standby lagging more than ``max_standby_lag``, not in recovery any more (promoted, or the connection points at a
  primary), or unreachable is not used: the backup is taken from the primary with a warning, or fails, as the plan's
  ``on_standby_lag`` says (``primary``, the default, or ``fail``).

The recovery point of a backup taken there is not the standby's clock: it is the primary's time just before the
snapshot when the standby had replayed everything written by then, else the commit time of the last transaction it
had replayed (``pg_last_xact_replay_timestamp()``), both read before the snapshot is taken (which holds at least that).

A long dump on a standby conflicts with replay: the standby either delays replay or cancels the dump ("conflict with
recovery"); ``hot_standby_feedback = on`` and ``max_standby_streaming_delay`` longer than a dump avoid that. Parallel
dumps from a standby work on PostgreSQL 10 and newer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime

from pgdr.errors import PgdrError
from pgdr.messages import first_line, format_duration
from pgdr.plan import ProtectedDatabase, ProtectedServer
from pgdr.postgres.client import PgEndpoint, connect

log = logging.getLogger(__name__)


class StandbyNotUsable(PgdrError):
    """The standby a database is backed up from lags too far, is not a standby, or cannot be reached (retried)."""


@dataclass(frozen=True)
class PrimaryMark:
    """The primary's WAL position and clock, read just before a standby's snapshot."""

    lsn: str
    at: datetime


@dataclass(frozen=True)
class BackupSource:
    """Where a backup is dumped from: the primary, or a standby with the primary's mark to date its snapshot."""

    endpoint: PgEndpoint
    primary_mark_from: PgEndpoint | None = None  # the primary, when ``endpoint`` is a standby
    lag_s: float | None = None  # the standby's lag when it was chosen
    note: str | None = None  # why the standby was not used (a warning for the on-call), else None

    @property
    def role(self) -> str:
        return "standby" if self.primary_mark_from is not None else "primary"

    def summary(self) -> dict:
        """What the backup's summary (XCom, asset event) says of its source."""
        summary: dict = {"source": self.role, "source_conn_id": self.endpoint.conn_id}
        if self.lag_s is not None:
            summary["standby_lag_s"] = round(self.lag_s, 3)
        return summary


def primary_mark(primary: PgEndpoint) -> PrimaryMark:
    """Read the primary's current WAL position (where the next record goes: a transaction committed asynchronously
    is visible before its WAL is written) and time."""
    with connect(primary.with_dbname("postgres"), application_name="pgdr-primary-mark") as conn:
        lsn, at = conn.execute("SELECT pg_current_wal_insert_lsn()::text, now()").fetchone()
    return PrimaryMark(lsn, at)


CATCH_UP_WAIT_S = 10.0  # at most this long a lag check waits for a standby to replay up to the primary's mark


def standby_lag(standby: PgEndpoint, mark: PrimaryMark, limit_s: float) -> float | None:
    """Return how many seconds ``standby`` lags behind the primary whose ``mark`` was just read: how long it takes to
    replay up to the mark (0 when it has already), waiting at most ``limit_s`` (and :data:`CATCH_UP_WAIT_S`); when it
    does not get there in that time, the time since its last replayed transaction, or the wait if longer (None: it has
    replayed none since it started). :class:`StandbyNotUsable` when it is not in recovery."""
    with connect(standby, application_name="pgdr-standby-lag") as conn:
        reading = _replay_to_mark(conn, standby, mark, min(limit_s, CATCH_UP_WAIT_S))
    if reading.caught_up:
        return reading.waited if reading.waited > 0.2 else 0.0  # the first look: caught up already
    return None if reading.since_last is None else max(reading.waited, reading.since_last)


@dataclass(frozen=True)
class _ReplayReading:
    caught_up: bool  # replayed up to the mark
    last_commit: datetime | None  # the last replayed transaction's commit time (None: none since it started)
    since_last: float | None  # seconds from that commit to the standby's now()
    waited: float  # seconds waited for it to get to the mark


def _replay_to_mark(conn, standby: PgEndpoint, mark: PrimaryMark, budget_s: float) -> _ReplayReading:
    """Read, on ``conn`` to ``standby``, how far it has replayed relative to ``mark``, again every 50 ms until it is
    there or ``budget_s`` has passed. :class:`StandbyNotUsable` when it is not in recovery (promoted, or a primary)."""
    started = time.monotonic()
    while True:
        in_recovery, caught_up, last_commit, since_last = conn.execute(
            "SELECT pg_is_in_recovery(), coalesce(pg_last_wal_replay_lsn() >= %s::pg_lsn, false), "
            "pg_last_xact_replay_timestamp(), extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8",
            (mark.lsn,),
        ).fetchone()
        waited = time.monotonic() - started
        if not in_recovery:
            raise StandbyNotUsable(
                f"{standby.describe()} is not a standby (pg_is_in_recovery() is false): it was promoted, or the "
                "connection points at a primary"
            )
        if caught_up or waited >= budget_s:
            return _ReplayReading(caught_up, last_commit, since_last, waited)
        time.sleep(0.05)


def lag_problem(standby: PgEndpoint, lag: float | None, limit_s: float) -> str | None:
    """What is wrong with a standby's ``lag`` (from :func:`standby_lag`) against ``limit_s``; None when nothing is."""
    if lag is None:
        return f"{standby.describe()} has replayed no transaction since it started and is behind the primary"
    if lag > limit_s:
        return (
            f"{standby.describe()} lags {format_duration(lag)} behind the primary (max_standby_lag "
            f"{format_duration(limit_s)})"
        )
    return None


def choose_source(
    db: ProtectedDatabase | ProtectedServer, primary: PgEndpoint, standby: PgEndpoint | None
) -> BackupSource:
    """Return where to back ``db`` up from (a database of the plan, or a PITR server for its base backups): its
    standby when it names one that is usable, else the primary (with a note saying why) or :class:`StandbyNotUsable`,
    as ``db.on_standby_lag`` says."""
    import psycopg

    if standby is None:
        return BackupSource(primary)
    what = f"backup of database {db.name!r}"
    if isinstance(db, ProtectedServer):
        what = f"base backup of server {db.name!r}"
    limit = db.max_standby_lag.total_seconds()
    try:
        lag = standby_lag(standby, primary_mark(primary), limit)
        problem = lag_problem(standby, lag, limit)
        if problem is None:
            log.info("Taking the %s from its standby %s (lag %.1fs).", what, standby.describe(), lag)
            return BackupSource(standby, primary, lag)
    except StandbyNotUsable as err:
        lag, problem = None, str(err)
    except (PgdrError, psycopg.Error) as err:
        lag, problem = None, f"{standby.describe()} could not be asked for its lag ({first_line(str(err))})"
    if db.on_standby_lag == "fail":
        raise StandbyNotUsable(
            f"The {what} is taken from its standby (source_conn_id {db.source_conn_id}), "
            f"but {problem}. The plan says on_standby_lag: fail, so nothing was read from the primary; the task "
            "retries after its retry delay. Check the replica's replication (pg_stat_replication on the primary), "
            "or set on_standby_lag: primary to back up from the primary meanwhile."
        )
    note = (
        f"The {what} was taken from the primary, not its standby (source_conn_id "
        f"{db.source_conn_id}): {problem}. Check the replica's replication (pg_stat_replication on the primary)."
    )
    log.warning("%s", note)
    return BackupSource(primary, None, lag, note)


@dataclass(frozen=True)
class ReplayPosition:
    """How far a standby had replayed just before a snapshot was taken there (the snapshot holds at least that)."""

    caught_up: bool  # everything the primary had written at the mark
    last_commit: datetime | None  # the last replayed transaction's commit time

    def recovery_point(self, mark: PrimaryMark) -> datetime:
        """The moment the snapshot's data is the primary's state of: the mark's time when the standby had replayed up
        to it, else its last replayed commit (the snapshot may hold a little more: an earlier point, never a later
        one, so the RPO is never flattered)."""
        if self.caught_up:
            return mark.at
        if self.last_commit is None:
            raise StandbyNotUsable(
                "The standby is behind the primary and has replayed no transaction since it started, so the moment "
                "its data is from is unknown. Nothing was stored; the task retries after its retry delay."
            )
        return self.last_commit


# How long replay_position waits for a streaming standby to replay up to a mark just taken: the primary's insert
# position can be ahead of what it has flushed and sent (a background record, an asynchronous commit) for a moment.
REPLAY_WAIT_S = 3.0


def replay_position(standby: PgEndpoint, mark: PrimaryMark, wait_s: float = REPLAY_WAIT_S) -> ReplayPosition:
    """Read how far ``standby`` has replayed, relative to the primary's ``mark``: call it before the snapshot. A standby
    not there yet is given ``wait_s`` to get there (else an idle primary's last background record would date the
    backup by the last transaction replayed, however old). :class:`StandbyNotUsable` when it is no longer a standby."""
    with connect(standby, application_name="pgdr-standby-replay") as conn:
        reading = _replay_to_mark(conn, standby, mark, wait_s)
    return ReplayPosition(reading.caught_up, reading.last_commit)
