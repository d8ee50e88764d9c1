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

Backups are chosen by a *selector*: ``latest-verified`` (default), ``latest``, ``latest-dump``, a
backup id, or a timestamp meaning "the newest backup whose recovery point is at or before this
time". On a server with a WAL archive a timestamp is recovered to that very second, and ``latest``
means the end of the archive (every archived transaction, newer than any dump); ``latest-dump``
is the newest logical backup everywhere (what ``latest`` means on a server without an archive).

This module holds every rule of ``pgdr_restore``, in the order a restore meets them: the form
(:func:`read_request`) and the plan (:func:`plan_restore`, printed by :func:`render_plan`); a
point-in-time restore's dump of the moment (:func:`dump_moment`); the target and the restore into it
(:func:`restore_into_target`); the application's logins (:func:`check_app_roles`); the swap
(:func:`swap_into_place`); the report (:func:`restore_report`, :func:`render_report`). Its tasks in
:mod:`pgdr.tasks.restore` only read their context and call these.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgdr.errors import BackupNotFound, PermanentFailure, PgdrError, StorageUnavailable
from pgdr.identifiers import (
    MAX_IDENTIFIER_BYTES,
    InvalidIdentifier,
    QualifiedName,
    legacy_table_key,
    parse_qualified_name,
    printable,
)
from pgdr.incident_review import (
    incident_headline,
    incident_lines,
    incident_measures,
    incident_record,
    newest_commit,
    read_incident,
    store_incident_record,
)
from pgdr.logical.catalog import BackupCatalog, BackupEntry
from pgdr.logical.restore import RestoreFailed, restore_command, restore_dump
from pgdr.messages import SUPERUSER_RESTORE_WARNING, duration_or_na
from pgdr.postgres.client import PgEndpoint, connect, identifier, passfile_env, pg_tool, run_tool
from pgdr.postgres.marker import mark, marked_by, marker, unmark
from pgdr.records import achieved_rto, expected_restore_seconds, phase_seconds
from pgdr.storage.layout import is_backup_id

if TYPE_CHECKING:
    from pgdr.logical.privileges import DumpToc

log = logging.getLogger(__name__)

MODES = ("new-database", "replace", "server")
SELECTORS = ("latest-verified", "latest", "latest-dump")
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
    if selector in ("latest", "latest-dump"):
        return catalog.latest()
    if is_backup_id(selector):
        return catalog.get(selector)
    moment = parse_timestamp(selector)
    if moment is None:
        raise InvalidRestoreRequest(
            "'backup' must be latest-verified, latest, latest-dump, a backup id such as 20261122T093000Z-3fa2c1, or a "
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
            f"No backup of database {catalog.database!r} has a recovery point at or before {moment.isoformat()}: "
            f"the oldest is {backups[0].backup_id} from {backups[0].recovery_point.isoformat()}. Choose a later "
            "time, or that backup."
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
            f"is {len(name.encode())} bytes long; PostgreSQL names hold at most {MAX_IDENTIFIER_BYTES} bytes and "
            "would silently cut it"
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
    return expected_restore_seconds(e.verification for e in catalog.backups())


# -- restoring ------------------------------------------------------------------------------------


def create_target(
    server: PgEndpoint, name: str, run_id: str, owner: PgEndpoint | None = None, options: dict[str, str] | None = None
) -> None:
    """Create the empty restore target, owned by ``owner``'s role and marked as pgdr's; a previous try's copy is
    replaced.

    :param options: the backup's encoding and locale (``BackupNeeds.database_options``).
    """
    from pgdr.postgres.scratch import create_database

    with connect(server.with_dbname("postgres")) as conn:
        ours = marked_by(conn, name, TARGET_MARKER, run_id)
        if ours is not None:
            if not ours:
                raise InvalidRestoreRequest(
                    f"Database {name!r} already exists on {server.host}:{server.port} and was not created by this "
                    "run; pgdr will not overwrite it. Choose another target_name."
                )
            conn.execute(f"DROP DATABASE {identifier(name)} WITH (FORCE)")  # our own partial copy
        create_database(conn, name, owner, server, options)
        mark(conn, name, marker(TARGET_MARKER, run_id))


def release_target(server: PgEndpoint, name: str, run_id: str) -> bool:
    """Clear this run's marker from a restore target that is now in use; say whether it had one.

    Without the marker, no later try of the run (someone clearing ``restore_backup`` a day later)
    can take the database for its own half-finished copy and drop it.
    """
    with connect(server.with_dbname("postgres")) as conn:
        return bool(marked_by(conn, name, TARGET_MARKER, run_id)) and unmark(conn, name, TARGET_MARKER)


def drop_own_target(server: PgEndpoint, name: str, run_id: str) -> bool:
    """Drop a restore target only if this run created it; say whether it did."""
    with connect(server.with_dbname("postgres")) as conn:
        if not marked_by(conn, name, TARGET_MARKER, run_id):
            return False
        conn.execute(f"DROP DATABASE {identifier(name)} WITH (FORCE)")
    return True


# pg_restore -l prints "<dump id>; <catalog oid> <oid> <description> <schema> <name> <owner>". The
# description is one of a fixed set of words; names come after it and may hold spaces, so a line
# is never split on spaces to find a name: the entries of one table are found by pg_restore itself.
_TOC_ENTRY = re.compile(
    r"^(?P<id>\d+); \d+ \d+ (?P<desc>TABLE DATA|FK CONSTRAINT|BLOBS|BLOB METADATA|BLOB|LARGE OBJECT)\b"
)
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
        if match and (
            match.group("desc") in _SKIP_IN_TABLE_RESTORE
            or (match.group("desc") == "TABLE DATA" and match.group("id") not in data_ids)
        ):
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
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {
        m.group("id")
        for line in listing.splitlines()
        if (m := _TOC_ENTRY.match(line)) and m.group("desc") == "TABLE DATA"
    }


def expand_partitions(target: PgEndpoint, tables: list[QualifiedName]) -> set[QualifiedName]:
    """Return ``tables`` plus every partition below them, from the restored catalog."""
    expanded = set(tables)
    with connect(target) as conn:
        for table in tables:
            rows = conn.execute(
                "SELECT n.nspname, c.relname FROM pg_partition_tree(%s::regclass) t JOIN pg_class c ON c.oid = "
                "t.relid JOIN pg_namespace n ON n.oid = c.relnamespace",
                (table.quoted(),),
            ).fetchall()
            expanded.update(QualifiedName(schema, name) for schema, name in rows)
    return expanded


def restore_tables(
    target: PgEndpoint,
    dump_dir: Path,
    tables: list[str],
    jobs: int,
    workdir: Path,
    left_out: list[str],
    toc: DumpToc,
    done: Collection[str] = (),
) -> set[str]:
    """Restore the schema of the whole backup and the data of ``tables`` only; return the tables filled.

    :param tables: table keys (see :mod:`pgdr.identifiers`), such as ``"Sales Dept"."Customer Accounts"``.
    :param left_out: the tablespaces to leave out (:func:`pgdr.logical.restore.tablespaces_to_leave_out`).
    :param toc: the dump's :class:`pgdr.logical.privileges.DumpToc`.
    :param done: table-of-contents lines already restored (:func:`pgdr.logical.restore.create_untrusted_extensions`).
    """
    from pgdr.identifiers import parse_qualified_name
    from pgdr.logical.privileges import NOT_BY_THE_RESTORE_ROLE
    from pgdr.logical.restore import tablespace_options

    where = tablespace_options(left_out)
    schema_list = workdir / "table-schema.list"
    schema_list.write_text("".join(f"{line}\n" for line in toc.lines if line not in done))
    run_tool(
        target,
        workdir,
        restore_command(target, dump_dir, jobs, extra=["--section=pre-data", f"--use-list={schema_list}", *where]),
        f"pg_restore (schema) into {printable(target.dbname)!r}",
        RestoreFailed,
    )
    filled = expand_partitions(target, [parse_qualified_name(t) for t in tables])
    with passfile_env(target, workdir) as env:
        data_ids = set().union(*(table_data_ids(dump_dir, table, env) for table in filled))
    listing = workdir / "table-restore.list"
    after_checks = set(toc.entries(*NOT_BY_THE_RESTORE_ROLE))  # done after the checks, or never
    kept = table_restore_list("\n".join(toc.lines), data_ids).splitlines()
    listing.write_text("".join(f"{line}\n" for line in kept if line not in after_checks and line not in done))
    run_tool(
        target,
        workdir,
        restore_command(
            target, dump_dir, jobs, extra=["--section=data", "--section=post-data", f"--use-list={listing}", *where]
        ),
        f"pg_restore (tables {printable(', '.join(sorted(tables)))}) into {printable(target.dbname)!r}",
        RestoreFailed,
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
        locked = conn.execute(
            "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (f"pgdr swap {live}",)
        ).fetchone()[0]
        if not locked:
            raise SwapFailed(
                f"Another restore of {printable(live)!r} is swapping databases on {server.host}:{server.port} right "
                f"now; nothing was changed. The restored copy is still available as {printable(restored)!r}. When "
                "the other restore has finished, look at the live database before you restore again."
            )
        current_oid = conn.execute("SELECT oid FROM pg_database WHERE datname = %s", (live,)).fetchone()
        if expected_live_oid is not None and current_oid is not None and int(current_oid[0]) != expected_live_oid:
            raise SwapFailed(
                f"The live database {printable(live)!r} was replaced since this restore was planned (by another "
                "restore, or dropped and created again); nothing was changed. The restored copy is still available "
                f"as {printable(restored)!r}. Look at the live database now, and trigger the restore again if it is "
                "still needed."
            )
        for name in (live, restored):
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                raise SwapFailed(
                    f"Database {name!r} does not exist on {server.host}:{server.port}; nothing was changed."
                )
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
        except Exception as err:  # noqa: BLE001 - whatever failed, the live name is given back first
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
        unmark(conn, live, TARGET_MARKER)  # the restored database's own comment (from the backup) stays
        conn.execute(
            f"COMMENT ON DATABASE {identifier(keep_as)} IS 'kept by pgdr: the live database before a restore; "
            "connections are disabled (ALTER DATABASE ... WITH ALLOW_CONNECTIONS true to look inside)'"
        )
    return {"steps": steps}


def render_plan(plan: dict[str, Any]) -> str:
    """Return the restore plan as the lines an on-call engineer reads in the log."""
    from pgdr.messages import format_duration

    if plan["mode"] == "server":
        return render_server_restore_plan(plan)
    expected = (
        format_duration(plan["expected_seconds"]) if plan.get("expected_seconds") else "unknown (no verification yet)"
    )
    lines = [
        f"  database        : {plan['database']} (on the server: {plan['dbname']})",
        f"  backup          : {plan['backup_id']} ({plan['backup_status']}), chosen by {plan['selector']!r}",
        f"  recovery point  : {plan['recovery_point']} (data after this moment is not in the backup)",
        f"  size            : {plan['size']}",
        *(
            [f"  from            : copy {plan['restore_from']!r} ({plan['restore_from_location']})"]
            if plan.get("restore_from_location")
            else []
        ),
        f"  mode            : {plan['mode']}" + (f", tables {', '.join(plan['tables'])}" if plan["tables"] else ""),
        f"  target          : {plan['target']} on {plan['target_server']} ({plan['target_conn_id']})",
        f"  expected time   : {expected}; the RTO is {format_duration(plan['rto_target_seconds'])}",
        f"  what happens    : {plan['what_happens']}",
    ]
    pitr = plan.get("pitr")
    if pitr:
        point = (
            f"the end of the archive (now the last transaction at {pitr['end_of_archive']} UTC, "
            f"{format_duration(pitr['end_of_archive_behind_seconds'])} ago; newer than any logical dump; "
            "'latest-dump' takes the newest dump instead)"
            if pitr["target"] == "latest"
            else f"point in time {pitr['target']} UTC"
        )
        lines[1:3] = [
            f"  recovery        : {point}: server {pitr['server']!r} is recovered in a scratch cluster on the worker "
            "(the live server is not touched), then this database is copied out of it",
            f"  base backup     : {pitr['base_backup']} (ended {pitr['base_backup_ended']}), chain "
            f"{' -> '.join(pitr['chain'])}",
            f"  WAL to replay   : up to {pitr['wal_segments']} segments ({pitr['wal_bytes'] / 1e6:.0f} MB) from the "
            "archive",
            f"  recoverable     : {pitr['window']['oldest']} to {pitr['window']['newest']} UTC",
            f"  recovery time   : {pitr['expected_recovery']} (median of past PITR verifications)",
            *(
                [
                    f"  worker disk     : about {pitr['recovery_disk_bytes'] / 1e9:.1f} GB free needed in the work "
                    "directory (PGDR_WORK_DIR) of the worker that recovers, and the dump's size beside it; checked "
                    "there before the recovery starts"
                ]
                if "recovery_disk_bytes" in pitr  # plans made before it was measured lack it
                else []
            ),
        ]
    needs = plan.get("needs")
    if plan.get("needs_unread"):
        lines.append(
            "  owners, grants  : not checked yet, the table of contents could not be read "
            f"({plan['needs_unread'][:300]}); check_checksums decides, restore_backup checks the roles again"
        )
    elif plan.get("pitr"):
        lines.append(
            "  owners, grants  : given back after the checks; the roles they name are checked once the moment is dumped"
        )
    if needs:
        options = needs["database_options"]
        lines.append(
            "  database        : created with the source's "
            + (
                ", ".join(f"{k.lower()} {v}" for k, v in options.items())
                if options
                else "settings (the backup does not say: server defaults)"
            )
        )
        lines.append(
            f"  owners, grants  : given back after the checks, as the server's connection ({len(needs['roles'])} "
            f"roles named: {', '.join(printable(r) for r in needs['roles']) or 'none'})"
        )
        if plan.get("roles_to_create"):
            passwords = "with" if plan.get("restore_role_passwords") else "without"
            roles = ", ".join(printable(role) for role in plan["roles_to_create"])
            lines.append(
                f"  roles created   : {roles} (missing on the target; as on the source server, {passwords} passwords)"
            )
        if needs.get("extensions"):
            lines.append(
                f"  extensions      : {', '.join(printable(e) for e in needs['extensions'])} (those only a superuser "
                "may create are created first by the server's connection)"
            )
        if needs.get("tablespaces"):
            lines.append(
                f"  tablespaces     : {', '.join(printable(t) for t in needs['tablespaces'])} (kept if the target has "
                "them and the restore role may create in them; if not, everything in the database's default tablespace)"
            )
        if needs["superuser_objects"]:
            lines.append(f"  superuser-only  : {', '.join(needs['superuser_objects'])} (created after the checks)")
        if needs["skipped_objects"]:
            lines.append(
                f"  NOT restored    : {', '.join(needs['skipped_objects'])} (subscriptions would start replicating)"
            )
    if plan["dry_run"]:
        lines.append("  DRY RUN         : nothing will be done; trigger again without dry_run to restore.")
    return "\n".join(lines)


# -- planning -------------------------------------------------------------------------------------


def parse_tables(value: Any) -> list[str]:
    """Read the form's ``tables`` list: each entry ``schema.table`` as SQL writes it; return their keys."""
    if value in (None, "", []):
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise InvalidRestoreRequest(f"'tables' must be a list of schema.table names; got {printable(repr(value))}.")
    keys = []
    for item in value:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            keys.append(str(parse_qualified_name(item, "tables entry")))
        except InvalidIdentifier as err:
            raise InvalidRestoreRequest(f"{err} Nothing was touched.") from None
    return list(dict.fromkeys(keys))


def check_tables_in_backup(tables: list[str], entry) -> None:
    """Refuse ``tables`` entries that are not tables of the backup, suggesting the near ones."""
    check_tables_in(tables, entry.manifest.row_counts, f"backup {entry.backup_id}")


def check_tables_in(tables: list[str], known: dict[str, int], what: str) -> None:
    """Refuse ``tables`` entries that are not among ``known`` (table keys), suggesting the near ones."""
    unknown = [t for t in tables if t not in known]
    if not unknown:
        return
    hints = []
    for key in unknown:
        wanted = parse_qualified_name(key)
        near = [
            k
            for k in known
            if parse_qualified_name(k).name.lower() == wanted.name.lower() or legacy_table_key(k) == key
        ]
        if near:
            hints.append(f"for {printable(key)} did you mean {', '.join(printable(n) for n in sorted(near))}?")
    listing = ", ".join(printable(k) for k in sorted(known)[:30]) + (" ..." if len(known) > 30 else "")
    raise InvalidRestoreRequest(
        f"Not a table of {what}: {', '.join(printable(t) for t in unknown)}. "
        + (" ".join(hints) + " " if hints else "")
        + "Name tables as schema.table, double-quoting names with upper case, spaces or dots "
        '(e.g. "Sales Dept"."Customer Accounts"). Views, materialized views and sequences are not '
        f"tables: they come back with the schema of every table-level restore. The tables of {what}: {listing}. "
        "Nothing was touched."
    )


def read_request(params: dict[str, Any], plan, db) -> dict[str, Any]:
    """Check the restore form of database ``db`` against the plan; return it with defaults filled in.

    :raises InvalidRestoreRequest: saying what to fix in the form. Nothing is touched.
    """
    mode = params.get("mode") or "new-database"
    if mode not in MODES:
        raise InvalidRestoreRequest(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
    if mode == "server":
        return read_server_request(params, plan, db)
    tables = parse_tables(params.get("tables"))
    known_conns = sorted({d.conn_id for d in plan.databases} | {d.verify_conn_id for d in plan.databases})
    target_conn_id = params.get("target_conn_id") or db.conn_id
    if target_conn_id not in known_conns:
        raise InvalidRestoreRequest(
            f"target_conn_id {target_conn_id!r} is not a server of the DR plan; choose one of {', '.join(known_conns)}."
        )
    if mode == "replace":
        check_replace_request(db, params.get("confirm"), target_conn_id, tables)
    restore_roles = bool(params.get("restore_roles"))
    restore_from = params.get("restore_from") or None
    try:
        restore_from = db.storage_named(restore_from).name
    except ValueError as err:
        raise InvalidRestoreRequest(f"restore_from: {err}. Nothing was touched.") from None
    return {
        "mode": mode,
        "restore_from": restore_from,
        "tables": tables,
        "target_conn_id": target_conn_id,
        "selector": params.get("backup") or "latest-verified",
        "target_name": params.get("target_name"),
        "restore_roles": restore_roles,
        "restore_role_passwords": restore_roles and bool(params.get("restore_role_passwords")),
        "dry_run": bool(params.get("dry_run")),
    }


def _select_backup_from(catalog: BackupCatalog, selector: str, db, source) -> BackupEntry:
    """:func:`select_backup` in ``source``; when that target cannot be reached, say which copies the database has."""
    try:
        return select_backup(catalog, selector)
    except StorageUnavailable as err:
        others = [t.name for t in (db.storage, *db.copies) if t is not source]
        if not others:
            raise
        raise StorageUnavailable(
            f"{err} Database {db.name!r} also has its backups in {', '.join(repr(o) for o in others)}: to restore "
            f"from there, set 'Restore from' (restore_from; --from on the command line) to one of them."
        ) from None


def read_server_request(params: dict[str, Any], plan, db) -> dict[str, Any]:
    """Check a whole-server recovery asked from the form: a PITR server with a restore target, its name confirmed,
    a moment or 'latest'."""
    server = plan.pitr_server_of(db.name)
    if server is None:
        raise InvalidRestoreRequest(
            f"Mode server recovers the whole server of {db.name!r} from its base backups and WAL, but that server has "
            "no WAL archive in the plan (servers: with pitr:). Restore the database from a dump (mode new-database or "
            "replace) instead. Nothing was touched."
        )
    if params.get("confirm") != server.name:
        raise InvalidRestoreRequest(
            f"Mode server recovers the whole server {server.name!r} (databases {', '.join(server.databases)}) onto a "
            f"new host. To confirm, type the server name {server.name!r} in the 'confirm' field"
            + (f" (you typed {printable(str(params['confirm']))!r})." if params.get("confirm") else ".")
            + " Nothing was touched."
        )
    if server.restore is None:
        raise InvalidRestoreRequest(
            f"Server {server.name!r} has no restore target in the plan: add servers.{server.name}.restore: {{queue: "
            "..., data_dir: ...}} and start a worker on the new database host with `airflow celery worker --queues "
            "<queue>`; or, on that host, run `python -m pgdr recover-server --server "
            f"{server.name} --to latest --data-dir DIR`. Nothing was touched."
        )
    selector = (params.get("backup") or "latest").strip()
    if selector == "latest-verified":  # the form's default: for a server, the newest state
        selector = "latest"
    if selector != "latest" and parse_timestamp(selector) is None:
        raise InvalidRestoreRequest(
            f"Mode server recovers to a moment: 'backup' must be 'latest' (the end of the WAL archive) or a UTC time "
            f"such as 2026-11-26 09:40:59; got {printable(selector)!r}. Nothing was touched."
        )
    for field_name in ("tables", "target_name", "target_conn_id"):
        if params.get(field_name):
            raise InvalidRestoreRequest(
                f"Mode server recovers the whole server onto its restore target; leave {field_name!r} empty. Nothing "
                "was touched."
            )
    restore_from = params.get("restore_from") or None
    if restore_from is not None and restore_from != server.pitr.storage.name:
        try:
            restore_from = server.pitr.storage_named(restore_from).name
        except ValueError as err:
            raise InvalidRestoreRequest(
                f"Mode server recovers from base backups and WAL: {err} (pitr.copies; a copy of the dumps alone, "
                "'copies' of a database, holds no WAL). Leave 'Restore from' empty or name one of those. Nothing was "
                "touched."
            ) from None
    else:
        restore_from = None
    return {
        "mode": "server",
        "server": server.name,
        "selector": selector,
        "dry_run": bool(params.get("dry_run")),
        "restore_from": restore_from,
    }


def plan_server_restore(request: dict[str, Any], res, db, workdir: Path) -> dict[str, Any]:
    """Return the plan of a whole-server recovery from the form (its data directory is checked on the new host)."""
    from pgdr.physical.recovery import plan_point_in_time

    server = res.plan.server(request["server"])
    moment = None if request["selector"] == "latest" else parse_timestamp(request["selector"])
    source = server.pitr.storage_named(request["restore_from"]) if request.get("restore_from") else None
    pitr = plan_point_in_time(server, res, moment, workdir / "pitr", source)
    restore = server.restore
    return {
        "mode": "server",
        "database": db.name,
        "dbname": db.dbname,
        "server": server.name,
        "selector": request["selector"],
        "dry_run": request["dry_run"],
        "backup_id": None,
        "tables": [],
        "pitr": pitr,
        "queue": restore.queue,
        "data_dir": restore.data_dir,
        "port": restore.port,
        "os_user": restore.os_user,
        "restore_from": request.get("restore_from"),  # a copy of the server's archive (pitr.copies), or None
        "rto_target_seconds": db.rto.total_seconds(),
        "expected_seconds": pitr["expected_recovery_seconds"],
        "what_happens": (
            f"The whole server {server.name!r} (databases {', '.join(server.databases)}) is recovered into "
            f"{restore.data_dir} by the worker on queue {restore.queue!r} (the new host), proven (heartbeats, "
            "pg_amcheck, expectations) on a private socket, then started in its own configuration"
            + (f" on port {restore.port}" if restore.port else "")
            + " with archive_mode off. The old host is never contacted. A non-empty data directory there is refused."
        ),
    }


def render_server_restore_plan(plan: dict[str, Any]) -> str:
    """Return a whole-server recovery's plan, as the form's restore plan."""
    from pgdr.messages import format_duration, pitr_target_words

    pitr = plan["pitr"]
    lines = [
        f"  server          : {plan['server']} (mode server: the whole cluster, every database on it)",
        f"  recover to      : {pitr_target_words(pitr['target'])}; the archive's last transaction is at "
        f"{pitr['end_of_archive']} UTC ({format_duration(pitr['end_of_archive_behind_seconds'])} ago)",
        f"  base backups    : {' -> '.join(pitr['chain'])} (the newest ended {pitr['base_backup_ended']})",
        f"  WAL to replay   : up to {pitr['wal_segments']} segments ({pitr['wal_bytes'] / 1e6:.0f} MB)",
        "  read from       : "
        + (f"copy {plan['restore_from']!r} (pitr.copies)" if plan.get("restore_from") else "the server's archive"),
        f"  recoverable     : {pitr['window']['oldest']} to {pitr['window']['newest']} UTC",
        f"  expected time   : {pitr['expected_recovery']}; the RTO is {format_duration(plan['rto_target_seconds'])}",
        f"  runs on         : the worker of queue {plan['queue']!r}, into {plan['data_dir']}",
        f"  what happens    : {plan['what_happens']}",
    ]
    if plan["dry_run"]:
        lines.append("  DRY RUN         : nothing will be done; trigger again without dry_run to recover.")
    return "\n".join(lines)


def check_replace_request(db, confirm: Any, target_conn_id: str, tables: list[str]) -> None:
    """Replace mode needs the live name typed exactly, the live server, and the whole database."""
    if confirm != db.dbname:
        typed = ""
        if confirm and str(confirm).strip() == db.dbname:
            typed = f" (you typed {confirm!r}, with spaces around the name: type it exactly)."
        elif confirm:
            typed = f" (you typed {printable(str(confirm))!r})."
        raise InvalidRestoreRequest(
            f"Replace mode renames the live database {printable(db.dbname)!r} and puts the restored copy in its "
            f"place. To confirm, type the database name {printable(db.dbname)!r} in the 'confirm' field"
            + (typed or ".")
            + " Nothing was touched."
        )
    if target_conn_id != db.conn_id:
        raise InvalidRestoreRequest(
            "Replace mode works on the live server only; leave target_conn_id empty, or use new-database mode to "
            "restore onto another server."
        )
    if tables:
        raise InvalidRestoreRequest(
            "A table-level restore goes into a new database next to the live one (mode new-database); copy the rows "
            "you need from there. pgdr never overwrites live tables."
        )


def choose_target(
    server: PgEndpoint, dbname: str, mode: str, target_name: str | None, started: datetime, live_exists: bool
) -> tuple[str, str | None, str]:
    """Return ``(target, keep live as, what happens)``: the restore's new database and the live one's fate."""
    if mode == "new-database":
        target = check_target_name(target_name or default_target_name(dbname, started), dbname)
        if database_exists(server, target):
            raise InvalidRestoreRequest(
                f"The target database {target!r} already exists on {server.host}:{server.port}. pgdr never "
                "overwrites a database: choose another target_name, or drop that one yourself if it is garbage."
            )
        return (
            target,
            None,
            f"The live database {dbname!r} is not touched; the backup is restored as {target!r} next to it.",
        )
    target = default_target_name(dbname, started, "restoring")
    keep_as = default_target_name(dbname, started, "pre_restore")
    for name in (target, keep_as):
        if database_exists(server, name):
            raise InvalidRestoreRequest(f"Database {name!r} already exists; wait a second and trigger again.")
    fate = (
        f"The backup is restored as {target!r} and checked. Only if it passes: sessions on {dbname!r} are ended, "
        f"{dbname!r} is renamed to {keep_as!r} (kept, never dropped, connections disabled) and the restored copy "
        f"takes the name {dbname!r}."
        if live_exists
        else f"The live database {dbname!r} does not exist; the checked restored copy will take its name."
    )
    return target, keep_as, fate


def backup_needs_of(db, manifest, store, data_key: bytes | None, workdir: Path):
    """Read what a backup needs of its target (roles, encoding and locale) from its table of contents alone."""
    from pgdr.logical.privileges import backup_needs, read_toc
    from pgdr.logical.restore import fetch_toc

    fetch_toc(manifest, store, workdir / "dump", data_key)
    return backup_needs(read_toc(workdir / "dump"), workdir)


def check_roles(needs, server: PgEndpoint, backup_id: str, restore_roles: bool) -> list[str]:
    """Return the roles ``needs`` names that ``server`` lacks; refuse them unless the form allows creating them."""
    from pgdr.logical.privileges import missing_roles

    missing = missing_roles(needs, server) if needs else []
    if missing and not restore_roles:
        raise InvalidRestoreRequest(
            f"Backup {backup_id} names {len(missing)} role(s) that server {server.host}:{server.port} does not have "
            f"(owners or grantees of its objects): {', '.join(printable(r) for r in missing)}. Create them there "
            "first (from your roles' source of truth, or pg_dumpall --globals-only of the source server), or "
            "trigger again with restore_roles on: pgdr then creates them as they were on the source server (from "
            "the backup's copy of its roles; without passwords unless restore_role_passwords is on). Nothing was "
            "touched."
        )
    return missing


def check_extensions(needs, server: PgEndpoint, backup_id: str) -> None:
    """Refuse a backup whose extensions ``server`` does not have installed, before anything is downloaded."""
    from pgdr.logical.privileges import missing_extensions

    missing = missing_extensions(needs, server) if needs else []
    if missing:
        raise InvalidRestoreRequest(
            f"Backup {backup_id} creates extension(s) that server {server.host}:{server.port} does not have installed: "
            f"{', '.join(printable(e) for e in missing)} (not in pg_available_extensions). Install their packages on "
            "that server (the same major version as the source's), or restore to another server, then trigger "
            "again. Nothing was touched."
        )


def plan_restore(
    params: dict[str, Any], res, started: datetime, workdir: Path, label=lambda **_: None
) -> dict[str, Any]:
    """Check the whole restore request, choose the backup (or the moment) and the target; return the restore plan.

    Nothing is touched: bad input fails here, saying what to fix. Every later phase works from the
    returned plan (plain values), so a retry does exactly the same thing.

    :param res: the deployment (:class:`pgdr.resources.Resources`).
    :param workdir: a private directory for the backup's table of contents and the PITR window.
    :param label: called with ``database=`` and ``backup_id=`` as soon as they are known (for alerts).
    """
    from pgdr.physical.recovery import plan_point_in_time
    from pgdr.postgres.client import check_restore_role

    db = res.plan.database(params.get("database") or "")
    label(database=db.name)
    request = read_request(params, res.plan, db)
    incident = read_incident(params, started)
    if request["mode"] == "server":
        return {**plan_server_restore(request, res, db, workdir), "incident": incident}
    source = db.storage_named(request["restore_from"])
    store, layout = res.store(source)
    catalog = BackupCatalog(store, layout, db.name)
    pitr_server = res.plan.pitr_server_of(db.name)
    entry, pitr = None, None
    moment_asked = request["selector"] == "latest" or parse_timestamp(request["selector"])
    if pitr_server is not None and moment_asked and source is not db.storage:
        raise InvalidRestoreRequest(
            f"Copy {source.name!r} holds the dumps of {db.name!r}, not the server's base backups and WAL, so it cannot "
            f"recover the database to {request['selector']!r}. Give a backup id, latest-dump or latest-verified to "
            f"restore a dump from the copy, or restore from {db.storage.name!r}. Nothing was touched."
        )
    if pitr_server is not None and moment_asked:
        # The server has a WAL archive: recover it to that very moment (or to the end of the archive)
        # instead of taking an older dump.
        moment = parse_timestamp(request["selector"])
        pitr = plan_point_in_time(pitr_server, res, moment, workdir / "pitr")
    else:
        entry = _select_backup_from(catalog, request["selector"], db, source)
        label(database=db.name, backup_id=entry.backup_id)
        check_tables_in_backup(request["tables"], entry)
    server = res.database(db, conn_id=request["target_conn_id"])
    check_restore_role(res.restorer(db, server), db.restore_as_superuser)
    live_oid = database_oid(server, db.dbname)
    if not incident["declared_at"] and live_oid is not None:  # no failure time given: the live server's newest commit
        newest = newest_commit(res.database(db))
        incident["live_newest_commit"] = newest.isoformat() if newest else None
    target, keep_as, fate = choose_target(
        server, db.dbname, request["mode"], request["target_name"], started, live_oid is not None
    )
    needs, unread = None, None
    if entry is not None:
        try:
            needs = backup_needs_of(db, entry.manifest, store, res.data_key(db, entry.manifest), workdir / "toc")
        except PgdrError as err:  # a damaged backup is check_checksums' to refuse, with every bad file named
            unread = str(err)
    missing = check_roles(needs, server, entry.backup_id if entry else "", request["restore_roles"])
    check_extensions(needs, server, entry.backup_id if entry else "")
    expected = expected_duration(catalog)
    if pitr is not None:
        expected = (pitr["expected_recovery_seconds"] or 0) + (expected or 0) or None
    return {
        "database": db.name,
        "dbname": db.dbname,
        "backup_id": entry.backup_id
        if entry
        else None,  # PITR: the dump of the recovered moment, made by recover_to_moment
        "recovery_point": entry.manifest.recovery_point.isoformat() if entry else pitr["recovery_point_expected"],
        "backup_status": entry.status if entry else f"point-in-time recovery from base backup {pitr['base_backup']}",
        "backup_size_bytes": entry.manifest.size if entry else pitr["base_backup_bytes"],
        "stored_size_bytes": entry.manifest.stored_size if entry else pitr["base_backup_bytes"],
        "size": entry.manifest.size_summary() if entry else pitr["size"],
        "pitr": pitr,
        "selector": request["selector"],
        "restore_from": source.name,
        # where a copy is read from (None when the database's own storage target is)
        "restore_from_location": store.describe(layout.database_prefix(db.name)) if source is not db.storage else None,
        "mode": request["mode"],
        "target_conn_id": request["target_conn_id"],
        "target_server": f"{server.host}:{server.port}",
        "target": target,
        "keep_live_as": keep_as,
        "live_exists": live_oid is not None,
        "live_oid": live_oid,
        "tables": request["tables"],
        "dry_run": request["dry_run"],
        "expected_seconds": expected,
        "rto_target_seconds": db.rto.total_seconds(),
        "what_happens": fate + (f" {SUPERUSER_RESTORE_WARNING}" if db.restore_as_superuser else ""),
        "restore_as_superuser": db.restore_as_superuser,
        "restore_roles": request["restore_roles"],
        "restore_role_passwords": request["restore_role_passwords"],
        "roles_to_create": missing,
        "needs": needs.to_dict() if needs else None,  # PITR: known once the moment is dumped
        "needs_unread": unread,
        "incident": incident,
    }


# -- the report -----------------------------------------------------------------------------------


def render_report(report: dict[str, Any]) -> str:
    """Return the restore report as markdown."""
    plan = report["plan"]
    lines = [
        f"# Restore of `{plan['database']}`: {report['status'].upper()}",
        "",
        f"- Triggered by: {report['triggered_by']} (run `{report['run_id']}`), through {report.get('via', 'Airflow')}",
        f"- Backup: `{plan['backup_id']}` ({plan['backup_status']}), recovery point {plan['recovery_point']}",
        *(
            [f"- Restored from copy `{plan['restore_from']}` ({plan['restore_from_location']})"]
            if plan.get("restore_from_location")
            else []
        ),
        f"- Mode: {plan['mode']}" + (f", tables {', '.join(plan['tables'])}" if plan["tables"] else ""),
        *([f"- **{SUPERUSER_RESTORE_WARNING}**"] if plan.get("restore_as_superuser") else []),
        f"- Target: `{plan['target']}` on {plan['target_server']}",
        f"- Achieved RTO: {duration_or_na(report['achieved_rto_seconds'])} against a target of "
        f"{duration_or_na(report['rto_target_seconds'])}"
        + ("" if report["rto_met"] is None else (" (met)" if report["rto_met"] else " (**BREACHED**)")),
        *incident_headline(report),
    ]
    if report["failed_phase"]:
        lines.append(f"- **Failed in phase `{report['failed_phase']}`**; the live database was not changed.")
    lines += ["", "## Plan", "", plan["what_happens"], "", "## Phases", "", "| phase | seconds |", "| --- | --- |"]
    lines += [f"| {phase} | {seconds:.1f} |" for phase, seconds in report["phase_seconds"].items()]
    if report["validation"]:
        v = report["validation"]
        lines += [
            "",
            "## Validation",
            "",
            f"{v['expectations'] - v['failed']} of {v['expectations']} expectations passed on {v['tables']} tables.",
        ]
        lines += [f"- FAILED: {line}" for line in v.get("failures", [])]
        lines.append(f"Report: {report['validation_report']}")
    lines += ["", "## Owners, grants and settings", ""] + privileges_lines(report)
    if report["swap_steps"]:
        lines += ["", "## Swap", ""] + [f"1. {step}" for step in report["swap_steps"]]
    lines += ["", "## Final state", ""]
    for role, facts in report["final_state"].items():
        state = (
            f"{facts['size_bytes'] / 1e6:.1f} MB"
            + ("" if facts.get("allows_connections", True) else ", connections disabled")
            if facts["exists"]
            else "does not exist"
        )
        lines.append(f"- {role}: `{facts['name']}`: {state}")
    if report.get("incident") and report["status"] != "dry-run":
        lines += incident_lines(report)
    return "\n".join(lines) + "\n"


def privileges_lines(report: dict[str, Any]) -> list[str]:
    """Return what the restore gave back besides the rows, for the report."""
    done = report.get("privileges")
    lines = []
    if report.get("roles_created"):
        passwords = (
            "with their passwords"
            if report["plan"].get("restore_role_passwords")
            else ("without passwords: set the application's login password yourself")
        )
        roles = ", ".join(printable(role) for role in report["roles_created"])
        lines.append(
            f"- Roles created on the target as the backup's copy of the source server's roles says ({passwords}; "
            f"SUPERUSER, CREATEROLE, REPLICATION and BYPASSRLS never given): {roles}"
        )
    if report.get("tablespaces_left_out"):
        lines.append(
            "- Tablespaces the target server lacks, or the restore role may not create in: "
            f"{', '.join(printable(t) for t in report['tablespaces_left_out'])}. The tables and indexes that were in "
            "them are in the database's default tablespace; move them with ALTER TABLE … SET TABLESPACE if it matters."
        )
    if report.get("extensions_created"):
        lines.append(
            "- Extensions created by the target server's own connection, as the restore role may not create them (not "
            f"trusted): {', '.join(printable(e) for e in report['extensions_created'])}, each by name in its schema; "
            "the rest of the backup was restored as the restore role."
        )
    if not done:
        return lines + [
            "- Not completed (this phase failed or did not run; its alert says why): unless the phase's log says "
            "they were applied, the copy is owned by the restore role, without the backup's grants."
        ]
    lines += [
        f"- Applied as the server's connection, after the checks: {done['owners']} owners, {done['grants']} grants, "
        f"{done['default_privileges']} default privileges, {done['database_properties']} database properties "
        "(settings, grants, comment, connection limit)",
    ]
    if done.get("row_security"):
        tables = f"{done['row_security']} table{'s' if done['row_security'] != 1 else ''}"
        lines.append(
            f"- Row-level security switched on again after the checks, on {tables} (the checks counted and validated "
            "every row; the policies apply from now on)"
        )
    for role, found in (done.get("app_roles") or {}).items():
        if isinstance(found, dict):
            lines.append(
                f"- Application login `{role}`: the same {found['checked']} privileges as on the live database"
            )
    if done["superuser_objects"]:
        lines.append(f"- Created (only a superuser can): {', '.join(done['superuser_objects'])}")
    if done["skipped_objects"]:
        lines.append(
            "- **Not restored** (on a copy they would start replicating; create them by hand if this copy is the "
            f"new primary): {', '.join(done['skipped_objects'])}"
        )
    return lines


def check_app_roles(db, live: PgEndpoint, restored: PgEndpoint) -> dict[str, Any] | None:
    """The plan's ``app_roles``: each may do on the restored copy what it may do on the live database, or the restore
    stops.

    :param live: the live database, on its own server, before any swap.
    """
    from pgdr.logical.privileges import PrivilegesFailed, app_roles_problem, compare_app_roles

    if not db.app_roles:
        return None
    if not database_exists(live, db.dbname):
        log.warning("app_roles not compared: the live database %s does not exist.", db.dbname)
        return {"skipped": f"the live database {db.dbname!r} does not exist"}
    compared = compare_app_roles(live, restored, db.app_roles)
    problem = app_roles_problem(compared)
    if problem:
        raise PrivilegesFailed(problem)
    for role, found in compared.items():
        log.info(
            "Application login %s: the same %d privileges on the restored copy as on the live database.",
            role,
            found["checked"],
        )
    return compared


# -- the phases -----------------------------------------------------------------------------------

PHASES = (
    "check_checksums",
    "restore_backup",
    "check_integrity",
    "validate_data",
    "apply_privileges",
    "swap_into_place",
)


class RestoreObjects:
    """What every phase of one restore plan works on: the database, its backup, the target server."""

    def __init__(self, plan: dict[str, Any], res):
        self.plan, self.res = plan, res
        self.db = res.plan.database(plan["database"])
        # plan["restore_from"]: a copy target (pgdr.logical.copies); a plan written before it existed: the storage
        self.store, self.layout = res.store(self.db.storage_named(plan.get("restore_from")))
        self.catalog = BackupCatalog(self.store, self.layout, self.db.name)
        self.entry = self.catalog.get(plan["backup_id"])
        self.server = res.database(self.db, conn_id=plan["target_conn_id"])

    @property
    def restored(self) -> PgEndpoint:
        """The restored copy as the restore role sees it (never a superuser)."""
        return self.res.restorer(self.db, self.server).with_dbname(self.plan["target"])

    def data_key(self, refuse_unencrypted: bool = False) -> bytes | None:
        return self.res.data_key(self.db, self.entry.manifest, self.catalog if refuse_unencrypted else None)

    def report_key(self, run_id: str, suffix: str) -> str:
        return self.layout.restore_report_key(self.db.name, self.entry.backup_id, f"{run_stamp(run_id)}{suffix}")


def run_stamp(run_id: str) -> str:
    """Return ``run_id`` as a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id)


def restore_into_target(objs: RestoreObjects, run_id: str, workdir: Path) -> dict[str, Any]:
    """Download the backup, then :func:`restore_dump_dir` it into the plan's target."""
    from pgdr.logical.restore import download_backup
    from pgdr.postgres.client import check_restore_role

    db, entry = objs.db, objs.entry
    check_restore_role(objs.restored, db.restore_as_superuser)
    data_key = objs.data_key()  # a missing key fails here, before the target is created
    dump = workdir / "dump"
    download = download_backup(entry.manifest, objs.store, dump, workers=max(2, db.dump_jobs), data_key=data_key)
    restored = restore_dump_dir(
        objs.plan, db, objs.server, objs.restored, dump, f"Backup {entry.backup_id}", run_id, workdir
    )
    log.info(
        "Backup %s restored into %s in %.1fs (download %.1fs).",
        entry.backup_id,
        objs.plan["target"],
        restored["restore_seconds"],
        download["seconds"],
    )
    return {"download_seconds": download["seconds"], **restored}


def restore_dump_dir(
    plan: dict[str, Any],
    db,
    server: PgEndpoint,
    target: PgEndpoint,
    dump: Path,
    what: str,
    run_id: str,
    workdir: Path,
) -> dict[str, Any]:
    """Check the roles, create the target and ``pg_restore`` the local dump directory ``dump`` into it; a failure
    drops only this run's target.

    The target is created with the source's encoding and locale; roles the dump names that the
    server lacks are created first (as on the source server, from the dump's ``globals.sql``) when
    the form allows it (``restore_roles``), or the restore stops.

    :param server: the target server, as the plan's connection; ``target``: the target database as the restore role.
    :param what: the dump in messages ("Backup 2026...", "The dump of shop as of ...").
    """
    from pgdr.logical.privileges import MissingRoles, backup_needs, create_roles, globals_of, missing_roles, read_toc
    from pgdr.logical.restore import prepare_target

    toc = read_toc(dump)
    needs = backup_needs(toc, workdir)
    missing = missing_roles(needs, server)
    if missing and not plan.get("restore_roles"):
        raise MissingRoles(
            f"{what} names role(s) that server {plan['target_server']} does not have: "
            f"{', '.join(printable(r) for r in missing)}. Create them, or trigger again with restore_roles on. "
            "Nothing was created; the live database was not touched."
        )
    created = create_roles(
        server,
        missing,
        f"restore {run_id} of {db.name}",
        globals_of(dump),
        with_passwords=bool(plan.get("restore_role_passwords")),
    )
    create_target(server, plan["target"], run_id, owner=target, options=needs.database_options)
    try:
        t0 = time.monotonic()
        ready = prepare_target(server, target, toc, needs, workdir, what)
        left_out, done = ready.tablespaces_left_out, ready.extensions.entries
        filled = None
        if plan["tables"]:
            filled = sorted(restore_tables(target, dump, plan["tables"], db.dump_jobs, workdir, left_out, toc, done))
        else:
            restore_dump(target, dump, db.dump_jobs, workdir, left_out, toc, done)
        restore_s = time.monotonic() - t0
    except BaseException:
        _drop_quietly(server, plan["target"], run_id)  # a half-restored database is garbage
        raise
    return {
        "restore_seconds": restore_s,
        "tables_filled": filled,
        "roles_created": created,
        "database_options": needs.database_options,
        "tablespaces_left_out": left_out,
        "extensions_created": list(ready.extensions.names),
    }


def swap_or_rename(server: PgEndpoint, plan: dict[str, Any]) -> dict[str, Any]:
    """Replace mode's last step: the checked copy takes the live name (the live database is kept renamed)."""
    if plan["live_exists"]:
        result = swap_into_place(
            server, plan["dbname"], plan["target"], plan["keep_live_as"], expected_live_oid=plan.get("live_oid")
        )
    else:
        with connect(server.with_dbname("postgres")) as conn:
            conn.execute(f"ALTER DATABASE {identifier(plan['target'])} RENAME TO {identifier(plan['dbname'])}")
            unmark(conn, plan["dbname"], TARGET_MARKER)
        result = {"steps": [f"{plan['target']} renamed to {plan['dbname']} (there was no live database)"]}
    for step in result["steps"]:
        log.info("swap: %s", step)
    return result


def plan_of_moment(
    plan: dict[str, Any], manifest, base_backup: str, recovery: dict, timings: dict, started: str, finished: str
) -> dict[str, Any]:
    """Return the restore plan of a point-in-time restore once its moment is dumped: restored like any backup."""
    return {
        **plan,
        "backup_id": manifest.backup_id,
        "recovery_point": manifest.recovery_point.isoformat(),
        "backup_status": f"dumped from the recovered moment (base backup {base_backup})",
        "size": manifest.size_summary(),
        "backup_size_bytes": manifest.size,
        "stored_size_bytes": manifest.stored_size,
        "pitr": {
            **plan["pitr"],
            "recovery": recovery,
            "timings": {k: round(v, 2) for k, v in timings.items()},
            "started_at": started,
            "finished_at": finished,
        },
    }


def restore_outcome(plan: dict[str, Any], phases: dict[str, dict | None]) -> tuple[str, str | None, float | None]:
    """Return ``(status, failed phase, achieved RTO)`` of a restore from what its phases returned.

    The achieved RTO runs from the first phase's start (a point-in-time restore's: its recovery's)
    to the end of the last phase the mode needs.
    """
    needed = [p for p in PHASES if p != "swap_into_place" or plan["mode"] == "replace"]
    failed_phase = next((p for p in needed if not phases.get(p)), None)
    status = "dry-run" if plan["dry_run"] else ("failed" if failed_phase else "restored")
    achieved = None
    if status == "restored":
        achieved = achieved_rto([phases[p] for p in needed], began_at=(plan.get("pitr") or {}).get("started_at"))
    return status, failed_phase if status == "failed" else None, achieved


def restore_report(
    plan: dict[str, Any], phases: dict[str, dict | None], run: dict[str, Any], final_state: dict[str, Any]
) -> dict[str, Any]:
    """Return the restore's report (stored as JSON, rendered by :func:`render_report`).

    :param run: ``triggered_by``, ``via``, ``run_id``, ``log_url``, ``written_at``.
    """
    status, failed_phase, achieved = restore_outcome(plan, phases)
    return {
        "status": status,
        "failed_phase": failed_phase,
        "triggered_by": run["triggered_by"],
        "via": run["via"],
        "run_id": run["run_id"],
        "log_url": run["log_url"],
        "plan": plan,
        "phase_seconds": phase_seconds(phases),
        "achieved_rto_seconds": achieved,
        "rto_target_seconds": plan["rto_target_seconds"],
        "rto_met": None if achieved is None else achieved <= plan["rto_target_seconds"],
        "validation": (phases["validate_data"] or {}).get("summary"),
        "validation_report": (phases["validate_data"] or {}).get("report"),
        "integrity": {
            k: (phases["check_integrity"] or {}).get(k) for k in ("tables_checked", "rows_checked", "amcheck_ok")
        },
        "privileges": phases["apply_privileges"],
        "roles_created": (phases["restore_backup"] or {}).get("roles_created", []),
        "tablespaces_left_out": (phases["restore_backup"] or {}).get("tablespaces_left_out", []),
        "extensions_created": (phases["restore_backup"] or {}).get("extensions_created", []),
        "swap_steps": (phases["swap_into_place"] or {}).get("steps", []),
        "final_state": final_state,
        "written_at": run["written_at"],
        "incident": incident_measures(plan, phases, status, run["written_at"]),
    }


def final_state(server: PgEndpoint, plan: dict[str, Any]) -> dict[str, Any]:
    """Return what the live database, the restored copy and the kept previous live database are now."""
    state = {"live": database_facts(server, plan["dbname"]), "restored": database_facts(server, plan["target"])}
    if plan["keep_live_as"]:
        state["previous_live"] = database_facts(server, plan["keep_live_as"])
    return state


def dump_moment(plan: dict[str, Any], res, run, label=lambda **_: None) -> dict[str, Any]:
    """Point-in-time restore: recover the server to the plan's moment in a scratch cluster (the live server is not
    touched), dump the database as it was then and restore that dump into the target straight from the worker's
    disk, while the same files are stored in the bucket as a regular backup (the evidence copy); return the plan of
    that dump, with the restore's result under ``restored_from_moment``.

    A retry after the dump was stored does not recover again: the later phases restore the stored dump from the
    bucket (the plan has no ``restored_from_moment``). A dry run never gets here.

    :param run: the task try (:class:`pgdr.resources.TaskRun`).
    """
    from pgdr.logical.backup import take_backup
    from pgdr.physical.catalog import BaseBackupCatalog
    from pgdr.postgres.client import check_restore_role

    pitr, started = plan["pitr"], datetime.now(UTC).isoformat()
    target = None if pitr["target"] == "latest" else datetime.fromisoformat(pitr["target"])
    db, server = res.plan.database(plan["database"]), res.plan.server(pitr["server"])
    db_store, db_layout = res.store(db.storage)
    db_catalog = BackupCatalog(db_store, db_layout, db.name)
    info = {**run.info(), "pitr_server": server.name, "pitr_target": pitr["target"], "recovery_started_at": started}
    stored = db_catalog.find_by_run(info.get("dag_id"), run.run_id)
    if stored is not None:  # an earlier try recovered and stored the moment: restore that (no second recovery)
        return _resumed_moment(plan, stored, label)
    target_server = res.database(db, conn_id=plan["target_conn_id"])
    restorer = res.restorer(db, target_server).with_dbname(plan["target"])
    check_restore_role(restorer, db.restore_as_superuser)  # before an hour of recovery, not after
    store, layout, archive = res.archive(server)
    catalog = BaseBackupCatalog(store, layout, server.name)
    entry = catalog.get(pitr["base_backup"])
    purpose = f"point-in-time restore of {db.name} to {pitr['target']}"
    cluster, prepared, result = run.recover(
        plan["database"], purpose, catalog, entry, store, archive, target, res.server(server).user
    )
    achieved = result.achieved_point or target or datetime.fromisoformat(pitr["end_of_archive"])
    what = f"The dump of {db.name} as of {achieved.isoformat()}"

    def restore_beside(dump: Path, row_counts: dict[str, int]) -> dict[str, Any]:
        check_tables_in(plan["tables"], row_counts, f"database {db.name} as of {achieved.isoformat()}")
        began = datetime.now(UTC).isoformat()
        restored = restore_dump_dir(plan, db, target_server, restorer, dump, what, run.run_id, restore_dir)
        return {"started_at": began, "download_seconds": 0.0, **restored, "finished_at": datetime.now(UTC).isoformat()}

    try:
        with run.workdir(f"pitr-dump-{db.name}") as workdir, run.workdir(f"pitr-restore-{db.name}") as restore_dir:
            dumped = take_backup(
                db,
                cluster.endpoint(db.dbname),
                db_store,
                db_layout,
                workdir,
                {**info, "base_backup": entry.backup_id},
                recovery_point=achieved,
                keys=res.encryption_keys(db),
                beside_upload=restore_beside,
            )
    except BaseException:
        _drop_quietly(target_server, plan["target"], run.run_id)  # perhaps restored, but not stored: not resumable
        raise
    finally:
        cluster.destroy()
    manifest = dumped.manifest
    label(database=db.name, backup_id=manifest.backup_id)
    log.info(
        "Server %s recovered to %s (achieved %s: the last transaction replayed); database %s dumped from it and "
        "restored into %s in %.1fs straight from this worker's disk, while stored as backup %s (the evidence copy).",
        server.name,
        pitr["target"],
        achieved.isoformat(),
        db.name,
        plan["target"],
        dumped.beside["restore_seconds"],
        manifest.backup_id,
    )
    finished = datetime.now(UTC).isoformat()
    moment = plan_of_moment(plan, manifest, entry.backup_id, result.to_dict(), prepared.timings, started, finished)
    return {**moment, "restored_from_moment": dumped.beside, "stored_while_restoring": _stored_phase(dumped)}


def _stored_phase(dumped) -> dict[str, Any]:
    """The evidence copy's storing, as a phase: its files were hashed (SHA-256) as they were written."""
    started, finished = dumped.phases["upload"]
    manifest = dumped.manifest
    return {
        "started_at": started,
        "finished_at": finished,
        "seconds": round(dumped.timings.get("upload", 0.0), 2),
        "bytes": manifest.stored_size,
        "files": len(manifest.files),
        "checked": "restored from the recovered cluster's dump on the worker, not from the bucket; the "
        f"{len(manifest.files)} files stored as backup {manifest.backup_id} were hashed (SHA-256) as they were "
        "written; once the restore succeeds, verify_evidence_copy triggers pgdr_verify_restore for that copy "
        f"(database {manifest.database}, backup_id {manifest.backup_id}; after a restore from the command line, "
        "trigger it yourself)",
    }


def _drop_quietly(server: PgEndpoint, name: str, run_id: str) -> None:
    """Drop this run's target after a failure, never hiding that failure behind another."""
    try:
        drop_own_target(server, name, run_id)
    except Exception as err:  # noqa: BLE001 - the first failure is the one to report
        log.warning("Could not drop this run's target %s after the failure (%s); drop it by hand.", name, err)


def _resumed_moment(plan: dict[str, Any], stored: BackupEntry, label) -> dict[str, Any]:
    """The plan of a moment an earlier try of this run already recovered and stored (see :func:`dump_moment`)."""
    manifest = stored.manifest
    started = (manifest.airflow or {}).get("recovery_started_at") or manifest.started_at.isoformat()
    label(database=manifest.database, backup_id=manifest.backup_id)
    check_tables_in_backup(plan["tables"], stored)
    log.info(
        "An earlier try of this run already recovered %s to %s and stored it as backup %s: restoring that, from the "
        "bucket (no second recovery).",
        manifest.database,
        manifest.recovery_point.isoformat(),
        manifest.backup_id,
    )
    recovery = {"achieved_recovery_point": manifest.recovery_point.isoformat(), "resumed_from": manifest.backup_id}
    base_backup = (manifest.airflow or {}).get("base_backup") or plan["pitr"]["base_backup"]
    return plan_of_moment(plan, manifest, base_backup, recovery, {}, started, datetime.now(UTC).isoformat())


def write_restore_report(objs: RestoreObjects, phases: dict[str, dict | None], run: dict[str, Any]) -> tuple[dict, str]:
    """Write the restore's report (JSON and markdown) next to the backup; return it and where the markdown is.

    A copy restored in new-database mode is released first (its run marker cleared): it is the user's now.
    """
    plan = objs.plan
    if restore_outcome(plan, phases)[0] == "restored" and plan["mode"] == "new-database":
        release_target(objs.server, plan["target"], run["run_id"])
    report = restore_report(plan, phases, run, final_state(objs.server, plan))
    md_key = objs.report_key(run["run_id"], ".md")
    objs.store.put_bytes(objs.report_key(run["run_id"], ".json"), json.dumps(report, indent=2, default=str).encode())
    objs.store.put_bytes(md_key, render_report(report).encode())
    log.info("Restore report: %s", objs.store.describe(md_key))
    if report["status"] in ("restored", "failed"):  # for the drill's MTTR trend, past the backup's retention
        record = incident_record(
            "database restore",
            plan["database"],
            run["run_id"],
            report["status"],
            report["incident"],
            plan["rto_target_seconds"],
        )
        store_incident_record(
            objs.store, objs.layout, {**record, "mode": plan["mode"], "report": objs.store.describe(md_key)}
        )
    return report, objs.store.describe(md_key)
