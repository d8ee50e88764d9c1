"""The heartbeat: rows written at known times, so that a recovery can be *proved* to hit its target.

``pgdr_health`` (every run) and ``pgdr_verify_pitr`` write one row into ``pgdr.heartbeat`` of the
server's ``postgres`` database, each in its own transaction. A cluster recovered to a target
must hold every heartbeat committed at or before the target and none after it; and the newest
heartbeat in a cluster recovered to "latest" tells how much was lost: the achieved RPO.
"""

from __future__ import annotations

from datetime import datetime

from pgdr.physical.archive import archiver_state, wait_archived
from pgdr.postgres.client import PgEndpoint, connect

HEARTBEAT_DATABASE = "postgres"
_CREATE = (
    "CREATE SCHEMA IF NOT EXISTS pgdr; CREATE TABLE IF NOT EXISTS pgdr.heartbeat (at timestamptz PRIMARY KEY "
    "DEFAULT clock_timestamp(), source text NOT NULL)"
)


def write_heartbeat(endpoint: PgEndpoint, source: str) -> datetime:
    """Insert one heartbeat in its own transaction; return its time."""
    with connect(endpoint.with_dbname(HEARTBEAT_DATABASE), application_name="pgdr-heartbeat") as conn:
        conn.execute(_CREATE)
        return conn.execute("INSERT INTO pgdr.heartbeat (source) VALUES (%s) RETURNING at", (source[:200],)).fetchone()[
            0
        ]


def heartbeats(endpoint: PgEndpoint) -> list[datetime]:
    """Return every heartbeat time on the server (``[]`` when there is no heartbeat table)."""
    with connect(endpoint.with_dbname(HEARTBEAT_DATABASE), application_name="pgdr-heartbeat") as conn:
        exists = conn.execute("SELECT to_regclass('pgdr.heartbeat') IS NOT NULL").fetchone()[0]
        if not exists:
            return []
        return [row[0] for row in conn.execute("SELECT at FROM pgdr.heartbeat ORDER BY at").fetchall()]


def switch_and_wait_archived(endpoint: PgEndpoint, timeout_s: float) -> str:
    """Close the server's current WAL segment and wait until its archiver has shipped it; return its name.

    :raises ArchiverFailing: when archiving fails meanwhile, or does not finish in ``timeout_s``.
    """
    with connect(endpoint.with_dbname(HEARTBEAT_DATABASE), application_name="pgdr-switch-wal") as conn:
        before = archiver_state(conn)
        # A WAL record first: switching an empty segment does nothing, and would not wake an archiver
        # that is backing off after failures.
        conn.execute("SELECT pg_logical_emit_message(false, 'pgdr', 'switch')")
        wal = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
        wait_archived(
            conn,
            wal,
            before,
            timeout_s,
            failing=lambda state: (
                f"The server's archive_command is failing (last failed WAL segment {state.last_failed_wal}): WAL "
                "piles up on the server and nothing after the newest archived segment can be recovered. Check the "
                "server's log for 'archive command failed' and the storage target; the task will retry."
            ),
            late=lambda state: (
                f"WAL segment {wal} was not archived within {timeout_s:.0f}s (last archived: "
                f"{state.last_archived_wal}). The archiver is behind or stuck; check pg_stat_archiver on the server."
            ),
            grace_s=5,  # not one attempt a retry fixes
        )
        return wal
