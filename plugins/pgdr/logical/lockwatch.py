"""While a backup dumps: notice when its sessions hold up others, and give way when the plan says so.

``pg_dump`` holds ``ACCESS SHARE`` on every table it dumps until it ends (and the backup's snapshot on any table
it counts by query). A migration's ``ALTER TABLE`` then waits for the backup, and every query on
that table waits behind the migration: the classic outage a backup can start. :class:`BlockingWatcher` reads
``pg_blocking_pids()`` on its own connection while the dump runs:

- a session held up by the backup for longer than ``warn_after`` (the plan's ``lock_wait_timeout``) is reported
  once, by ``on_warning`` (the task sends it to Slack), naming the statement and for how long it waited;
- with ``yield_after`` (the plan's, off by default), a session held up that long makes the backup give way:
  ``give_way`` stops pg_dump and the counts, the backup's sessions are terminated, and the backup fails with
  :class:`DumpYielded` (a retry follows after the retry delay), so the migration goes first.

The watcher only reads and, to give way, ends the backup's own sessions (the same role may). Watching is best
effort: if its queries fail it logs once and stops watching; the backup itself never fails because of it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pgdr.errors import DumpFailed
from pgdr.messages import format_duration
from pgdr.postgres.client import PgEndpoint, connect, describe_session

log = logging.getLogger(__name__)

# The sessions waiting for a lock that one of the backup's sessions holds or is ahead of them for. Without
# pg_read_all_stats, another role's statement reads "<insufficient privilege>": grant it to the backup role to see it.
_BLOCKED = """
    WITH ours AS (SELECT pid FROM pg_stat_activity WHERE application_name = %(app)s OR pid = ANY(%(pids)s))
    SELECT b.pid, b.usename, b.application_name,
           greatest(0, extract(epoch FROM now() - coalesce(b.query_start, now())))::int, left(b.query, 160)
      FROM pg_stat_activity b
     WHERE b.wait_event_type = 'Lock' AND b.pid NOT IN (SELECT pid FROM ours)
       AND pg_blocking_pids(b.pid) && ARRAY(SELECT pid FROM ours)
     ORDER BY 4 DESC"""


class DumpYielded(DumpFailed):
    """The backup gave way to a session it held up for longer than the plan's ``yield_after``; a retry follows."""


@dataclass(frozen=True)
class Blocked:
    """A session the backup holds up."""

    pid: int
    user: str | None
    application: str | None
    seconds: int
    statement: str

    def describe(self) -> str:
        return describe_session(self.pid, self.user, self.application, f"waiting {self.seconds}s", self.statement)


class BlockingWatcher:
    """Watch, on a thread of its own, for sessions that the backup's sessions hold up (see the module's doc).

    :param app_name: the ``application_name`` of the backup's pg_dump sessions (unique to this backup).
    :param own_pids: other sessions of the backup (the snapshot's, which locks any table it counts by query).
    :param on_warning: called once, on the watcher's thread, with the text of the warning.
    :param give_way: called once, on the watcher's thread, to stop the dump and the counts.
    """

    def __init__(
        self,
        endpoint: PgEndpoint,
        database: str,
        app_name: str,
        own_pids: list[int],
        warn_after: float,
        yield_after: float | None,
        on_warning: Callable[[str], None] | None,
        give_way: Callable[[], None],
        interval: float = 0.5,
    ):
        self.endpoint, self.database, self.app_name, self.own_pids = endpoint, database, app_name, own_pids
        self.warn_after, self.yield_after, self.interval = warn_after, yield_after, interval
        self.on_warning, self.give_way = on_warning, give_way
        self.yielded_to: Blocked | None = None
        self.warned: Blocked | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="pgdr-lockwatch", daemon=True)

    def __enter__(self) -> BlockingWatcher:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()

    def error(self) -> DumpYielded:
        """The failure of a backup that gave way (after :attr:`yielded_to` is set)."""
        blocked = self.yielded_to
        return DumpYielded(
            f"The backup of database {self.database!r} gave way: it held up {blocked.describe()} for longer than "
            f"yield_after ({format_duration(self.yield_after)}, in the DR plan), so pg_dump and its sessions were "
            "stopped and the table's lock released for it. Nothing was stored; the task retries after its retry "
            "delay. If this repeats, schedule the backup away from migrations and batch jobs."
        )

    def _watch(self) -> None:
        try:
            with connect(self.endpoint, application_name="pgdr-lockwatch") as conn:
                while not self._stop.wait(self.interval):
                    rows = conn.execute(_BLOCKED, {"app": self.app_name, "pids": self.own_pids}).fetchall()
                    if rows and self._act(conn, Blocked(*rows[0])):
                        return
        except Exception as err:  # noqa: BLE001 - watching is best effort; the backup goes on
            log.warning("Stopped watching whether the backup of %s holds up other sessions: %s", self.database, err)

    def _act(self, conn, longest: Blocked) -> bool:
        """Warn or give way for the session held up longest; return True once there is nothing left to do."""
        if self.yield_after is not None and longest.seconds >= self.yield_after:
            self.yielded_to = longest
            log.warning("The backup of %s gives way to %s.", self.database, longest.describe())
            self.give_way()
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", [self.app_name]
            )
            return True
        if self.warned is None and longest.seconds >= self.warn_after:
            self.warned = longest
            text = (
                f"The backup of database {self.database!r} is holding up {longest.describe()}. pg_dump holds a "
                "share lock on every table it dumps until it ends: that statement, and every query on its table "
                "queued behind it, waits for the backup. Set yield_after in the DR plan to make backups give way "
                "(stopped and retried later), or schedule migrations away from backups."
            )
            log.warning("%s", text)
            if self.on_warning is not None:
                try:
                    self.on_warning(text)
                except Exception as err:  # noqa: BLE001 - the warning is logged above; the backup goes on
                    log.warning("Could not send the warning: %s", err)
            return self.yield_after is None  # nothing more to watch for
        return False
