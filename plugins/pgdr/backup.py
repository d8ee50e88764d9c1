"""Taking one backup: snapshot, dump, compress, checksum, upload, manifest last.

The steps, for one database:

1. export a snapshot and record its time (the recovery point);
2. run ``pg_dump --snapshot`` into a private work directory while counting every table's rows
   exactly in the same snapshot;
3. compress each dump file with zstd, hashing the compressed bytes (SHA-256) as they are written,
   and upload it, several files at a time;
4. write the manifest. Until this last write the backup does not exist for any reader; if any
   earlier step fails, the objects already uploaded are removed (or, if storage is down, left
   for retention to remove as a partial upload).

The function is idempotent per Airflow run: if a run already completed a backup (a retry after
the manifest was written), that backup is returned instead of taking a second one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pgdr.catalog import BackupCatalog, BackupFile, BackupManifest
from pgdr.errors import DumpFailed
from pgdr.layout import BackupLayout, new_backup_id
from pgdr.plan import ProtectedDatabase
from pgdr.postgres import (
    PgEndpoint,
    count_rows,
    dump_command,
    exported_snapshot,
    passfile_env,
    sequence_values,
    tool_error,
    tool_version,
)
from pgdr.storage import CHUNK, BackupStore

log = logging.getLogger(__name__)

ZSTD_LEVEL = 3


@dataclass(frozen=True)
class BackupResult:
    """What one backup produced, with the time each phase took (seconds)."""

    manifest: BackupManifest
    manifest_key: str
    location: str
    reused: bool
    timings: dict[str, float]
    phases: dict[str, tuple[str, str]] = None  # phase -> (started_at, finished_at), ISO UTC


def compress_file(source: Path, target: Path, level: int = ZSTD_LEVEL) -> tuple[int, str]:
    """Compress ``source`` into ``target`` with zstd; return the compressed size and its SHA-256."""
    import zstandard

    digest = hashlib.sha256()
    size = 0
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)
    with open(source, "rb") as src, open(target, "wb") as out:
        reader = compressor.read_to_iter(src, read_size=CHUNK, write_size=CHUNK)
        for chunk in reader:
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def upload_dump(
    dump_dir: Path,
    store: BackupStore,
    layout: BackupLayout,
    database: str,
    backup_id: str,
    workers: int,
) -> tuple[list[BackupFile], list[str]]:
    """Compress, hash and upload every file of a dump directory, ``workers`` at a time.

    :return: the files as stored, and every key written (for clean-up on failure).
    """
    uploaded: list[str] = []

    def one(path: Path) -> BackupFile:
        key = layout.data_key(database, backup_id, path.name)
        packed = path.with_name(path.name + ".zst")
        try:
            stored_size, sha256 = compress_file(path, packed)
            raw_size = path.stat().st_size
            path.unlink()  # keep the work directory's peak size near one copy of the dump
            store.put_file(key, packed)
            uploaded.append(key)
        finally:
            packed.unlink(missing_ok=True)
        return BackupFile(name=path.name, key=key, size=raw_size, stored_size=stored_size, sha256=sha256)

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


def take_backup(
    db: ProtectedDatabase,
    endpoint: PgEndpoint,
    store: BackupStore,
    layout: BackupLayout,
    workdir: Path,
    airflow_info: dict | None = None,
) -> BackupResult:
    """Back up ``db`` into ``store``; see the module docstring for the steps.

    :param workdir: a private, empty directory for the dump; the caller removes it.
    :param airflow_info: ``dag_id``, ``run_id``, ``try_number`` and ``logical_date`` of the run.
    """
    airflow_info = airflow_info or {}
    catalog = BackupCatalog(store, layout, db.name)
    run_id = airflow_info.get("run_id")
    if run_id:
        done = catalog.find_by_run(run_id)
        if done is not None:
            log.info("Run %s already completed backup %s of %s; not taking another.", run_id, done.backup_id, db.name)
            key = layout.manifest_key(db.name, done.backup_id)
            return BackupResult(done.manifest, key, store.describe(layout.backup_prefix(db.name, done.backup_id)), True, {}, {})

    timings: dict[str, float] = {}
    started_at = datetime.now(UTC)
    dump_dir = workdir / "dump"
    client_version = tool_version("pg_dump")

    phases: dict[str, tuple[str, str]] = {}
    t0 = time.monotonic()
    dump_started = _utc_now()
    with exported_snapshot(endpoint) as snap, passfile_env(endpoint, workdir) as env:
        log.info(
            "Snapshot %s exported from %s at %s (the recovery point); dumping with %d jobs.",
            snap.snapshot_id, endpoint.describe(), snap.recovery_point.isoformat(), db.dump_jobs,
        )
        dump = subprocess.Popen(
            dump_command(endpoint, dump_dir, db.dump_jobs, snap.snapshot_id),
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            # Count rows in the exported snapshot while pg_dump reads the same snapshot.
            row_counts, large_objects = count_rows(snap.conn)
            sequences = sequence_values(snap.conn)
            timings["count_rows"] = time.monotonic() - t0
        finally:
            _, stderr = dump.communicate()
        if dump.returncode != 0:
            raise tool_error(endpoint, f"pg_dump of database {db.name!r}", stderr, DumpFailed)
        recovery_point, server_version = snap.recovery_point, snap.server_version
    timings["dump"] = time.monotonic() - t0
    phases["dump"] = (dump_started, _utc_now())
    log.info("pg_dump finished in %.1fs; %d tables counted.", timings["dump"], len(row_counts))

    backup_id = new_backup_id(recovery_point)
    upload_started = _utc_now()
    t1 = time.monotonic()
    try:
        files, uploaded = upload_dump(dump_dir, store, layout, db.name, backup_id, workers=max(2, db.dump_jobs))
    except Exception as err:
        _remove_partial(store, getattr(err, "uploaded_keys", []), backup_id)
        raise
    timings["compress_upload"] = time.monotonic() - t1

    manifest = BackupManifest(
        backup_id=backup_id,
        database=db.name,
        dbname=endpoint.dbname,
        recovery_point=recovery_point,
        started_at=started_at,
        finished_at=datetime.now(UTC),
        server_version=server_version,
        client_version=client_version,
        format="directory",
        compression="zstd",
        compression_level=ZSTD_LEVEL,
        dump_jobs=db.dump_jobs,
        files=tuple(files),
        row_counts=row_counts,
        large_objects=large_objects,
        sequences=sequences,
        storage=store.describe(layout.backup_prefix(db.name, backup_id)),
        airflow={k: v for k, v in airflow_info.items() if v is not None},
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
            "Backup %s failed and its %d uploaded objects could not be removed (%s). They have no "
            "manifest, so no reader sees them; retention deletes them after the partial grace period.",
            backup_id, len(keys), err,
        )


def work_dir_root() -> Path:
    """Return where pgdr keeps per-task work files (``$PGDR_WORK_DIR`` or the system temp dir)."""
    import tempfile

    return Path(os.environ.get("PGDR_WORK_DIR") or tempfile.gettempdir())
