"""Reading a backup back: checksum verification, download, and ``pg_restore``.

A backup is only restored after every stored file has been proven to be the file that was
written: its SHA-256 must equal the manifest's. :func:`verify_checksums` streams every object
and hashes it without keeping it (so a corrupt backup is refused before any database is
touched); :func:`download_backup` hashes again as it writes each file to disk, so the bytes that
are restored are the bytes that were checked. The files are stored as pg_dump compressed them, and
``pg_restore`` reads them as they are (backups taken by pgdr 0.1, which compressed the files
itself with zstd, are decompressed on download).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgdr.errors import ChecksumMismatch, PermanentFailure, work_space_full
from pgdr.identifiers import printable
from pgdr.logical.catalog import BackupFile, BackupManifest
from pgdr.parallel import bounded_map
from pgdr.postgres.client import PgEndpoint, connect, connection_args, pg_tool, run_tool
from pgdr.storage.backends import BackupStore, sha256_stream

if TYPE_CHECKING:
    from pgdr.logical.privileges import BackupNeeds, DumpExtension, DumpToc

log = logging.getLogger(__name__)


class RestoreFailed(PermanentFailure):
    """``pg_restore`` could not restore the backup into the target database."""


@dataclass(frozen=True)
class FileProblem:
    """What is wrong with one stored file of a backup."""

    name: str
    key: str
    problem: str


class _Opener:
    """Decrypt (and so authenticate) one encrypted file's stored bytes on their way to ``out``.

    After the first chunk that fails authentication it only notes the failure, so the stream is
    still hashed to its end: plain corruption is then reported as the checksum mismatch it is.
    """

    def __init__(self, manifest: BackupManifest, entry: BackupFile, data_key: bytes, where: str, out=None):
        from pgdr.storage.encryption import ChunkDecryptor, file_context

        self.decryptor = ChunkDecryptor(
            data_key, file_context(manifest.database, manifest.backup_id, entry.name), where, out
        )
        self.failure: Exception | None = None

    def write(self, data: bytes) -> None:
        if self.failure is None:
            try:
                self.decryptor.write(data)
            except ChecksumMismatch as err:  # TamperDetected
                self.failure = err

    def finish(self) -> str | None:
        if self.failure is None:
            try:
                self.decryptor.finish()
            except ChecksumMismatch as err:
                self.failure = err
        return str(self.failure) if self.failure else None


def _check_one(store: BackupStore, entry: BackupFile, sink=None, opener: _Opener | None = None) -> FileProblem | None:
    """Stream one stored file through SHA-256 (and ``sink``, or the decrypting ``opener``); describe any problem."""
    try:
        with store.open_read(entry.key) as stream:
            size, sha256 = sha256_stream(stream, opener.write if opener else sink)
    except FileNotFoundError:
        return FileProblem(entry.name, entry.key, "missing: the object does not exist")
    if size != entry.stored_size:
        kind = "truncated" if size < entry.stored_size else "longer than written"
        return FileProblem(entry.name, entry.key, f"{kind}: {size} bytes stored, the manifest says {entry.stored_size}")
    if sha256 != entry.sha256:
        return FileProblem(
            entry.name,
            entry.key,
            f"content changed: SHA-256 {sha256[:16]}..., the manifest says {entry.sha256[:16]}...",
        )
    if opener is not None:
        failure = opener.finish()
        if failure:
            return FileProblem(
                entry.name,
                entry.key,
                "changed after encryption: its checksum matches, but it fails AES-GCM authentication, so the "
                "manifest's checksum was forged to match it",
            )
        if opener.decryptor.plain_bytes != entry.size:
            return FileProblem(
                entry.name,
                entry.key,
                f"decrypts to {opener.decryptor.plain_bytes} bytes, the manifest says {entry.size}",
            )
    return None


def _refuse(manifest: BackupManifest, store: BackupStore, problems: list[FileProblem]) -> ChecksumMismatch:
    listed = "; ".join(f"{p.name} ({store.describe(p.key)}): {p.problem}" for p in problems[:5])
    more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
    error = ChecksumMismatch(
        f"Backup {manifest.backup_id} of database {manifest.database!r} is corrupt and was refused: {len(problems)} "
        f"of {len(manifest.files)} files fail verification: {listed}{more}. Retrying cannot fix this. Restore "
        "another backup (the previous verified one), and find out what changed the storage."
    )
    error.problems = problems  # type: ignore[attr-defined] - for the drill's negative control
    return error


def _needs_key(manifest: BackupManifest, data_key: bytes | None) -> None:
    if manifest.encryption is not None and data_key is None:
        from pgdr.storage.encryption import KeyUnavailable

        raise KeyUnavailable(
            f"Backup {manifest.backup_id} of database {manifest.database!r} is encrypted with master key id "
            f"{manifest.encryption.key_id!r} (connection {manifest.encryption.key_conn_id!r}), and no key was given."
        )


def verify_checksums(
    manifest: BackupManifest, store: BackupStore, workers: int = 4, data_key: bytes | None = None
) -> dict[str, float]:
    """Stream every file of ``manifest`` and compare its SHA-256; refuse the backup on any problem.

    An encrypted backup's files are also decrypted (without keeping a byte) with ``data_key``
    (:func:`pgdr.airflow_glue.connections.backup_data_key`): every chunk is authenticated.

    :raises ChecksumMismatch: naming the backup and every bad file.
    :return: ``{"seconds": ..., "bytes": ...}``.
    """
    _needs_key(manifest, data_key)
    started = time.monotonic()

    def check(entry: BackupFile) -> FileProblem | None:
        if data_key is None:
            return _check_one(store, entry)
        return _check_one(store, entry, opener=_Opener(manifest, entry, data_key, store.describe(entry.key)))

    problems = [p for p in bounded_map(check, manifest.files, workers, "pgdr-sha") if p]
    if problems:
        raise _refuse(manifest, store, problems)
    return {"seconds": time.monotonic() - started, "bytes": manifest.stored_size}


def download_backup(
    manifest: BackupManifest, store: BackupStore, dest: Path, workers: int = 4, data_key: bytes | None = None
) -> dict[str, float]:
    """Download and verify every file of ``manifest`` into ``dest``, a dump directory for pg_restore.

    An encrypted backup is decrypted as it streams in, chunk by authenticated chunk, with ``data_key``.

    :raises ChecksumMismatch: if any file fails verification; ``dest`` is then incomplete.
    """
    _needs_key(manifest, data_key)
    dest.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    unpack = _zstd_unpacker if manifest.compressed_by == "pgdr" else None

    def one(entry: BackupFile) -> FileProblem | None:
        target = dest / entry.name  # a plain file name: the catalog refuses any other
        try:
            with open(target, "wb") as out:
                if data_key is not None:
                    return _check_one(
                        store, entry, opener=_Opener(manifest, entry, data_key, store.describe(entry.key), out.write)
                    )
                if unpack is None:
                    return _check_one(store, entry, sink=out.write)
                return unpack(store, entry, out)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise work_space_full(
                    f"Downloading backup {manifest.backup_id}",
                    str(dest),
                    f"{manifest.stored_size / 1e6:.1f} MB to download",
                ) from None
            raise

    problems = [p for p in bounded_map(one, manifest.files, workers, "pgdr-download") if p]
    if problems:
        raise _refuse(manifest, store, problems)
    return {"seconds": time.monotonic() - started, "bytes": manifest.stored_size}


class _TooLarge(Exception):
    """Decompressed output passed the size its manifest promised."""


class _BoundedWriter:
    """A file writer that refuses to grow past ``limit`` bytes (a zip bomb stops at the limit)."""

    def __init__(self, out, limit: int):
        self.out, self.limit, self.written = out, limit, 0

    def write(self, data) -> int:
        self.written += len(data)
        if self.written > self.limit:
            raise _TooLarge
        return self.out.write(data)


def _zstd_unpacker(store: BackupStore, entry: BackupFile, out) -> FileProblem | None:
    """Verify and decompress one file of a pgdr 0.1 backup (pg_dump -Z0, then zstd by pgdr).

    The output is counted as it is written and cut at the manifest's size: a small stored file
    that would decompress to far more is refused at that size, not after filling the disk.
    """
    import zstandard

    bounded = _BoundedWriter(out, entry.size)
    writer = zstandard.ZstdDecompressor().stream_writer(bounded, closefd=False, write_return_read=True)
    try:
        problem = _check_one(store, entry, sink=writer.write)
        writer.flush()
    except zstandard.ZstdError as err:
        return FileProblem(entry.name, entry.key, f"not valid zstd data ({err})")
    except _TooLarge:
        return FileProblem(entry.name, entry.key, f"decompresses to more than the {entry.size} bytes the manifest says")
    if problem is None and bounded.written != entry.size:
        problem = FileProblem(entry.name, entry.key, f"decompressed to {bounded.written} bytes, expected {entry.size}")
    return problem


def restore_command(target: PgEndpoint, dump_dir: Path, jobs: int, extra: list[str] | None = None) -> list[str]:
    """Return the ``pg_restore`` command that restores ``dump_dir`` into ``target.dbname``.

    Owners and privileges are not restored here (``--no-owner --no-acl``): the data is restored
    and checked as the restore role, and :mod:`pgdr.logical.privileges` gives them back after the checks. ``extra``
    adds options such as ``--section``; a
    table-level restore selects its tables with a list (:func:`pgdr.incident.restore_tables`).
    """
    args = [
        pg_tool("pg_restore"),
        *connection_args(target),
        f"--jobs={max(1, jobs)}",
        "--no-owner",
        "--no-acl",
        "--exit-on-error",
        "--no-password",
    ]
    return [*args, *(extra or []), str(dump_dir)]


def unusable_tablespaces(target: PgEndpoint, named: set[str]) -> list[str]:
    """Return the tablespaces of ``named`` that ``target``'s role cannot create objects in (absent from the server,
    or no ``CREATE`` on them), sorted; the target database's own default tablespace is always usable."""
    if not named:
        return []
    with connect(target) as conn:
        usable = conn.execute(
            "SELECT spcname FROM pg_tablespace WHERE spcname = ANY(%s) AND (has_tablespace_privilege(oid, 'CREATE') "
            "OR oid = (SELECT dattablespace FROM pg_database WHERE datname = current_database()))",
            (sorted(named),),
        ).fetchall()
    return sorted(named - {row[0] for row in usable})


def tablespaces_to_leave_out(target: PgEndpoint, named: set[str], what: str) -> list[str]:
    """Decide where ``what`` (a dump whose objects were in the tablespaces ``named``) is restored in ``target``:
    return ``[]`` when its role can create in all of them (each object goes where it was); otherwise the ones it
    cannot, said in a warning, and every object goes to the target database's default tablespace
    (:func:`tablespace_options`): a restore must not fail for where its files are kept."""
    left_out = unusable_tablespaces(target, named)
    if not left_out:
        return []
    log.warning(
        "%s had tables or indexes in tablespace(s) %s, which the target (%s) lacks or may not create in: every object "
        "is restored into the database's default tablespace instead. To keep them where they were, create the "
        "tablespace(s) on that server and GRANT CREATE ON TABLESPACE … TO %s before restoring; or move them "
        "afterwards with ALTER TABLE … SET TABLESPACE.",
        what,
        ", ".join(repr(printable(name)) for name in left_out),
        target.describe(),
        printable(target.user),
    )
    return left_out


def tablespace_options(left_out: list[str]) -> list[str]:
    """Return the ``pg_restore`` options for the choice of :func:`tablespaces_to_leave_out`."""
    return ["--no-tablespaces"] if left_out else []


# Of a dump's extensions installed on the target server: whether only a superuser may create each (not trusted),
# and the extensions each requires.
_EXTENSION_FACTS = (
    "SELECT a.name, v.superuser AND NOT v.trusted, coalesce(v.requires::text[], '{}') FROM "
    "pg_catalog.pg_available_extensions a JOIN pg_catalog.pg_available_extension_versions v ON v.name = a.name AND "
    "v.version = a.default_version WHERE a.name = ANY(%s)"
)


# Where a schema object may be created by a role: after the dump's CREATE SCHEMA statements, none may hold one of
# its own (oid >= 16384, FirstNormalObjectId) before an extension's install script runs as a superuser.
_OBJECT_CATALOGS = (
    "pg_class",
    "pg_proc",
    "pg_type",
    "pg_operator",
    "pg_collation",
    "pg_conversion",
    "pg_opclass",
    "pg_opfamily",
    "pg_cast",
    "pg_extension",
    "pg_language",
    "pg_transform",
    "pg_ts_config",
    "pg_ts_dict",
    "pg_ts_parser",
    "pg_ts_template",
    "pg_foreign_data_wrapper",
    "pg_foreign_server",
    "pg_statistic_ext",
)


def _objects_beside_schemas(conn) -> list[str]:
    """Return the catalogs that hold an object made in the database (not at initdb), for a database made from
    ``template0`` that should hold nothing yet but schemas."""
    from psycopg import sql

    return [
        catalog
        for catalog in _OBJECT_CATALOGS
        if conn.execute(
            sql.SQL("SELECT EXISTS (SELECT 1 FROM pg_catalog.{} WHERE oid >= 16384)").format(sql.Identifier(catalog))
        ).fetchone()[0]
    ]


@dataclass(frozen=True)
class ExtensionsCreated:
    """What :func:`create_untrusted_extensions` did before the restore role's ``pg_restore``."""

    names: tuple[str, ...] = ()  # the extensions the server's connection created, in the order it did
    entries: frozenset[str] = frozenset()  # the table-of-contents lines done (those, and the dump's schemas)


def create_untrusted_extensions(
    admin: PgEndpoint | None,
    target: PgEndpoint,
    toc: DumpToc,
    workdir: Path,
    extensions: list[DumpExtension],
) -> ExtensionsCreated:
    """Create, as ``admin`` (the server's own connection), the extensions of the dump that the restore role may not
    create (``pg_stat_statements``, ``postgres_fdw``…: not trusted), and those they require (``cube`` for
    ``earthdistance``), before the restore role restores the rest (leaving out the entries this made).

    Only the extension itself runs as ``admin``, never anything the dump says: its name, schema and comment are
    read from the dump and passed as quoted identifiers and a literal. It is created in a database that holds
    nothing yet but the dump's empty schemas (created first, as the restore role, and checked to be all there is), so
    no restored object can be looked up by its install script. Nothing is done when the restore role may create
    them itself, when ``admin`` is not a superuser (the restore then fails saying what to do), or when the server
    lacks the extension.

    :param extensions: the dump's extensions (``BackupNeeds.extensions_in_dump``).
    """
    from psycopg import sql

    from pgdr.logical.privileges import schema_entries

    if admin is None or admin.user == target.user:
        return ExtensionsCreated()
    extensions = [e for e in extensions if e.entries]
    if not extensions:
        return ExtensionsCreated()
    with connect(admin.with_dbname(target.dbname), application_name="pgdr-extensions") as conn:
        conn.execute("SET search_path = pg_catalog, pg_temp")
        superuser = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
        restorer = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (target.user,)).fetchone()
        facts = conn.execute(_EXTENSION_FACTS, ([e.name for e in extensions],)).fetchall()
        requires = {name: required for name, _, required in facts}
        todo, wanted = [name for name, untrusted, _ in facts if untrusted], set()
        while todo:  # and what they require, created before them in the dump's order
            name = todo.pop()
            if name not in wanted:
                wanted.add(name)
                todo += requires.get(name, [])
        extensions = [e for e in extensions if e.name in wanted]
        if not extensions or not superuser or (restorer and restorer[0]):
            return ExtensionsCreated()
        schemas = schema_entries(toc)
        if schemas:  # the restore role makes the dump's schemas (empty), as it would have
            listing = workdir / "schemas.list"
            listing.write_text("".join(f"{line}\n" for line in schemas))
            run_tool(
                target,
                workdir,
                restore_command(target, toc.dump_dir, 1, extra=[f"--use-list={listing}"]),
                f"pg_restore (schemas) into database {printable(target.dbname)!r}",
                RestoreFailed,
            )
        found = _objects_beside_schemas(conn)
        if found:  # a CREATE SCHEMA entry that did more: toc.dat is not what pg_dump wrote
            raise RestoreFailed(
                f"The schema statements of the backup created more than schemas in database "
                f"{printable(target.dbname)!r} (objects in {', '.join(found)}): pgdr will not create the extension(s) "
                f"{', '.join(printable(e.name) for e in extensions)} as a superuser next to them. The backup's table "
                "of contents is not what pg_dump writes: treat it as tampered with and restore another backup."
            )
        for extension in extensions:
            name, schema = sql.Identifier(extension.name), sql.Identifier(extension.schema)
            try:
                conn.execute(sql.SQL("CREATE EXTENSION {} WITH SCHEMA {}").format(name, schema))
                if extension.comment is not None:
                    conn.execute(sql.SQL("COMMENT ON EXTENSION {} IS {}").format(name, sql.Literal(extension.comment)))
            except Exception as err:
                raise RestoreFailed(
                    f"Creating the extension {printable(extension.name)!r} in schema {printable(extension.schema)!r} "
                    f"of database {printable(target.dbname)!r}, as the server's connection ({admin.user!r}), "
                    f"failed: {target.scrub(str(err).strip())}. Install what it needs on that server, then restore "
                    "again. Nothing else was restored."
                ) from err
    log.info(
        "Created extension(s) %s as the server's connection (%s): the restore role %r may not create them (not "
        "trusted, or required by one that is not); everything else is restored as that role.",
        ", ".join(repr(printable(e.name)) for e in extensions),
        admin.user,
        target.user,
    )
    return ExtensionsCreated(
        tuple(e.name for e in extensions), frozenset([*schemas, *(line for e in extensions for line in e.entries)])
    )


@dataclass(frozen=True)
class TargetPrepared:
    """What :func:`prepare_target` chose and did before the restore role's ``pg_restore``."""

    tablespaces_left_out: list[str]  # their tables and indexes go into the database's default tablespace
    extensions: ExtensionsCreated


def prepare_target(
    admin: PgEndpoint | None, target: PgEndpoint, toc: DumpToc, needs: BackupNeeds, workdir: Path, what: str
) -> TargetPrepared:
    """Make an empty target database ready for the restore role's ``pg_restore``: leave out the tablespaces the
    target server lacks (:func:`tablespaces_to_leave_out`), then create, as ``admin``, the extensions the restore role
    may not create (:func:`create_untrusted_extensions`). Every restore does both, in this order.

    :param what: the dump in messages ("Backup 2026...", "The dump in ...").
    """
    left_out = tablespaces_to_leave_out(target, needs.tablespaces, what)
    return TargetPrepared(left_out, create_untrusted_extensions(admin, target, toc, workdir, needs.extensions_in_dump))


def restore_dump(
    target: PgEndpoint,
    dump_dir: Path,
    jobs: int,
    workdir: Path,
    left_out: list[str] | None = None,
    toc: DumpToc | None = None,
    done: Collection[str] = (),
) -> float:
    """Run ``pg_restore`` into ``target``; return the seconds it took.

    Objects only a superuser can create (event triggers, publications) and subscriptions are left
    out: :func:`pgdr.logical.privileges.apply_privileges` creates the former after the checks.

    :param left_out: the caller's :func:`tablespaces_to_leave_out` of the dump; ``None``: decided here.
    :param toc: the dump's table of contents, when the caller read it already.
    :param done: table-of-contents lines already restored (:attr:`ExtensionsCreated.entries`), left out.
    """
    from pgdr.logical.privileges import data_restore_list, named_tablespaces, read_toc

    started = time.monotonic()
    toc = toc or read_toc(dump_dir)
    if left_out is None:
        left_out = tablespaces_to_leave_out(target, named_tablespaces(toc, workdir), f"The dump in {dump_dir}")
    where = tablespace_options(left_out)
    listing = workdir / "restore.list"
    listing.write_text("".join(f"{line}\n" for line in data_restore_list(toc).splitlines() if line not in done))
    run_tool(
        target,
        workdir,
        restore_command(target, dump_dir, jobs, extra=[f"--use-list={listing}", *where]),
        f"pg_restore into database {printable(target.dbname)!r}",
        RestoreFailed,
    )
    return time.monotonic() - started


def fetch_toc(manifest: BackupManifest, store: BackupStore, dest: Path, data_key: bytes | None = None) -> Path:
    """Download and verify only the backup's table of contents (``toc.dat``) into ``dest``; return ``dest``.

    Enough for ``pg_restore --list`` and for every statement that is not data: the owners, grants
    and settings a restore gives back, and what the restore needs of its target.
    """
    import dataclasses

    entry = next((f for f in manifest.files if f.name == "toc.dat"), None)
    if entry is None:
        raise RestoreFailed(
            f"Backup {manifest.backup_id} of database {manifest.database!r} has no toc.dat in its manifest: it is "
            "not a directory-format dump pgdr can restore. Restore another backup."
        )
    download_backup(dataclasses.replace(manifest, files=(entry,)), store, dest, workers=1, data_key=data_key)
    return dest


def give_back_privileges(
    manifest: BackupManifest,
    store: BackupStore,
    admin: PgEndpoint,
    workdir: Path,
    data_key: bytes | None = None,
    scratch: bool = False,
    skip: tuple[str, ...] = (),
):
    """The privileges phase of a restore from ``store``: fetch the backup's table of contents and apply
    its owners, grants and settings to the restored copy ``admin.dbname`` as ``admin`` (the server's connection).

    :param scratch: a scratch database keeps pgdr's marker as its comment.
    :param skip: the plan's ``skip_objects`` of the database.
    :return: the :class:`pgdr.logical.privileges.PrivilegesReport`.
    """
    from pgdr.logical.privileges import apply_privileges, read_toc

    fetch_toc(manifest, store, workdir / "toc", data_key)
    return apply_privileges(admin, read_toc(workdir / "toc"), workdir, database_comment=not scratch, skip=skip)


@dataclass(frozen=True)
class ScratchRestore:
    """What :func:`restore_into_scratch` did, as a verification record keeps it in its ``restore_backup`` phase."""

    seconds: float
    roles_created: list[str]  # for the scratch database, as on the source without passwords (dropped with it)
    tablespaces_left_out: list[str]  # their tables and indexes restored into the database's default tablespace
    extensions_created: list[str]  # by the server's connection: the restore role may not create them

    def objects(self) -> dict[str, list[str]]:
        """What the restore made or left out beside the dump's own objects (roles, tablespaces, extensions)."""
        return {
            "roles_created": self.roles_created,
            "tablespaces_left_out": self.tablespaces_left_out,
            "extensions_created": self.extensions_created,
        }

    def details(self) -> dict[str, Any]:
        return {"restore_seconds": self.seconds, **self.objects()}


def restore_into_scratch(
    scratch, dump_dir: Path, jobs: int, workdir: Path, comment: str, roles_marker: str, what: str | None = None
) -> ScratchRestore:
    """Restore a downloaded dump into a scratch database as an incident restore would.

    The scratch database is made again (empty, a failed try's half restore gone) with the backup's
    encoding and locale, marked with ``comment``; the roles the backup names that the server lacks
    are created first (as on the source server, without passwords; marked with ``roles_marker``:
    :func:`drop_scratch` drops them again when nothing uses them).

    :param what: the dump in messages ("The backup restored for verify shop backup …").
    """
    from pgdr.logical.privileges import backup_needs, create_roles, globals_of, missing_roles, read_toc

    toc = read_toc(dump_dir)
    needs = backup_needs(toc, workdir)
    created = create_roles(scratch.server, missing_roles(needs, scratch.server), roles_marker, globals_of(dump_dir))
    scratch.create(comment, needs.database_options)
    started = time.monotonic()
    ready = prepare_target(scratch.server, scratch.endpoint, toc, needs, workdir, what or f"The dump in {dump_dir}")
    restore_dump(scratch.endpoint, dump_dir, jobs, workdir, ready.tablespaces_left_out, toc, ready.extensions.entries)
    return ScratchRestore(time.monotonic() - started, created, ready.tablespaces_left_out, list(ready.extensions.names))


def drop_scratch(scratch, roles_marker: str) -> bool:
    """Drop a scratch database, then the roles created for it that nothing else uses; say whether it existed."""
    from pgdr.logical.privileges import drop_created_roles

    dropped = scratch.drop()
    gone = drop_created_roles(scratch.server, roles_marker)
    if gone:
        log.info("Roles created for %s and dropped again: %s.", roles_marker, ", ".join(map(printable, gone)))
    return dropped
