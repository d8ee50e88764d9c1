"""The database side: connecting, snapshots, exact row counts and the PostgreSQL client tools.

A logical backup is only as good as the proof of what it contains. pgdr opens a repeatable-read
transaction, exports its snapshot (``pg_export_snapshot()``) and hands it to ``pg_dump
--snapshot``: the dump and pgdr's exact row counts (read from the dump's files, or ``count(*)`` where they cannot
answer: :mod:`pgdr.logical.dumpcount`) see the very same data, and the
transaction's start time is the backup's *recovery point*, the moment the restored data is from.

Credentials reach the client tools only through a passfile (``PGPASSFILE``) in a private work
directory: never argv, a log line or a manifest.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pgdr.errors import (
    AuthenticationFailed,
    CompressionUnsupported,
    DatabaseUnreachable,
    DumpFailed,
    PermanentFailure,
    PgdrError,
    work_space_full,
)
from pgdr.identifiers import conninfo, sql_identifier, table_key
from pgdr.messages import RESTORE_AS_SUPERUSER_CAVEAT
from pgdr.postgres.binaries import PG_BIN_ENV_VAR, pg_tool

# re-exported: the one identifier rule lives in pgdr.identifiers, the one binary lookup in pgdr.postgres.binaries
__all__ = ["identifier", "pg_tool", "table_key"]

COUNT_BATCH = 200  # tables counted per query: one round trip for a typical database
# What a client tool inherits from the worker's environment; nothing else (PG* are set by pgdr).
_CHILD_ENV = {"PATH", "HOME", "LANG", "LANGUAGE", "TMPDIR", "SYSTEMROOT", "LD_LIBRARY_PATH"}
# What libpq and the server say when a session ends because the server went away: retryable.
_CONNECTION_LOST = (
    "server closed the connection unexpectedly",
    "terminating connection due to",
    "the database system is shutting down",
    "the database system is starting up",
    "the database system is in recovery mode",
    "connection to server was lost",
)
_SUPERUSER_EXTENSION = re.compile(r'permission denied to create extension "([^"]+)"', re.IGNORECASE)
_FDW_DENIED = re.compile(r'permission denied for foreign-data wrapper "?([^";]+?)"?(?:;|$)', re.IGNORECASE)
_UNAVAILABLE_EXTENSION = re.compile(r'extension "([^"]+)" is not available', re.IGNORECASE)
_UNSUPPORTED_COMPRESSION = re.compile(r"does not support compression with (\w+)", re.IGNORECASE)


@dataclass(frozen=True)
class PgEndpoint:
    """How to reach one database: where, as whom, and which Airflow connection said so.

    The password is excluded from ``repr`` so that it cannot leak through a log of this object.
    """

    host: str
    port: int
    user: str
    dbname: str
    password: str | None = field(default=None, repr=False)
    sslmode: str | None = None
    conn_id: str = ""

    def with_dbname(self, dbname: str) -> PgEndpoint:
        """Return the same server and credentials for another database."""
        return PgEndpoint(self.host, self.port, self.user, dbname, self.password, self.sslmode, self.conn_id)

    def describe(self) -> str:
        """Return ``database 'x' at host:port (connection 'id')`` for messages."""
        conn = f" (Airflow connection {self.conn_id!r})" if self.conn_id else ""
        return f"database {self.dbname!r} at {self.host}:{self.port} as user {self.user!r}{conn}"

    def scrub(self, text: str) -> str:
        """Remove the password from ``text`` wherever it appears."""
        return text.replace(self.password, "********") if self.password else text


def tool_version(name: str) -> str:
    """Return e.g. ``pg_dump (PostgreSQL) 18.6``."""
    return subprocess.run([pg_tool(name), "--version"], capture_output=True, text=True, check=True).stdout.strip()


def _explain_connect_error(endpoint: PgEndpoint, err: Exception) -> PgdrError:
    """Turn a libpq error into an error that says what happened and what to do."""
    message = endpoint.scrub(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    lower = message.lower()
    if "password authentication failed" in lower or "no password supplied" in lower:
        return AuthenticationFailed(
            f"The server refused the credentials for {endpoint.describe()}: {message}. Fix the login or password in "
            "that Airflow connection."
        )
    if "does not exist" in lower and "database" in lower:
        return PermanentFailure(
            f"Cannot connect to {endpoint.describe()}: {message}. Check the database name (the plan's dbname, or "
            "the connection's schema)."
        )
    return DatabaseUnreachable(
        f"Cannot connect to {endpoint.describe()}: {message}. Check that the server is up and reachable from the "
        "Airflow worker; the task will retry."
    )


@contextmanager
def connect(endpoint: PgEndpoint, autocommit: bool = True, application_name: str = "pgdr"):
    """Open a psycopg connection to ``endpoint``; connection errors are explained, not raw."""
    import psycopg

    try:
        conn = psycopg.connect(
            host=endpoint.host,
            port=endpoint.port,
            user=endpoint.user,
            password=endpoint.password or None,
            dbname=endpoint.dbname,
            sslmode=endpoint.sslmode or "prefer",
            connect_timeout=10,
            application_name=application_name,
            autocommit=autocommit,
        )
    except psycopg.OperationalError as err:
        raise _explain_connect_error(endpoint, err) from None
    try:
        yield conn
    finally:
        conn.close()


@contextmanager
def passfile_env(endpoint: PgEndpoint, workdir: Path) -> Iterator[dict[str, str]]:
    """Yield an environment for the client tools whose password comes from a private passfile."""
    # A minimal environment: the tools never see the worker's AIRFLOW_CONN_* or cloud secrets.
    env = {k: v for k, v in os.environ.items() if k in _CHILD_ENV or k.startswith("LC_")}
    env.update(PGCONNECT_TIMEOUT="10", PGAPPNAME="pgdr", TZ="UTC")
    if endpoint.sslmode:
        env["PGSSLMODE"] = endpoint.sslmode
    passfile = None
    if endpoint.password and ("\n" in endpoint.password or "\r" in endpoint.password):
        raise PermanentFailure(
            f"The password of Airflow connection {endpoint.conn_id!r} contains a line break, which a PostgreSQL "
            "password file cannot hold. Change the role's password to one without line breaks."
        )
    if endpoint.password:
        workdir.mkdir(parents=True, exist_ok=True)
        passfile = workdir / f".pgpass-{os.getpid()}-{threading.get_ident()}"

        def esc(value: str) -> str:
            return value.replace("\\", "\\\\").replace(":", "\\:")

        fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"{esc(endpoint.host)}:{endpoint.port}:*:{esc(endpoint.user)}:{esc(endpoint.password)}\n")
        env["PGPASSFILE"] = str(passfile)
    else:
        env["PGPASSFILE"] = os.devnull
    try:
        yield env
    finally:
        if passfile is not None:
            passfile.unlink(missing_ok=True)


def endpoint_conninfo(endpoint: PgEndpoint, dbname: str | None = None) -> str:
    """Return the libpq connection string of ``endpoint`` (never a password: that is in the passfile)."""
    return conninfo(endpoint.host, endpoint.port, endpoint.user, dbname or endpoint.dbname)


def connection_args(endpoint: PgEndpoint, dbname: str | None = None) -> list[str]:
    """Return the ``--dbname=<connection string>`` argument of ``pg_dump``/``pg_restore``.

    One quoted connection string, so that no database, host or user name is ever read as an
    option (a name that starts with ``-``) or as a connection string of its own (one with ``=``).
    """
    return [f"--dbname={endpoint_conninfo(endpoint, dbname)}"]


def run_tool(
    endpoint: PgEndpoint, workdir: Path, args: list[str], what: str, error: type[PgdrError] = DumpFailed
) -> subprocess.CompletedProcess:
    """Run a PostgreSQL client tool with credentials from a passfile; explain failures."""
    with passfile_env(endpoint, workdir) as env:
        result = subprocess.run(args, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise tool_error(endpoint, what, result.stderr, error)
    return result


def tool_error(endpoint: PgEndpoint, what: str, stderr: str, error: type[PgdrError]) -> PgdrError:
    """Build the error for a client tool that failed, with its first meaningful lines."""
    lines = [endpoint.scrub(line) for line in stderr.strip().splitlines() if line.strip()]
    detail = "; ".join(lines[:3]) or "no error output"
    lower = detail.lower()
    if "password authentication failed" in lower:
        return AuthenticationFailed(
            f"{what} failed: the server refused the credentials for {endpoint.describe()} ({detail}). Fix the login "
            "or password in that Airflow connection."
        )
    needs_superuser = _SUPERUSER_EXTENSION.search(detail)
    if needs_superuser:
        name = needs_superuser.group(1)
        return PermanentFailure(
            f"{what} failed: the backup needs the extension {name!r}, which only a superuser may create, and pgdr "
            f"restores as the role {endpoint.user!r}, which is not one ({detail}). pgdr creates such an extension "
            "itself, as the target server's own Airflow connection, when that connection is a superuser; this one is "
            "not. Point that connection at a superuser (it also installs amcheck for the checks), or set "
            f"'restore_as_superuser: true' for this database in the DR plan, {RESTORE_AS_SUPERUSER_CAVEAT}"
        )
    fdw = _FDW_DENIED.search(detail)
    if fdw:
        return PermanentFailure(
            f"{what} failed: the backup has foreign servers of the foreign-data wrapper {fdw.group(1)!r}, and pgdr "
            f"restores as the role {endpoint.user!r}, which has no USAGE on it in a freshly made database ({detail}). "
            "Such a backup restores only with 'restore_as_superuser: true' for this database in the DR plan; set it "
            f"{RESTORE_AS_SUPERUSER_CAVEAT}"
        )
    unavailable = _UNAVAILABLE_EXTENSION.search(detail)
    if unavailable:
        return PermanentFailure(
            f"{what} failed: the backup needs the extension {unavailable.group(1)!r}, which the server at "
            f"{endpoint.host}:{endpoint.port} has not installed ({detail}). Install its package there (the one the "
            "source server has, for this PostgreSQL major version), or restore to a server that has it. Retrying "
            "cannot fix this."
        )
    unsupported = _UNSUPPORTED_COMPRESSION.search(detail)
    if unsupported:
        method = unsupported.group(1).lower()
        tool = "pg_restore" if detail.startswith("pg_restore") else "pg_dump"
        client = (
            f"install a PostgreSQL 18 client built with {method} (PGDG and Debian packages are) on every worker and "
            f"point ${PG_BIN_ENV_VAR} at its bin folder"
        )
        if tool == "pg_restore":
            fix = (
                f"Fix: {client}; this backup was taken with {method} and only such a client can restore it (the "
                "plan's 'compression' setting changes new backups only)."
            )
        else:
            fix = (
                "Fix: set 'compression: gzip:1' for this database in the DR plan (every client has gzip), or "
                f"{client}. Backups already taken with {method} need such a client to restore."
            )
        used = Path(pg_tool(tool))
        short = used if len(used.parts) <= 4 else Path("...", *used.parts[-3:])
        return CompressionUnsupported(
            f"{what} failed: this PostgreSQL client ({short}) has no {method} compression. {fix} Retrying cannot "
            f"fix this.\nClient used: {used}"
        )
    if "no space left on device" in lower:
        from pgdr.workdir import work_dir_root

        return work_space_full(what, f"the work directory under {work_dir_root()}", detail)
    if any(sign in lower for sign in _CONNECTION_LOST):
        return DatabaseUnreachable(
            f"{what} failed: the connection to {endpoint.describe()} was lost mid-way ({detail}). The server may "
            "have restarted or be unreachable; the task will retry from the start."
        )
    if "connection refused" in lower or "could not connect" in lower or "timeout" in lower:
        return DatabaseUnreachable(
            f"{what} failed: cannot reach {endpoint.describe()} ({detail}). The task will retry."
        )
    return error(f"{what} failed for {endpoint.describe()}: {detail}")


# ------------------------------------------------------------------------------------------------
# Snapshots and exact row counts
# ------------------------------------------------------------------------------------------------

_TABLES_SQL = """
SELECT n.nspname, c.relname, c.relkind, c.oid
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY n.nspname, c.relname
"""


_LEAF_PARTITIONS_SQL = """
SELECT pn.nspname, pc.relname, ln.nspname, lc.relname
FROM pg_class pc
JOIN pg_namespace pn ON pn.oid = pc.relnamespace
CROSS JOIN LATERAL pg_partition_tree(pc.oid) AS tree
JOIN pg_class lc ON lc.oid = tree.relid
JOIN pg_namespace ln ON ln.oid = lc.relnamespace
WHERE pc.relkind = 'p' AND tree.isleaf AND lc.relkind = 'r'
"""


def count_rows(conn, known: dict[int, int] | None = None) -> tuple[dict[str, int], int]:
    """Return exact row counts of every user table, and the number of large objects.

    Ordinary tables and partitions are counted with ``ONLY`` (their own rows); a partitioned
    table's count is the sum of its leaf partitions, which is what a query on it returns, added
    up rather than scanned a second time. Counts are batched, :data:`COUNT_BATCH` tables per query.

    :param known: ``{oid: rows}`` of ordinary tables already counted (from the dump: :mod:`pgdr.logical.dumpcount`);
        they are not scanned.
    """
    known = known or {}
    census = row_census(conn, known)
    return census.complete(known), census.large_objects


@dataclass
class RowCensus:
    """Exact row counts taken in a snapshot, but for the ordinary tables left to be counted elsewhere (from a
    dump's files, after the snapshot is closed): :meth:`complete` adds those and sums the partitioned tables."""

    counted: dict[str, int]  # counted by query in the snapshot
    left: dict[int, str]  # oid: table key of the ordinary tables counted elsewhere
    partitioned: dict[str, list[str]]  # a partitioned table's key: its leaf partitions' keys (summed)
    large_objects: int

    def complete(self, left_counts: dict[int, int]) -> dict[str, int]:
        """Return every table's count, given ``{oid: rows}`` of at least the tables left."""
        counts = {**self.counted, **{key: left_counts[oid] for oid, key in self.left.items()}}
        for key, leaves in self.partitioned.items():
            counts[key] = sum(counts[leaf] for leaf in leaves)
        return dict(sorted(counts.items()))


def row_census(conn, left: Collection[int] = ()) -> RowCensus:
    """Count, in ``conn``'s transaction, the rows of every user table but the ordinary tables of oid in ``left``
    (counted by the caller, e.g. from the dump's files), and the large objects; see :func:`count_rows`."""
    from psycopg import sql

    tables, left_keys = [], {}
    for schema, name, kind, oid in conn.execute(_TABLES_SQL).fetchall():
        key = table_key(schema, name)
        if kind == "r" and oid in left:
            left_keys[oid] = key
        tables.append((schema, name, kind, key))
    leaves: dict[str, list[str]] = {}
    for schema, name, leaf_schema, leaf_name in conn.execute(_LEAF_PARTITIONS_SQL).fetchall():
        leaves.setdefault(table_key(schema, name), []).append(table_key(leaf_schema, leaf_name))
    ordinary = {key for _, _, kind, key in tables if kind == "r"}
    # A partitioned table is summed when every leaf is counted here (a leaf owned by an extension
    # is not); otherwise, and for one with no partitions, it is counted directly.
    summed = {key: parts for key, parts in leaves.items() if set(parts) <= ordinary}
    not_scanned = set(summed) | set(left_keys.values())
    scanned = [t for t in tables if t[3] not in not_scanned]
    counted: dict[str, int] = {}
    for start in range(0, len(scanned), COUNT_BATCH):
        parts = []
        for schema, name, kind, key in scanned[start : start + COUNT_BATCH]:
            only = sql.SQL("ONLY ") if kind == "r" else sql.SQL("")
            parts.append(
                sql.SQL("SELECT {key}, count(*) FROM {only}{table}").format(
                    key=sql.Literal(key), only=only, table=sql.Identifier(schema, name)
                )
            )
        for key, count in conn.execute(sql.SQL(" UNION ALL ").join(parts)).fetchall():
            counted[key] = count
    large_objects = conn.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone()[0]
    return RowCensus(counted, left_keys, summed, large_objects)


def sequence_values(conn) -> dict[str, int | None]:
    """Return every user sequence's last value (``None`` if never used)."""
    rows = conn.execute(
        "SELECT schemaname, sequencename, last_value FROM pg_sequences WHERE schemaname NOT IN ('pg_catalog', "
        "'information_schema') ORDER BY 1, 2"
    ).fetchall()
    return {table_key(schema, name): value for schema, name, value in rows}


@dataclass
class ExportedSnapshot:
    """An open repeatable-read transaction whose snapshot other sessions can import."""

    snapshot_id: str
    recovery_point: datetime
    server_version: str
    conn: object


@contextmanager
def exported_snapshot(endpoint: PgEndpoint) -> Iterator[ExportedSnapshot]:
    """Open a read-only repeatable-read transaction and export its snapshot for ``pg_dump``."""
    with connect(endpoint, autocommit=False, application_name="pgdr-snapshot") as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        snapshot_id, recovery_point, version = conn.execute(
            "SELECT pg_export_snapshot(), now(), current_setting('server_version')"
        ).fetchone()
        try:
            yield ExportedSnapshot(snapshot_id, recovery_point, version, conn)
        finally:
            conn.rollback()


_PASSWORD_LITERAL = re.compile(r"(password\s*)('(?:[^']|'')*'|\S+)", re.IGNORECASE)


def mask_password_literals(statement: str) -> str:
    """Another session's statement for an alert: on one line, the literal after any ``PASSWORD`` masked."""
    return _PASSWORD_LITERAL.sub(lambda m: m.group(1) + "***", " ".join((statement or "").split()))


def exclusive_lockers(endpoint: PgEndpoint, limit: int = 5) -> list[str]:
    """Describe the sessions that hold, or wait for, an ``ACCESS EXCLUSIVE`` lock on a table of ``endpoint``'s
    database (what stops a dump's ``ACCESS SHARE``): pid, user, application, the tables, for how long, and the
    statement's start (a password literal in it masked). Best effort: ``[]`` when the server cannot be asked."""
    sql = """
        SELECT a.pid, a.usename, a.application_name, l.granted,
               extract(epoch FROM now() - coalesce(a.xact_start, a.query_start))::int, left(a.query, 120),
               string_agg(coalesce(format('%%I.%%I', n.nspname, c.relname), 'oid ' || l.relation), ', '
                          ORDER BY n.nspname, c.relname)
          FROM pg_locks l JOIN pg_stat_activity a USING (pid)
          LEFT JOIN pg_class c ON c.oid = l.relation LEFT JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE l.locktype = 'relation' AND l.mode = 'AccessExclusiveLock' AND a.pid <> pg_backend_pid()
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
         GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 4 DESC, 5 DESC LIMIT %s"""
    import psycopg

    try:
        with connect(endpoint, application_name="pgdr-lock-report") as conn:
            rows = conn.execute(sql, (limit,)).fetchall()
    except (psycopg.Error, PgdrError) as err:
        logging.getLogger(__name__).warning("Could not list the sessions holding table locks: %s", err)
        return []
    return [
        describe_session(
            pid,
            user,
            app,
            f"{'holding' if granted else 'waiting for'} an exclusive lock on {tables} for {seconds}s",
            query,
        )
        for pid, user, app, granted, seconds, query, tables in rows
    ]


def describe_session(pid: int, user: str | None, application: str | None, doing: str, statement: str) -> str:
    """One session, as an alert names it: ``pid 123 (app_user, billing-migration) <doing>: 'ALTER TABLE …'`` (a
    password literal in the statement masked)."""
    who = ", ".join(filter(None, [user, application]))
    return f"pid {pid} ({who}) {doing}: {mask_password_literals(statement)!r}"


def dump_command(
    endpoint: PgEndpoint, out_dir: Path, jobs: int, snapshot_id: str, compression: str, lock_wait_ms: int
) -> list[str]:
    """Return the ``pg_dump`` command line of a pgdr backup.

    Directory format (``-Fd``) so that ``pg_dump -j`` dumps and ``pg_restore -j`` restores tables
    in parallel. pg_dump compresses each file itself (``compression``, e.g. ``gzip:1``), inside
    its parallel workers, and pgdr stores the files as they are: pg_restore then reads them
    directly. Measured on 2 GB of pgbench data (#8), this is the raw tools' own speed, where
    dumping uncompressed and compressing in pgdr cost 47 % more (1.5 GB written to local disk)
    and the restore 45 % more (decompressed to disk again).

    ``lock_wait_ms``: ``--lock-wait-timeout``; pg_dump gives up rather than wait longer for a table's
    ``ACCESS SHARE`` lock (an ``ALTER TABLE`` holding or queued for it would queue every query behind the dump).
    """
    return [
        pg_tool("pg_dump"),
        *connection_args(endpoint),
        "--format=directory",
        f"--jobs={jobs}",
        f"--compress={compression}",
        f"--snapshot={snapshot_id}",
        f"--lock-wait-timeout={lock_wait_ms}",
        "--no-password",
        f"--file={out_dir}",
    ]


identifier = sql_identifier


class RestoreRoleIsSuperuser(PermanentFailure):
    """The role that restores is a superuser, and the plan does not allow that."""


def check_restore_role(restorer: PgEndpoint, allowed: bool) -> None:
    """Refuse to restore as a superuser unless the plan says ``restore_as_superuser: true``."""
    with connect(restorer.with_dbname("postgres"), application_name="pgdr-role-check") as conn:
        superuser = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
    if superuser and not allowed:
        raise RestoreRoleIsSuperuser(
            f"The restore role {restorer.user!r} (Airflow connection {restorer.conn_id!r}) is a superuser on "
            f"{restorer.host}:{restorer.port}. A restored dump runs code written by whoever owned a schema, so pgdr "
            "restores only as a role without superuser: ALTER ROLE ... NOSUPERUSER, or point restore_conn_id at "
            "another role (README, Security model). Nothing was restored."
        )


def prepare_amcheck(admin: PgEndpoint, restored: PgEndpoint) -> None:
    """Install ``amcheck`` in a restored copy as ``admin`` and let the restore role run its checks.

    ``amcheck`` is not a trusted extension, so the restore role cannot install it. The admin's
    session sets a search path of ``pg_catalog`` only, so no restored object is looked up by it.
    """
    from psycopg import sql

    with connect(admin.with_dbname(restored.dbname), application_name="pgdr-amcheck-setup") as conn:
        conn.execute("SET search_path = pg_catalog, pg_temp")
        conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck SCHEMA pg_catalog")
        functions = conn.execute(
            "SELECT p.oid::regprocedure::text FROM pg_depend d JOIN pg_proc p ON p.oid = d.objid WHERE d.classid = "
            "'pg_proc'::regclass AND d.deptype = 'e' AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = "
            "'amcheck')"
        ).fetchall()
        for (function,) in functions:
            conn.execute(
                sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(sql.SQL(function), sql.Identifier(restored.user))
            )
