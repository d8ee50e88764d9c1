"""Scratch databases: short-lived databases that a backup is restored into to prove it good.

Each verification run restores into a database of its own, named ``pgdr_verify_<db>_<tag>``
where the tag is derived from the run, so a retry reuses the same name. Every scratch database
carries a comment that marks it as pgdr's and names its run, and is owned by the restore role
(the role pg_restore logs in as; never a superuser). A worker killed mid-restore leaves its
scratch database behind; a later run drops leftovers that match this database's naming scheme
exactly *and* carry the marker *and* whose run Airflow reports as no longer running, and nothing
else: two runs at once (backfills) never drop each other's.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from pgdr.errors import PermanentFailure
from pgdr.postgres.client import PgEndpoint, connect, identifier
from pgdr.postgres.marker import mark, marker, run_of
from pgdr.workdir import run_is_over, state_of_run

log = logging.getLogger(__name__)

MARKER = "pgdr scratch database"


def scratch_name(kind: str, database: str, run_key: str) -> str:
    """Return the scratch database name of ``database`` for one run (at most 63 bytes)."""
    tag = hashlib.sha256(run_key.encode()).hexdigest()[:8]
    return f"pgdr_{kind}_{database[:40]}_{tag}"


@dataclass(frozen=True)
class ScratchDatabase:
    """A scratch database on a server, identified by name."""

    server: PgEndpoint  # any database on the server, used for CREATE/DROP DATABASE
    name: str
    restorer: PgEndpoint | None = None  # the restore role, which owns the database (None: the server's user)

    @property
    def endpoint(self) -> PgEndpoint:
        """Return the endpoint of the scratch database itself, as the role that restores into it."""
        return (self.restorer or self.server).with_dbname(self.name)

    def create(self, purpose: str, options: dict[str, str] | None = None) -> None:
        """Create the database empty (dropping a previous try's copy) and mark it as pgdr's.

        :param options: the backup's encoding and locale (``BackupNeeds.database_options``).
        """
        with connect(self.server.with_dbname("postgres")) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {identifier(self.name)} WITH (FORCE)")
            create_database(conn, self.name, self.restorer, self.server, options)
            mark(conn, self.name, f"{MARKER}: {purpose}")
        log.info("Created scratch database %s on %s:%s.", self.name, self.server.host, self.server.port)

    def drop(self) -> bool:
        """Drop the database if it exists; say whether it did."""
        with connect(self.server.with_dbname("postgres")) as conn:
            existed = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.name,)).fetchone()
            conn.execute(f"DROP DATABASE IF EXISTS {identifier(self.name)} WITH (FORCE)")
        if existed:
            log.info("Dropped scratch database %s.", self.name)
        return bool(existed)

    def exists(self) -> bool:
        with connect(self.server.with_dbname("postgres")) as conn:
            return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.name,)).fetchone() is not None


def create_database_sql(name: str, owner: PgEndpoint | None, admin: PgEndpoint, options: dict[str, str] | None = None):
    """Return ``CREATE DATABASE`` for an empty database owned by ``owner``'s role (the restore role).

    :param options: the source database's encoding and locale (``BackupNeeds.database_options``);
        without them the server's defaults.
    """
    from psycopg import sql

    from pgdr.logical.privileges import create_options_sql

    query = sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
    if owner is not None and owner.user != admin.user:
        query = sql.SQL("{} OWNER {}").format(query, sql.Identifier(owner.user))
    if options:
        query = sql.SQL("{} {}").format(query, create_options_sql(options))
    return query


def create_database(
    conn, name: str, owner: PgEndpoint | None, admin: PgEndpoint, options: dict[str, str] | None = None
) -> None:
    """Create an empty database as the source had it (encoding, locale); explain a locale the server lacks."""
    import psycopg

    try:
        conn.execute(create_database_sql(name, owner, admin, options))
    except (
        psycopg.errors.InvalidParameterValue,
        psycopg.errors.FeatureNotSupported,
        psycopg.errors.ObjectNotInPrerequisiteState,
    ) as err:
        wanted = ", ".join(f"{k} {v}" for k, v in (options or {}).items())
        raise PermanentFailure(
            f"Cannot create database {name!r} on {admin.host}:{admin.port} with the backup's encoding and locale "
            f"({wanted}): {str(err).splitlines()[0]}. Install that locale on the server (or restore onto a server "
            "that has it); a database with another collation would sort and compare text differently from the "
            "source."
        ) from None


def scratch_comment(purpose: str, run_id: str) -> str:
    """Return what marks a scratch database as ``run_id``'s (:mod:`pgdr.postgres.marker`)."""
    return marker(purpose, run_id)


def drop_leftovers(
    server: PgEndpoint,
    kind: str,
    database: str,
    current_run_id: str,
    run_state: Callable[[str], str | None] | None = None,
) -> list[str]:
    """Drop scratch databases of ``kind`` for ``database`` left by runs that no longer run.

    Candidates carry pgdr's marker comment *and* a name of exactly this database's scheme
    (``pgdr_verify_shop_<8 hex>``, never ``pgdr_verify_shop_eu_...``). A candidate is kept when
    it belongs to ``current_run_id`` (its other mapped tasks) or to a run that is not over
    (:func:`pgdr.workdir.run_is_over`, the one leftover policy): two backfill runs at once never
    drop each other's databases.

    :param run_state: returns the Airflow state of a run of the same DAG (it may raise: see ``run_is_over``).
    :return: the names dropped.
    """
    pattern = re.compile(rf"^pgdr_{re.escape(kind)}_{re.escape(database[:40])}_[0-9a-f]{{8}}$")
    with connect(server.with_dbname("postgres")) as conn:
        rows = conn.execute(
            """
            SELECT d.datname, s.description FROM pg_database d
            JOIN pg_shdescription s ON s.objoid = d.oid AND s.classoid = 'pg_database'::regclass
            WHERE s.description LIKE %s
            """,
            (f"{MARKER}%",),
        ).fetchall()
        dropped = []
        for name, description in rows:
            owner = run_of(description)
            if not pattern.match(name) or owner is None or owner == current_run_id:
                continue
            state = state_of_run(run_state, owner)
            if not run_is_over(state):
                log.info("Keeping scratch database %s: its run %s is still %s.", name, owner, state)
                continue
            conn.execute(f"DROP DATABASE IF EXISTS {identifier(name)} WITH (FORCE)")
            dropped.append(name)
    for name in dropped:
        log.warning("Dropped scratch database %s left behind by an earlier run that did not finish.", name)
    return dropped
