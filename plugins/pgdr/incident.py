"""Incident restore: choosing the backup, restoring next to the live database, and the swap.

The rule of an incident restore is that it never destroys the data that is there now, even
when that data is damaged: it may be the only copy of what happened since the backup.

* A restore always goes into a **new database**. In ``new-database`` mode that is the result
  (``<db>_restored_<UTC timestamp>``), next to the live one.
* In ``replace`` mode the restored copy is only swapped in after it passed the integrity checks
  and validation: sessions on the live database are ended, the live database is renamed to
  ``<db>_pre_restore_<UTC timestamp>`` (kept, never dropped, connections disabled), and the
  restored copy takes the live name. If the second rename fails, the first is undone.
* A **table-level** restore brings back chosen tables (and their partitions) into a new
  database, with the full schema around them but without foreign keys (the other tables are
  empty); rows are then copied back by hand where they are needed.

Backups are chosen by a *selector*: ``latest-verified`` (default), ``latest``, a backup id, or a
timestamp meaning "the newest backup whose recovery point is at or before this time".
"""

from __future__ import annotations

import logging
import re
import statistics
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pgdr.errors import BackupNotFound, PermanentFailure, PgdrError
from pgdr.identifiers import MAX_IDENTIFIER_BYTES, QualifiedName, printable
from pgdr.logical.catalog import BackupCatalog, BackupEntry
from pgdr.logical.restore import RestoreFailed, restore_command
from pgdr.postgres.client import PgEndpoint, connect, identifier, passfile_env, pg_tool, run_tool
from pgdr.storage.layout import is_backup_id

log = logging.getLogger(__name__)

MODES = ("new-database", "replace")
SELECTORS = ("latest-verified", "latest")
TARGET_MARKER = "pgdr restore target"


class InvalidRestoreRequest(PermanentFailure):
    """The restore form was filled in a way that cannot be carried out; nothing was touched."""


class SwapFailed(PgdrError):
    """Swapping the restored database into place failed (and was rolled back)."""


def parse_timestamp(text: str) -> datetime | None:
    """Parse an ISO 8601 timestamp (UTC if no offset); ``None`` if ``text`` is not one."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def select_backup(catalog: BackupCatalog, selector: str) -> BackupEntry:
    """Return the backup a selector names; explain what exists when none matches."""
    selector = (selector or "latest-verified").strip()
    if selector == "latest-verified":
        return catalog.latest(verified_only=True)
    if selector == "latest":
        return catalog.latest()
    if is_backup_id(selector):
        return catalog.get(selector)
    moment = parse_timestamp(selector)
    if moment is None:
        raise InvalidRestoreRequest(
            f"'backup' must be latest-verified, latest, a backup id such as 20261122T093000Z-3fa2c1, or a "
            f"timestamp such as 2026-11-22T09:30:00Z; got {printable(selector)!r}. Nothing was touched."
        )
    now = datetime.now(UTC)
    if moment > now:
        raise InvalidRestoreRequest(
            f"'backup' {moment.isoformat()} is in the future (it is now {now.replace(microsecond=0).isoformat()}). "
            "Give the moment the data was last good, in UTC, or 'latest'. Nothing was touched."
        )
    backups = catalog.backups()
    if not backups:
        catalog.latest()  # raises BackupNotFound with the standard explanation
    eligible = [e for e in backups if e.recovery_point <= moment]
    if not eligible:
        raise BackupNotFound(
            f"No backup of database {catalog.database!r} has a recovery point at or before "
            f"{moment.isoformat()}: the oldest is {backups[0].backup_id} from "
            f"{backups[0].recovery_point.isoformat()}. Choose a later time, or that backup."
        )
    return eligible[-1]


def default_target_name(database: str, now: datetime, suffix: str = "restored") -> str:
    """Return ``<db>_<suffix>_<YYYYmmddHHMMSS>``, the database name cut to fit PostgreSQL's 63 bytes."""
    stamp = now.astimezone(UTC).strftime("%Y%m%d%H%M%S")
    tail = f"_{suffix}_{stamp}"
    head = database.encode()[: MAX_IDENTIFIER_BYTES - len(tail)].decode(errors="ignore")  # never half a character
    return head + tail


def check_target_name(name: str, live: str) -> str:
    """Refuse a target database name PostgreSQL would truncate or reserve, or that is the live database.

    Any other name is allowed, upper case, spaces and unicode included: pgdr always quotes it.
    """
    problem = None
    if not name.strip():
        problem = "is empty"
    elif "\x00" in name or printable(name) != name:
        problem = "contains control characters"
    elif len(name.encode()) > MAX_IDENTIFIER_BYTES:
        problem = (
            f"is {len(name.encode())} bytes long; PostgreSQL names hold at most {MAX_IDENTIFIER_BYTES} bytes "
            "and would silently cut it"
        )
    elif name.lower().startswith("pg_"):
        problem = "starts with pg_, which PostgreSQL reserves for its own objects"
    elif name == live:
        problem = "is the live database's own name; a restore never writes into the live database (use mode replace)"
    if problem:
        raise InvalidRestoreRequest(
            f"target_name {printable(name)!r} {problem}. Choose another name, or leave target_name empty for "
            f"{default_target_name(live, datetime.now(UTC))!r}-style default. Nothing was touched."
        )
    return name


def database_exists(server: PgEndpoint, name: str) -> bool:
    """Say whether database ``name`` exists on ``server``."""
    return database_oid(server, name) is not None


def database_facts(server: PgEndpoint, name: str) -> dict:
    """Return what a report says about a database: exists, size, connections allowed."""
    with connect(server.with_dbname("postgres")) as conn:
        row = conn.execute(
            "SELECT pg_database_size(oid), datallowconn FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
    if row is None:
        return {"name": name, "exists": False}
    return {"name": name, "exists": True, "size_bytes": row[0], "allows_connections": row[1]}


def expected_duration(catalog: BackupCatalog) -> float | None:
    """Return the median achieved restore time of this database's verifications (seconds)."""
    times = [
        e.verification["restore_seconds"]
        for e in catalog.backups()
        if e.verification and e.verification.get("restore_seconds") is not None
    ]
    return statistics.median(times) if times else None


# -- restoring ------------------------------------------------------------------------------------


def create_target(
    server: PgEndpoint, name: str, run_id: str, owner: PgEndpoint | None = None, options: dict[str, str] | None = None
) -> None:
    """Create the empty restore target, owned by ``owner``'s role and marked as pgdr's; a previous try's copy is replaced.

    :param options: the backup's encoding and locale (``BackupNeeds.database_options``).
    """
    from psycopg import sql

    from pgdr.postgres.scratch import create_database

    with connect(server.with_dbname("postgres")) as conn:
        conn.execute("SET synchronous_commit = on")  # the marker must survive a crash (see ScratchDatabase.create)
        ours = _made_by_run(conn, name, run_id)
        if ours is not None:
            if not ours:
                raise InvalidRestoreRequest(
                    f"Database {name!r} already exists on {server.host}:{server.port} and was not created by this "
                    "run; pgdr will not overwrite it. Choose another target_name."
                )
            conn.execute(f"DROP DATABASE {identifier(name)} WITH (FORCE)")  # our own partial copy
        create_database(conn, name, owner, server, options)
        conn.execute(
            sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(f"{TARGET_MARKER} [run {run_id}]"))
        )


def release_target(server: PgEndpoint, name: str, run_id: str) -> bool:
    """Clear this run's marker from a restore target that is now in use; say whether it had one.

    Without the marker, no later try of the run (someone clearing ``restore_backup`` a day later)
    can take the database for its own half-finished copy and drop it.
    """
    with connect(server.with_dbname("postgres")) as conn:
        if not _made_by_run(conn, name, run_id):
            return False
        conn.execute(f"COMMENT ON DATABASE {identifier(name)} IS NULL")
    return True


def drop_own_target(server: PgEndpoint, name: str, run_id: str) -> bool:
    """Drop a restore target only if this run created it; say whether it did."""
    with connect(server.with_dbname("postgres")) as conn:
        if not _made_by_run(conn, name, run_id):
            return False
        conn.execute(f"DROP DATABASE {identifier(name)} WITH (FORCE)")
    return True


def clear_marker(conn, name: str) -> None:
    """Remove pgdr's restore-target marker from database ``name``, leaving any other comment as it is."""
    row = conn.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (name,)).fetchone()
    if row is not None and (row[0] or "").startswith(TARGET_MARKER):
        conn.execute(f"COMMENT ON DATABASE {identifier(name)} IS NULL")


def _made_by_run(conn, name: str, run_id: str) -> bool | None:
    """Say whether database ``name`` carries ``run_id``'s restore-target marker (``None``: no such database)."""
    row = conn.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (name,)).fetchone()
    if row is None:
        return None
    return (row[0] or "").startswith(f"{TARGET_MARKER} [run {run_id}]")


# pg_restore -l prints "<dump id>; <catalog oid> <oid> <description> <schema> <name> <owner>". The
# description is one of a fixed set of words; names come after it and may hold spaces, so a line
# is never split on spaces to find a name: the entries of one table are found by pg_restore itself.
_TOC_ENTRY = re.compile(r"^(?P<id>\d+); \d+ \d+ (?P<desc>TABLE DATA|FK CONSTRAINT|BLOBS|BLOB METADATA|BLOB|LARGE OBJECT)\b")
_SKIP_IN_TABLE_RESTORE = {"FK CONSTRAINT"}


def table_restore_list(toc: str, data_ids: set[str]) -> str:
    """Filter ``pg_restore -l`` output for a table-level restore.

    Keeps every schema object, every large object (a table's rows may point at any of them; they
    cost no table's rows) and the data entries whose dump ids are in ``data_ids``; drops other
    tables' data and foreign keys.
    """
    kept = []
    for line in toc.splitlines():
        match = _TOC_ENTRY.match(line)
        if match and (match.group("desc") in _SKIP_IN_TABLE_RESTORE
                      or (match.group("desc") == "TABLE DATA" and match.group("id") not in data_ids)):
            continue
        kept.append(line)
    return "\n".join(kept) + "\n"


def table_data_ids(dump_dir: Path, table: QualifiedName, env: dict[str, str]) -> set[str]:
    """Return the dump ids of the ``TABLE DATA`` entries of exactly ``table``, as pg_restore selects them.

    ``pg_restore -n SCHEMA -t TABLE -l`` matches both names exactly (no patterns, no case
    folding); they are given as ``--schema=...`` so a name that starts with ``-`` is a value.
    """
    listing = subprocess.run(
        [pg_tool("pg_restore"), "--list", f"--schema={table.schema}", f"--table={table.name}", str(dump_dir)],
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    return {m.group("id") for line in listing.splitlines() if (m := _TOC_ENTRY.match(line)) and m.group("desc") == "TABLE DATA"}


def expand_partitions(target: PgEndpoint, tables: list[QualifiedName]) -> set[QualifiedName]:
    """Return ``tables`` plus every partition below them, from the restored catalog."""
    expanded = set(tables)
    with connect(target) as conn:
        for table in tables:
            rows = conn.execute(
                "SELECT n.nspname, c.relname FROM pg_partition_tree(%s::regclass) t "
                "JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace",
                (table.quoted(),),
            ).fetchall()
            expanded.update(QualifiedName(schema, name) for schema, name in rows)
    return expanded


def restore_tables(target: PgEndpoint, dump_dir: Path, tables: list[str], jobs: int, workdir: Path) -> set[str]:
    """Restore the schema of the whole backup and the data of ``tables`` only; return the tables filled.

    :param tables: table keys (see :mod:`pgdr.identifiers`), such as ``"Sales Dept"."Customer Accounts"``.
    """
    from pgdr.identifiers import parse_qualified_name
    from pgdr.logical.privileges import NEVER_RESTORED, SUPERUSER_ONLY, read_toc

    run_tool(
        target, workdir, restore_command(target, dump_dir, jobs, extra=["--section=pre-data"]),
        f"pg_restore (schema) into {printable(target.dbname)!r}", RestoreFailed,
    )
    filled = expand_partitions(target, [parse_qualified_name(t) for t in tables])
    with passfile_env(target, workdir) as env:
        toc = subprocess.run([pg_tool("pg_restore"), "--list", str(dump_dir)], env=env, capture_output=True, text=True, check=True).stdout
        data_ids = set().union(*(table_data_ids(dump_dir, table, env) for table in filled))
    listing = workdir / "table-restore.list"
    superuser_only = set(read_toc(dump_dir).entries(*SUPERUSER_ONLY, *NEVER_RESTORED))  # created after the checks
    listing.write_text("".join(f"{line}\n" for line in table_restore_list(toc, data_ids).splitlines() if line not in superuser_only))
    run_tool(
        target, workdir,
        restore_command(target, dump_dir, jobs, extra=["--section=data", "--section=post-data", f"--use-list={listing}"]),
        f"pg_restore (tables {printable(', '.join(sorted(tables)))}) into {printable(target.dbname)!r}", RestoreFailed,
    )
    return {str(table) for table in filled}


# -- the swap -------------------------------------------------------------------------------------


def _terminate(conn, name: str) -> int:
    rows = conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (name,),
    ).fetchall()
    return len(rows)


def database_oid(server: PgEndpoint, name: str) -> int | None:
    """Return the OID of database ``name`` on ``server`` (``None`` if there is none): its identity across renames."""
    with connect(server.with_dbname("postgres")) as conn:
        row = conn.execute("SELECT oid FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return int(row[0]) if row else None


def swap_into_place(
    server: PgEndpoint, live: str, restored: str, keep_as: str, attempts: int = 5, expected_live_oid: int | None = None
) -> dict:
    """Make ``restored`` the live database; the old one is kept as ``keep_as`` with connections off.

    Two restores of one database never swap at once (an advisory lock on the server, per live
    name), and a restore whose live database was replaced since it was planned (by another
    restore, whose result would otherwise be renamed away unseen) stops without changing anything.

    :param expected_live_oid: the live database's OID when the restore was planned.
    :raises SwapFailed: after rolling back to the original names, if the swap cannot complete.
    """
    steps: list[str] = []
    with connect(server.with_dbname("postgres"), application_name="pgdr-swap") as conn:
        locked = conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (f"pgdr swap {live}",)).fetchone()[0]
        if not locked:
            raise SwapFailed(
                f"Another restore of {printable(live)!r} is swapping databases on {server.host}:{server.port} right now; "
                f"nothing was changed. The restored copy is still available as {printable(restored)!r}. When the other "
                "restore has finished, look at the live database before you restore again."
            )
        current_oid = conn.execute("SELECT oid FROM pg_database WHERE datname = %s", (live,)).fetchone()
        if expected_live_oid is not None and current_oid is not None and int(current_oid[0]) != expected_live_oid:
            raise SwapFailed(
                f"The live database {printable(live)!r} was replaced since this restore was planned (by another restore, "
                f"or dropped and created again); nothing was changed. The restored copy is still available as "
                f"{printable(restored)!r}. Look at the live database now, and trigger the restore again if it is still needed."
            )
        for name in (live, restored):
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                raise SwapFailed(f"Database {name!r} does not exist on {server.host}:{server.port}; nothing was changed.")
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (keep_as,)).fetchone():
            raise SwapFailed(f"Database {keep_as!r} exists already; nothing was changed. Run the restore again.")
        conn.execute(f"ALTER DATABASE {identifier(live)} WITH ALLOW_CONNECTIONS false")
        steps.append(f"connections to {live} disabled")
        renamed = False
        try:
            for attempt in range(1, attempts + 1):
                ended = _terminate(conn, live)
                steps.append(f"ended {ended} sessions on {live}")
                try:
                    conn.execute(f"ALTER DATABASE {identifier(live)} RENAME TO {identifier(keep_as)}")
                    renamed = True
                    break
                except Exception as err:  # noqa: BLE001 - a session slipped in: end it and try again
                    if attempt == attempts:
                        raise SwapFailed(f"Could not rename {live!r}: {err}") from None
                    time.sleep(0.5 * attempt)
            steps.append(f"{live} renamed to {keep_as}")
            # Checks may leave pooled sessions on the restored copy; it is ours to disconnect.
            _terminate(conn, restored)
            conn.execute(f"ALTER DATABASE {identifier(restored)} RENAME TO {identifier(live)}")
            steps.append(f"{restored} renamed to {live}")
        except Exception as err:
            # Roll back: the live name must hold the original database again.
            if renamed:
                conn.execute(f"ALTER DATABASE {identifier(keep_as)} RENAME TO {identifier(live)}")
                steps.append(f"rolled back: {keep_as} renamed back to {live}")
            conn.execute(f"ALTER DATABASE {identifier(live)} WITH ALLOW_CONNECTIONS true")
            steps.append(f"connections to {live} enabled again")
            raise SwapFailed(
                f"Swapping {restored!r} into place as {live!r} failed and was rolled back ({err}). The live "
                f"database is unchanged; the restored copy is still available as {restored!r}."
            ) from None
        clear_marker(conn, live)  # the restored database's own comment (from the backup) stays
        conn.execute(
            f"COMMENT ON DATABASE {identifier(keep_as)} IS 'kept by pgdr: the live database before a restore; "
            "connections are disabled (ALTER DATABASE ... WITH ALLOW_CONNECTIONS true to look inside)'"
        )
    return {"steps": steps}


def render_plan(plan: dict[str, Any]) -> str:
    """Return the restore plan as the lines an on-call engineer reads in the log."""
    from pgdr.messages import format_duration

    expected = format_duration(plan["expected_seconds"]) if plan.get("expected_seconds") else "unknown (no verification yet)"
    lines = [
        f"  database        : {plan['database']} (on the server: {plan['dbname']})",
        f"  backup          : {plan['backup_id']} ({plan['backup_status']}), chosen by {plan['selector']!r}",
        f"  recovery point  : {plan['recovery_point']} (data after this moment is not in the backup)",
        f"  size            : {plan['size']}",
        f"  mode            : {plan['mode']}" + (f", tables {', '.join(plan['tables'])}" if plan["tables"] else ""),
        f"  target          : {plan['target']} on {plan['target_server']} ({plan['target_conn_id']})",
        f"  expected time   : {expected}; the RTO is {format_duration(plan['rto_target_seconds'])}",
        f"  what happens    : {plan['what_happens']}",
    ]
    pitr = plan.get("pitr")
    if pitr:
        lines[1:3] = [
            f"  recovery        : point in time {pitr['target']} UTC: server {pitr['server']!r} is recovered in a scratch "
            "cluster on the worker (the live server is not touched), then this database is copied out of it",
            f"  base backup     : {pitr['base_backup']} (ended {pitr['base_backup_ended']}), chain {' -> '.join(pitr['chain'])}",
            f"  WAL to replay   : up to {pitr['wal_segments']} segments ({pitr['wal_bytes'] / 1e6:.0f} MB) from the archive",
            f"  recoverable     : {pitr['window']['oldest']} to {pitr['window']['newest']} UTC",
            f"  recovery time   : {pitr['expected_recovery']} (median of past PITR verifications)",
        ]
    needs = plan.get("needs")
    if plan.get("needs_unread"):
        lines.append(f"  owners, grants  : not checked yet, the table of contents could not be read ({plan['needs_unread'][:300]}); "
                     "check_checksums decides, restore_backup checks the roles again")
    elif plan.get("pitr"):
        lines.append("  owners, grants  : given back after the checks; the roles they name are checked once the moment is dumped")
    if needs:
        options = needs["database_options"]
        lines.append(
            "  database        : created with the source's "
            + (", ".join(f"{k.lower()} {v}" for k, v in options.items()) if options else "settings (the backup does not say: server defaults)")
        )
        lines.append(
            f"  owners, grants  : given back after the checks, as the server's connection ({len(needs['roles'])} roles named: "
            f"{', '.join(needs['roles']) or 'none'})"
        )
        if plan.get("roles_to_create"):
            passwords = "with" if plan.get("restore_role_passwords") else "without"
            lines.append(f"  roles created   : {', '.join(plan['roles_to_create'])} (missing on the target; as on the source "
                         f"server, {passwords} passwords)")
        if needs["superuser_objects"]:
            lines.append(f"  superuser-only  : {', '.join(needs['superuser_objects'])} (created after the checks)")
        if needs["skipped_objects"]:
            lines.append(f"  NOT restored    : {', '.join(needs['skipped_objects'])} (subscriptions would start replicating)")
    if plan["dry_run"]:
        lines.append("  DRY RUN         : nothing will be done; trigger again without dry_run to restore.")
    return "\n".join(lines)
