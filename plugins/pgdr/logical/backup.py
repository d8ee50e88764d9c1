"""Taking one backup: snapshot, dump, checksum, upload, manifest last.

The steps, for one database:

1. export a snapshot and record its time (the recovery point);
2. run ``pg_dump --snapshot`` into a private work directory (never waiting long for a lock, never
   holding up others for long: :mod:`pgdr.logical.lockwatch`); pg_dump compresses each file itself,
   in its parallel workers (the plan's ``compression``, ``gzip:1`` by default); then read sequences,
   large objects, the size and the catalog in the same snapshot, close it, and count every table's
   rows exactly from the dump's own files (:mod:`pgdr.logical.dumpcount`: the source is read once);
3. hash each dump file (SHA-256) as it is read for upload, several files at a time; with
   client-side encryption (the plan's ``encryption``), each file is first encrypted with the
   backup's own data key (:mod:`pgdr.storage.encryption`) and the hash is of the stored bytes;
4. write the manifest. Until this last write the backup does not exist for any reader; if any
   earlier step fails, the objects already uploaded are removed (or, if storage is down, left
   for retention to remove as a partial upload).

The function is idempotent per Airflow run: if a run already completed a backup (a retry after
the manifest was written), that backup is returned instead of taking a second one.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pgdr.errors import DumpFailed, PermanentFailure, PgdrError
from pgdr.identifiers import printable, quote_ident
from pgdr.logical.catalog import BackupCatalog, BackupFile, BackupManifest
from pgdr.logical.dumpcount import count_table_data, readable_table_data
from pgdr.logical.lockwatch import BlockingWatcher
from pgdr.logical.standby import primary_mark, replay_position
from pgdr.messages import first_line, format_duration
from pgdr.plan import ProtectedDatabase
from pgdr.postgres.client import (
    PgEndpoint,
    RowCensus,
    dump_command,
    exclusive_lockers,
    exported_snapshot,
    passfile_env,
    row_census,
    sequence_values,
    tool_error,
    tool_version,
)
from pgdr.storage.backends import BackupStore, sha256_stream
from pgdr.storage.layout import BackupLayout, new_backup_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackupResult:
    """What one backup produced, with the time each phase took (seconds)."""

    manifest: BackupManifest
    manifest_key: str
    location: str
    reused: bool
    timings: dict[str, float]
    phases: dict[str, tuple[str, str]] = None  # phase -> (started_at, finished_at), ISO UTC
    beside: Any = None  # what take_backup's ``beside_upload`` returned


def upload_dump(
    dump_dir: Path,
    store: BackupStore,
    layout: BackupLayout,
    database: str,
    backup_id: str,
    workers: int,
    data_key: bytes | None = None,
    keep_files: bool = False,
) -> tuple[list[BackupFile], list[str]]:
    """Hash and upload every file of a dump directory, ``workers`` at a time: as it is, or
    encrypted with ``data_key`` (each file sealed into a sibling folder, uploaded, then removed).
    Each file is removed once stored, unless ``keep_files`` (something else reads the dump too).

    :return: the files as stored, and every key written (for clean-up on failure).
    """
    from pgdr.storage.encryption import encrypt_file, file_context

    uploaded: list[str] = []
    sealed_dir = dump_dir.parent / "sealed"
    if data_key is not None:
        sealed_dir.mkdir(exist_ok=True)

    def one(path: Path) -> BackupFile:
        key = layout.data_key(database, backup_id, path.name)
        if data_key is None:
            with open(path, "rb") as source:  # pg_dump just wrote it: read from the page cache, ~1.6 GB/s
                size, sha256 = sha256_stream(source)
            stored_size, upload = size, path
        else:
            upload = sealed_dir / path.name
            stored_size, sha256, size = encrypt_file(
                path, upload, data_key, file_context(database, backup_id, path.name)
            )
        try:
            store.put_file(key, upload)
        finally:
            if upload is not path:
                upload.unlink(missing_ok=True)
        uploaded.append(key)
        if not keep_files:
            path.unlink()  # free the work directory as the upload goes
        return BackupFile(name=path.name, key=key, size=size, stored_size=stored_size, sha256=sha256)

    files = sorted((p for p in dump_dir.iterdir() if p.is_file()), key=lambda p: p.stat().st_size, reverse=True)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="pgdr-upload") as pool:
        futures = [pool.submit(one, f) for f in files]
        results, first_error = [], None
        for future in futures:
            try:
                results.append(future.result())
            except Exception as err:  # noqa: BLE001 - re-raised below, after the others finish
                first_error = first_error or err
    if first_error is not None:
        first_error.uploaded_keys = uploaded  # type: ignore[attr-defined]
        raise first_error
    return sorted(results, key=lambda f: f.name), uploaded


GLOBALS_FILE = "globals.sql"  # the source server's roles, beside pg_dump's files (which pg_restore ignores)


def dump_globals(endpoint: PgEndpoint, out: Path, workdir: Path) -> bool:
    """Write ``pg_dumpall --globals-only`` of ``endpoint``'s server to ``out`` (roles, their attributes,
    memberships and settings, tablespaces); say whether it did.

    A dump names roles but does not create them: with this file a restore onto a server that lacks
    them can create them as they were (:func:`pgdr.logical.privileges.role_definitions`). It holds
    password hashes when the connection may read them (a superuser); otherwise it is taken again with
    ``--no-role-passwords``. A server that refuses both (a managed service) gets a backup without it,
    and a warning: restores then create missing roles bare.
    """
    from pgdr.postgres.client import endpoint_conninfo, pg_tool

    for extra in ([], ["--no-role-passwords"]):
        with passfile_env(endpoint, workdir) as env:
            result = subprocess.run(
                [
                    pg_tool("pg_dumpall"),
                    "--globals-only",
                    "--no-password",
                    f"--file={out}",
                    *extra,
                    f"--dbname={endpoint_conninfo(endpoint, 'postgres')}",
                ],
                env=env,
                capture_output=True,
                text=True,
            )
        if result.returncode == 0:
            if extra:
                log.info("Roles stored without password hashes (the connection may not read them).")
            return True
        out.unlink(missing_ok=True)
        error = endpoint.scrub(result.stderr.strip())[-300:]
    log.warning(
        "pg_dumpall --globals-only failed (%s); this backup holds no role definitions: a restore onto a server "
        "without the roles creates them bare (NOLOGIN).",
        error,
    )
    return False


def take_backup(
    db: ProtectedDatabase,
    endpoint: PgEndpoint,
    store: BackupStore,
    layout: BackupLayout,
    workdir: Path,
    airflow_info: dict | None = None,
    recovery_point: datetime | None = None,
    keys=None,
    beside_upload: Callable[[Path, dict[str, int]], Any] | None = None,
    on_blocking: Callable[[str], None] | None = None,
    primary: PgEndpoint | None = None,
) -> BackupResult:
    """Back up ``db`` into ``store``; see the module docstring for the steps.

    :param workdir: a private, empty directory for the dump; the caller removes it.
    :param airflow_info: ``dag_id``, ``run_id``, ``try_number`` and ``logical_date`` of the run.
    :param recovery_point: for a dump of a cluster recovered to a moment (point-in-time restore),
        that moment; by default the time of the dump's snapshot.
    :param keys: the master keys (:class:`pgdr.storage.encryption.MasterKeys`) of a database the
        plan encrypts; its current key wraps this backup's fresh data key.
    :param beside_upload: called with the dump directory and the exact row counts once the dump is
        complete, in a thread, while the files are hashed and uploaded (a point-in-time restore
        restores the dump from there, without downloading it again). The files stay in the
        directory until both are done. Its return value is the result's ``beside``; if it raises,
        the backup is still stored (manifest last) and its error is raised after.
    :param primary: when ``endpoint`` is a hot standby (:mod:`pgdr.logical.standby`), the primary: the recovery
        point is then the primary's time the standby had replayed up to, not the standby's clock.
    :param on_blocking: called once (on another thread) with a warning when the dump holds up another session for
        longer than the plan's ``lock_wait_timeout`` (:mod:`pgdr.logical.lockwatch`); with ``yield_after`` in the
        plan the dump gives way instead, failing with :class:`~pgdr.logical.lockwatch.DumpYielded`.
    """
    if db.encryption_key_conn_id and keys is None:
        raise ValueError(f"database {db.name!r} is encrypted in the plan, but no master keys were given")
    airflow_info = airflow_info or {}
    catalog = BackupCatalog(store, layout, db.name)
    run_id = airflow_info.get("run_id")
    if run_id:
        done = catalog.find_by_run(airflow_info.get("dag_id"), run_id)
        if done is not None:
            log.info("Run %s already completed backup %s of %s; not taking another.", run_id, done.backup_id, db.name)
            key = layout.manifest_key(db.name, done.backup_id)
            return BackupResult(
                done.manifest, key, store.describe(layout.backup_prefix(db.name, done.backup_id)), True, {}, {}
            )

    timings: dict[str, float] = {}
    started_at = datetime.now(UTC)
    dump_dir = workdir / "dump"
    client_version = tool_version("pg_dump")

    phases: dict[str, tuple[str, str]] = {}
    t0 = time.monotonic()
    dump_started = _utc_now()
    if primary is not None:  # a standby: read how far it has replayed before the snapshot (which holds at least that)
        mark = primary_mark(primary)
        recovery_point = recovery_point or replay_position(endpoint, mark).recovery_point(mark)
    with exported_snapshot(endpoint) as snap, passfile_env(endpoint, workdir) as env:
        log.info(
            "Snapshot %s exported from %s at %s (the recovery point); dumping with %d jobs.",
            snap.snapshot_id,
            endpoint.describe(),
            (recovery_point or snap.recovery_point).isoformat(),
            db.dump_jobs,
        )
        census, files, sequences, database_bytes, census_s = _dump_and_census(
            db, endpoint, snap, env, dump_dir, on_blocking
        )
        recovery_point, server_version = recovery_point or snap.recovery_point, snap.server_version
    # The snapshot is closed: the rest of the counts come from the dump's files, on the worker.
    counted_at = time.monotonic()
    row_counts, large_objects = _counts_from_files(db, census, files), census.large_objects
    timings["count_rows"] = census_s + time.monotonic() - counted_at
    timings["dump"] = time.monotonic() - t0
    phases["dump"] = (dump_started, _utc_now())
    log.info("pg_dump finished in %.1fs; %d tables counted.", timings["dump"], len(row_counts))
    dump_globals(endpoint, dump_dir / GLOBALS_FILE, workdir)  # stored, hashed and encrypted like every file of the dump

    backup_id = new_backup_id(recovery_point)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgdr-beside-upload") as beside_pool:
        beside = beside_pool.submit(beside_upload, dump_dir, row_counts) if beside_upload else None
        stored = _store_dump(
            db,
            endpoint,
            store,
            layout,
            dump_dir,
            backup_id,
            keys,
            timings,
            phases,
            keep_files=beside is not None,
            manifest_fields={
                "started_at": started_at,
                "recovery_point": recovery_point,
                "server_version": server_version,
                "client_version": client_version,
                "database_bytes": database_bytes,
                "row_counts": row_counts,
                "large_objects": large_objects,
                "sequences": sequences,
                "airflow": {k: v for k, v in airflow_info.items() if v is not None},
            },
        )
    # Leaving the pool waited for beside_upload; its error (if any) is raised now, the backup being stored.
    return replace(stored, beside=beside.result() if beside else None)


def _store_dump(
    db: ProtectedDatabase,
    endpoint: PgEndpoint,
    store: BackupStore,
    layout: BackupLayout,
    dump_dir: Path,
    backup_id: str,
    keys,
    timings: dict[str, float],
    phases: dict[str, tuple[str, str]],
    keep_files: bool,
    manifest_fields: dict[str, Any],
) -> BackupResult:
    """Hash, (encrypt,) upload every file of the dump, then write the manifest, last."""
    catalog = BackupCatalog(store, layout, db.name)
    data_key = os.urandom(32) if keys is not None else None  # fresh for every backup, never stored in the clear
    upload_started = _utc_now()
    t1 = time.monotonic()
    try:
        files, uploaded = upload_dump(
            dump_dir,
            store,
            layout,
            db.name,
            backup_id,
            workers=max(2, db.dump_jobs),
            data_key=data_key,
            keep_files=keep_files,
        )
    except Exception as err:
        _remove_partial(store, getattr(err, "uploaded_keys", []), backup_id)
        raise
    timings["upload"] = time.monotonic() - t1

    manifest = BackupManifest(
        backup_id=backup_id,
        database=db.name,
        dbname=endpoint.dbname,
        finished_at=datetime.now(UTC),
        format="directory",
        compression=db.compression,
        compression_level=None,
        compressed_by="pg_dump",
        dump_jobs=db.dump_jobs,
        files=tuple(files),
        storage=store.describe(layout.backup_prefix(db.name, backup_id)),
        **manifest_fields,
    )
    if data_key is not None:
        manifest = seal_manifest(manifest, keys, data_key, db.encryption_key_conn_id)
        log.info(
            "Backup %s is encrypted (AES-256-GCM) with a fresh data key wrapped by master key %r.",
            backup_id,
            keys.current,
        )
    t2 = time.monotonic()
    try:
        manifest_key = catalog.write_manifest(manifest)
    except Exception:
        _remove_partial(store, uploaded, backup_id)
        raise
    timings["manifest"] = time.monotonic() - t2
    phases["upload"] = (upload_started, _utc_now())
    return BackupResult(manifest, manifest_key, manifest.storage, False, timings, phases)


def seal_manifest(manifest: BackupManifest, keys, data_key: bytes, key_conn_id: str) -> BackupManifest:
    """Return ``manifest`` with its encryption record: the data key wrapped by the current master key,
    and the HMAC that lets a restore prove nobody without the key changed the manifest."""
    from pgdr.storage.encryption import manifest_mac, wrap

    record = wrap(keys, data_key, key_conn_id, manifest.database, manifest.backup_id)
    unsigned = replace(manifest, encryption=record)
    return replace(unsigned, encryption=replace(record, manifest_mac=manifest_mac(data_key, unsigned.to_dict())))


def _dump_and_census(db: ProtectedDatabase, endpoint: PgEndpoint, snap, env, dump_dir: Path, on_blocking):
    """Run ``pg_dump`` in the exported snapshot, watching that it never holds up other sessions for long, then take
    what a restore is checked against from the catalog in the same snapshot (:func:`_census`); the exact row counts
    of the tables the dump's files answer for are left to :func:`_counts_from_files`, once the snapshot is closed
    (the source is read once, by pg_dump)."""
    lock_wait_ms = int(db.lock_wait_timeout.total_seconds() * 1000)
    snap.conn.execute("SELECT set_config('lock_timeout', %s, true)", (str(lock_wait_ms),))  # a counted table's lock
    app_name = f"pgdr-dump-{secrets.token_hex(4)}"  # tells the watcher which sessions are this dump's
    dump = subprocess.Popen(
        dump_command(endpoint, dump_dir, db.dump_jobs, snap.snapshot_id, db.compression, lock_wait_ms),
        env={**env, "PGAPPNAME": app_name},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def give_way() -> None:  # the watcher's: release the locks a held-up session waits for
        if dump.poll() is None:
            dump.terminate()
        snap.conn.cancel_safe()

    yield_after = db.yield_after.total_seconds() if db.yield_after else None
    watcher = BlockingWatcher(
        endpoint,
        db.name,
        app_name,
        [snap.conn.info.backend_pid],
        db.lock_wait_timeout.total_seconds(),
        yield_after,
        on_blocking,
        give_way,
    )
    with watcher:
        _, stderr = dump.communicate()
        if watcher.yielded_to is not None:
            raise watcher.error()
        if dump.returncode != 0:
            raise _dump_error(db, endpoint, stderr)
        try:
            return _census(snap.conn, dump_dir)
        except Exception as err:
            from psycopg.errors import LockNotAvailable

            if watcher.yielded_to is not None:
                raise watcher.error() from None
            if isinstance(err, LockNotAvailable):
                raise lock_wait_error(db, endpoint, f"counting rows: {first_line(err)}") from None
            raise


class RowSecurityInTheWay(DumpFailed, PermanentFailure):
    """The backup's role is subject to row-level security: ``pg_dump`` refuses to dump a part of a table."""


class LockWaitTimedOut(DumpFailed):
    """The backup gave up waiting for a table's lock (the plan's ``lock_wait_timeout``); a retry may find it free."""


# pg_dump gives up with "canceling statement due to statement timeout ... Query was: LOCK TABLE ..." (it applies
# --lock-wait-timeout as statement_timeout to its LOCK TABLE), its parallel workers with "could not obtain lock".
_LOCK_WAIT = re.compile(r"lock timeout|could not obtain lock|Query was: LOCK TABLE", re.IGNORECASE)
# pg_dump runs with row_security off: a role that row-level security applies to is refused rather than given a part.
_ROW_SECURITY = re.compile(r'query would be affected by row-level security policy for table "(?P<table>[^"\n]*)"')


def _dump_error(db: ProtectedDatabase, endpoint: PgEndpoint, stderr: str) -> PgdrError:
    """The error of a failed ``pg_dump``: a lock wait it gave up explained (who holds the table), else the tool's."""
    if _LOCK_WAIT.search(stderr):
        detail = "; ".join(_shorter(endpoint.scrub(line), 240) for line in stderr.strip().splitlines()[:2])
        return lock_wait_error(db, endpoint, detail)
    secured = _ROW_SECURITY.search(stderr)
    if secured:
        return RowSecurityInTheWay(
            f"pg_dump of database {db.name!r} failed: the backup's role {endpoint.user!r} is subject to row-level "
            f"security on table {printable(secured.group('table'))!r}, so its dump would miss every row a policy "
            "hides from it, and pg_dump refuses to write one. Give that role BYPASSRLS (as a superuser: ALTER ROLE "
            f"{printable(quote_ident(endpoint.user))} BYPASSRLS), or point the database's Airflow connection at a "
            "role that has it (a superuser, or the tables' owner when none of them forces row-level security). "
            "Nothing was stored; a retry fails the same way until then."
        )
    if "conflict with recovery" in stderr:  # a dump on a hot standby, cancelled by replay
        return tool_error(
            endpoint,
            f"pg_dump of database {db.name!r} on its standby (cancelled by the standby's replay: set "
            "hot_standby_feedback = on and max_standby_streaming_delay longer than a dump on the standby, or remove "
            "source_conn_id from the plan to back up from the primary)",
            stderr,
            DumpFailed,
        )
    return tool_error(endpoint, f"pg_dump of database {db.name!r}", stderr, DumpFailed)


def _shorter(text: str, most: int) -> str:
    return text if len(text) <= most else text[: most - 1] + "…"


def lock_wait_error(db: ProtectedDatabase, endpoint: PgEndpoint, detail: str) -> LockWaitTimedOut:
    """Say that the backup of ``db`` gave up on a table's lock, which sessions hold or queue for one, and what next."""
    holders = exclusive_lockers(endpoint)
    who = (
        "Sessions holding or waiting for an exclusive table lock in it now: " + "; ".join(holders) + ". "
        if holders
        else "No session holds or waits for an exclusive table lock in it any more (it was brief, or ended). "
    )
    waited = format_duration(db.lock_wait_timeout.total_seconds())
    return LockWaitTimedOut(
        f"The backup of database {db.name!r} gave up after waiting {waited} for a "
        f"table's lock ({detail}): another session holds a conflicting lock, usually a migration's ALTER TABLE or a "
        f"long transaction. pgdr does not wait longer so that it never holds up the queries queued behind it "
        f"(lock_wait_timeout in the DR plan). {who}Nothing was stored; the task retries after its retry delay. If "
        "this repeats, schedule the backup away from migrations or end the blocking session."
    )


def _census(conn, dump_dir: Path) -> tuple[RowCensus, dict[int, Path], dict[str, int | None], int, float]:
    """Return, from the backup's snapshot, what a restore is checked against: the row counts of the tables the dump's
    files cannot answer for (with the catalog the rest are added to), the data files that can, large objects,
    sequence values, the database size, and the seconds this took."""
    started = time.monotonic()
    files = readable_table_data(dump_dir)
    census = row_census(conn, files)
    if census.counted:
        log.info(
            "%d table(s) counted by query in the snapshot: the dump's files cannot answer for them.",
            len(census.counted),
        )
    sequences = sequence_values(conn)
    database_bytes = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    return census, files, sequences, database_bytes, time.monotonic() - started


def _counts_from_files(db: ProtectedDatabase, census: RowCensus, files: dict[int, Path]) -> dict[str, int]:
    """Count the rows of the tables ``census`` left to the dump's files; a file not ended as pg_dump ends its data
    fails the backup (the dump is damaged on the worker's disk: nothing is stored)."""
    left = {oid: files[oid] for oid in census.left}
    counted = count_table_data(left, db.dump_jobs)
    damaged = sorted(census.left[oid] for oid, rows in counted.items() if rows is None)
    if damaged:
        raise DumpFailed(
            f"The dump of database {db.name!r} is damaged: the data file of {len(damaged)} table(s) "
            f"({', '.join(damaged[:5])}{', …' if len(damaged) > 5 else ''}) does not end as pg_dump ends its data "
            "(cut short: the worker's disk filled up, or something else wrote there). Nothing was stored; the task "
            "retries after its retry delay. If it repeats, check the free space and health of the worker's disk."
        )
    return census.complete(counted)


def _utc_now() -> str:
    return datetime.now(UTC).isoformat()


def _remove_partial(store: BackupStore, keys: list[str], backup_id: str) -> None:
    """Best effort: remove what a failed backup uploaded. Retention removes what this cannot."""
    if not keys:
        return
    try:
        store.delete(keys)
        log.warning("Removed %d objects of the failed backup %s; no manifest was written.", len(keys), backup_id)
    except Exception as err:  # noqa: BLE001 - the original failure is what matters; say what remains
        log.warning(
            "Backup %s failed and its %d uploaded objects could not be removed (%s). They have no manifest, so no "
            "reader sees them; retention deletes them after the partial grace period.",
            backup_id,
            len(keys),
            err,
        )


def backfill_skip_reason(run_type: str, logical_date: datetime | None, queued_at: datetime | None) -> str | None:
    """Say why a backup run must not back up, or ``None`` if it should.

    A backup records the database as it is *now*. A backfill run, or a manual run given a logical
    date in the past, would label today's data with an old date, so it is skipped. A scheduled run
    that starts late (after scheduler downtime) still backs up: a late backup beats none.
    """
    run_type = str(getattr(run_type, "value", run_type))
    if run_type == "backfill":
        return (
            f"This is a backfill run for {logical_date:%Y-%m-%d %H:%M} UTC. A backup can only capture the database "
            "as it is now, so pgdr does not label a fresh dump with a past date. Nothing was done; backfill "
            "pgdr_verify_restore instead to verify the backups taken in that period."
        )
    if run_type == "manual" and logical_date is not None:
        reference = queued_at or datetime.now(UTC)
        if reference - logical_date > timedelta(hours=1):
            return (
                f"This manual run has the past logical date {logical_date:%Y-%m-%d %H:%M} UTC. A backup can only "
                "capture the database as it is now; trigger the DAG without a logical date to back up now."
            )
    return None


def backup_summary(db, result: BackupResult, store: BackupStore) -> dict:
    """Return what a backup's asset event and XCom say of it (plain values), and log it."""
    manifest = result.manifest
    log.info(
        "%s backup %s of database %s: recovery point %s, %d tables, %d rows, %s. Manifest: %s",
        "Reused" if result.reused else "Completed",
        manifest.backup_id,
        db.name,
        manifest.recovery_point.isoformat(),
        len(manifest.row_counts),
        sum(manifest.row_counts.values()),
        manifest.size_summary(),
        store.describe(result.manifest_key),
    )
    return {
        "database": db.name,
        "backup_id": manifest.backup_id,
        "location": result.location,
        "manifest_key": result.manifest_key,
        "storage": db.storage.name,
        "recovery_point": manifest.recovery_point.isoformat(),
        "stored_bytes": manifest.stored_size,
        "dump_bytes": manifest.size,
        "tables": len(manifest.row_counts),
        "rows": sum(manifest.row_counts.values()),
    }
