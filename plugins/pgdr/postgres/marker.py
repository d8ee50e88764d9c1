"""Which run a database belongs to: the one marker pgdr writes on the databases it creates.

A database pgdr creates for a run (the scratch database of a verification or a drill, the target
of an incident restore) carries the comment ``<what> [run <run id>]``. It is how a retry finds its
own half-finished database, how a teardown drops only its own, and how the leftovers of killed
runs are told apart from everything else. pgdr never drops a database without its marker. When
the leftovers of a run are removed is :func:`pgdr.workdir.run_is_over`'s to say.
"""

from __future__ import annotations

import re

from psycopg import sql

_RUN = re.compile(r"\[run (.+)\]$")


def marker(what: str, run_id: str) -> str:
    """Return the comment that marks a database as ``what`` of run ``run_id``."""
    return f"{what} [run {run_id}]"


def run_of(comment: str | None) -> str | None:
    """Return the run a marker comment names (``None``: not a marker)."""
    found = _RUN.search(comment or "")
    return found.group(1) if found else None


def comment_of(conn, name: str) -> tuple[bool, str | None]:
    """Return ``(exists, comment)`` of database ``name``."""
    row = conn.execute(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (name,)
    ).fetchone()
    return (row is not None, row[0] if row else None)


def marked_by(conn, name: str, what: str, run_id: str) -> bool | None:
    """Say whether database ``name`` is ``what`` of run ``run_id`` (``None``: no such database)."""
    exists, comment = comment_of(conn, name)
    if not exists:
        return None
    return (comment or "").startswith(what) and run_of(comment) == run_id


def mark(conn, name: str, comment: str) -> None:
    """Write the marker ``comment`` on database ``name`` (durably: it must survive a crash right after)."""
    conn.execute("SET synchronous_commit = on")  # an asynchronous commit can be lost with the server
    conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(comment)))


def unmark(conn, name: str, what: str) -> bool:
    """Remove a ``what`` marker from database ``name``, leaving any other comment as it is; say
    whether there was one."""
    _, comment = comment_of(conn, name)
    if not (comment or "").startswith(what):
        return False
    conn.execute(sql.SQL("COMMENT ON DATABASE {} IS NULL").format(sql.Identifier(name)))
    return True
