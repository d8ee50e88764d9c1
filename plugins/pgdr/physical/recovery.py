"""Recovering a server to a moment: choose the chain, check the WAL, build and start a scratch cluster.

The *recoverable window* of a server runs from the end of its oldest complete base backup to
the last transaction recorded in its newest archived WAL segment (read with ``pg_waldump``). A
target inside it is recovered from the newest base backup that ended at or before the target,
replaying archived WAL up to the target; every segment from the backup's start to the newest
one must be in the archive (a gap is reported with the window it costs before anything starts).
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pgdr.errors import BackupNotFound, PermanentFailure
from pgdr.messages import format_duration
from pgdr.physical.archive import (
    DEFAULT_SEGMENT_SIZE,
    WAL_PREFETCH,
    WalArchive,
    WalSegment,
    archiver_bin_dir,
    last_commit_time,
    segment_system_identifier,
)
from pgdr.physical.catalog import BaseBackupCatalog, BaseBackupEntry
from pgdr.physical.cluster import (
    RecoveryResult,
    ScratchCluster,
    check_streamed,
    combine_chain,
    combine_links,
    download_chain,
    extract_base_backup,
    is_streamed,
    verify_backup,
)
from pgdr.postgres.client import pg_tool
from pgdr.records import expected_recovery_seconds
from pgdr.storage.backends import BackupStore

log = logging.getLogger(__name__)

WAL_HEADROOM = 1 << 30  # a server that runs on where it was recovered: pg_wal may hold max_wal_size (1 GB by default)
# A scratch cluster's pg_wal: archive recovery keeps none of the segments it replays; after promotion the new
# timeline's first segments and those min_wal_size (80 MB by default) keeps for reuse.
SCRATCH_WAL_SEGMENTS = 10


class TargetOutsideWindow(PermanentFailure):
    """The moment asked for cannot be recovered: before the oldest base backup or after the newest WAL."""


@dataclass(frozen=True)
class RecoverableWindow:
    """The moments a server can be recovered to, and what the archive holds."""

    oldest: datetime  # the end of the oldest complete base backup
    newest: datetime  # the last transaction in the newest archived WAL segment
    newest_segment: WalSegment
    backups: tuple[BaseBackupEntry, ...]

    def describe(self) -> str:
        return f"{self.oldest:%Y-%m-%d %H:%M:%S} to {self.newest:%Y-%m-%d %H:%M:%S} UTC"


def of_newest_cluster(backups: list[BaseBackupEntry]) -> list[BaseBackupEntry]:
    """Return the base backups of the cluster the newest one is of (a window never spans two clusters)."""
    if not backups:
        return []
    identifier = backups[-1].record.system_identifier
    return [e for e in backups if e.record.system_identifier == identifier]


def recoverable_window(
    catalog: BaseBackupCatalog, archive: WalArchive, store: BackupStore, workdir: Path
) -> RecoverableWindow:
    """Return the server's recoverable window; :class:`BackupNotFound` when it has no base backup yet."""
    backups = of_newest_cluster([e for e in catalog.backups() if e.status != "failed"])
    if not backups:
        raise BackupNotFound(
            f"Server {catalog.server!r} has no complete base backup in "
            f"{store.describe(catalog.layout.server_prefix(catalog.server))}: nothing can be recovered to a moment "
            "yet. Trigger pgdr_basebackup (kind=full)."
        )
    segments = archive.segments(store)
    newest_backup = backups[-1].record
    on_timeline = [s for s in segments if s.timeline >= newest_backup.timeline]
    if not on_timeline:
        raise BackupNotFound(
            f"The WAL archive {archive.describe()} holds no segment for server {catalog.server!r}: the server's "
            "archive_command is not shipping WAL. Check pg_stat_archiver on the server."
        )
    # The newest commit may lie several segments back: an idle server's checkpoints still fill segments that
    # archive_timeout then switches (one every checkpoint_timeout), none with a commit. Walk back to the newest base
    # backup's first segment (nothing older can end the window later than that backup did), newest first.
    since_backup = [s for s in on_timeline if s.name >= newest_backup.start_wal] or on_timeline[-1:]
    newest = newest_commit(
        archive,
        store,
        since_backup,
        workdir,
        check=lambda segment, path: check_same_cluster(segment, segment_system_identifier(path), backups[-1], archive),
    )
    newest = max(newest or newest_backup.finished_at, newest_backup.finished_at)
    return RecoverableWindow(backups[0].record.finished_at, newest, on_timeline[-1], tuple(backups))


def newest_commit(
    archive: WalArchive,
    store: BackupStore,
    segments: list[WalSegment],
    workdir: Path | None = None,
    check: Callable[[WalSegment, Path], None] | None = None,
) -> datetime | None:
    """Return the time of the newest commit in ``segments`` (oldest first), reading them newest first until one
    holds a commit; ``None`` when none does. Each segment read is fetched into ``workdir`` and given to ``check``
    first (which may raise)."""
    waldump = pg_tool("pg_waldump")
    for segment in reversed(segments):
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            path = archive.fetch_segment(store, segment, Path(tmp))
            if check is not None:
                check(segment, path)
            committed = last_commit_time(waldump, path)
        if committed is not None:
            return committed
    return None


class ArchiveOfAnotherCluster(PermanentFailure):
    """The WAL archive of a server holds segments another cluster wrote (a server rebuilt under the same name)."""


def check_same_cluster(segment: WalSegment, identifier: str | None, newest: BaseBackupEntry, archive) -> None:
    """Refuse an archive whose newest WAL was written by another cluster than the newest base backup's."""
    if identifier is None or identifier == newest.record.system_identifier:
        return
    raise ArchiveOfAnotherCluster(
        f"The WAL archive {archive.describe()} of server {newest.record.server!r} mixes two clusters: segment "
        f"{segment.name} was written by system identifier {identifier}, the newest base backup "
        f"({newest.backup_id}) by {newest.record.system_identifier}. A server was rebuilt (initdb or a restore) and "
        "archives into the old one's prefix. pgdr will not replay one cluster's WAL onto the other's backup. Give the "
        "new server its own name in the plan's servers: and in its archive_command, take a full base backup of it; "
        "to recover the old server, move the new segments away first."
    )


def choose_backup(window: RecoverableWindow, target: datetime | None) -> BaseBackupEntry:
    """Return the base backup to recover ``target`` from (the newest that ended at or before it)."""
    if target is None:
        return window.backups[-1]
    if window.oldest <= target and window.newest <= window.oldest:  # not too old, but the window is one moment
        raise TargetOutsideWindow(
            f"{target:%Y-%m-%d %H:%M:%S} UTC cannot be recovered: nothing was committed on the server after its "
            f"newest base backup ended ({window.oldest:%Y-%m-%d %H:%M:%S} UTC) in the WAL archived so far, so there "
            "is no moment to stop recovery at. Give 'latest' (recovery to the end of the archive); if the server "
            "did commit since, its newest WAL has not reached the archive yet (archive_timeout, pg_stat_archiver)."
        )
    if target < window.oldest or target >= window.newest:
        raise TargetOutsideWindow(
            f"{target:%Y-%m-%d %H:%M:%S} UTC cannot be recovered: the recoverable window is {window.describe()} "
            "(the end of the oldest base backup to the last transaction in the newest archived WAL). Choose a "
            "moment inside it; for the newest state give 'latest' (recovery to the end of the archive: "
            f"{window.newest:%Y-%m-%d %H:%M:%S} UTC now, later once the archive catches up, archive_timeout)."
        )
    return [e for e in window.backups if e.record.finished_at <= target][-1]


class NotEnoughDisk(PermanentFailure):
    """The worker's disk cannot hold the recovery; nothing was recovered."""


def chain_disk_bytes(chain: list[BaseBackupEntry], store: BackupStore) -> int:
    """Return the bytes a recovery of ``chain`` writes where it is placed, pg_wal aside: the full backup's files (its
    manifest), what the incrementals add, the full backup's files once more when a chain is combined by copying (a
    pg_combinebackup without ``--link``), and the segments fetched ahead of replay."""
    full = chain[0].record
    try:
        manifest = json.loads(store.get_bytes(full.file("backup_manifest").key))
        files = sum(int(f.get("Size", 0)) for f in manifest.get("Files", []) if isinstance(f, dict))
    except (KeyError, ValueError, TypeError, AttributeError):
        # the manifest cannot be read (the recovery refuses it, saying why): the format's usual ratio on a database
        ratio = 20 if any(f.name.endswith(".zst") for f in full.files) else 8
        files = full.size * ratio
    fetched_ahead = WAL_PREFETCH * full.wal_segment_size
    copied = files if len(chain) > 1 and not combine_links() else 0  # the extracted members and their combined copy
    return files + copied + sum(e.record.size for e in chain[1:]) * 2 + fetched_ahead


def scratch_disk_bytes(chain_bytes: int, segment_size: int) -> int:
    """Return the bytes a scratch recovery needs: its chain as placed (:func:`chain_disk_bytes`) and its pg_wal."""
    return chain_bytes + SCRATCH_WAL_SEGMENTS * segment_size


def free_bytes(path: Path) -> int:
    """Return the free bytes of the filesystem that holds ``path``."""
    return shutil.disk_usage(path).free


def check_room_for(chain: list[BaseBackupEntry], store: BackupStore, root: Path, purpose: str) -> None:
    """Refuse, before anything is written, a scratch recovery of ``chain`` that the disk of ``root`` cannot hold.

    :raises NotEnoughDisk: saying how much is free, how much is needed and what to do.
    """
    needed = scratch_disk_bytes(chain_disk_bytes(chain, store), chain[-1].record.wal_segment_size)
    free = free_bytes(root)
    if free < needed:
        raise NotEnoughDisk(
            f"The {purpose} cannot run on worker {socket.gethostname()}: {root} has {free / 1e9:.1f} GB free, and "
            f"recovering base backup {chain[-1].backup_id} there needs about {needed / 1e9:.1f} GB (the chain "
            "extracted, pg_wal's room while it replays, the WAL fetched ahead). Free space there, or point "
            "PGDR_WORK_DIR at a larger disk (in the workers' environment, then restart them; or in the environment "
            "of python -m pgdr), then trigger again. Nothing was recovered, and the live server was not touched."
        )


@dataclass
class PreparedChain:
    """A chain downloaded, verified and combined into a data directory, with what it took."""

    chain: list[BaseBackupEntry]
    data_dir: Path
    timings: dict[str, float]
    verified: list[str]
    combined: str = "moved"  # a chain's combine: "linked" (hard links) or "copied" (combine_chain)


def prepare_data_directory(
    catalog: BaseBackupCatalog,
    entry: BaseBackupEntry,
    store: BackupStore,
    workdir: Path,
    data_dir: Path,
    archive: WalArchive,
    segments: list[WalSegment] | None = None,
    chain: list[BaseBackupEntry] | None = None,
) -> PreparedChain:
    """Check the WAL, then download, verify (``pg_verifybackup``) and combine ``entry``'s chain (``catalog.chain``
    unless given) into ``data_dir``."""
    chain = chain or catalog.chain(entry)
    timings: dict[str, float] = {}
    archive.check_continuous(
        segments if segments is not None else archive.segments(store),
        chain[0].record.start_wal,
        entry.record.wal_segment_size,
    )
    t0 = time.monotonic()

    def what(member: BaseBackupEntry) -> str:
        where = store.describe(catalog.layout.base_backup_prefix(catalog.server, member.backup_id))
        return f"base backup {member.backup_id} ({where})"

    # A streamed base backup (zstd) is read once: SHA-256, every file checked against its manifest, extracted.
    waits: dict[str, float] = {}
    streamed = {
        member.backup_id: check_streamed(
            member, store, workdir, workdir / "extract" / member.backup_id, what(member), waits
        )
        for member in chain
        if is_streamed(member)
    }
    if streamed:
        timings["download_check_extract"] = sum(streamed.values())
        # of which waiting: for the bucket's bytes, for the disk to take the extracted files
        timings["download_check_extract_waiting_bucket"] = waits.get("bucket", 0.0)
        timings["download_check_extract_waiting_disk"] = waits.get("disk", 0.0)
    # One stored before (gzip'd tar): downloaded, then pg_verifybackup reads it while it is extracted.
    legacy = [member for member in chain if not is_streamed(member)]
    t1 = time.monotonic()
    folders = download_chain(legacy, store, workdir / "download")
    timings["download"] = time.monotonic() - t1

    def verify_stored() -> float:
        started = time.monotonic()
        for member, folder in zip(legacy, folders, strict=True):
            verify_backup(folder, what(member))
        return time.monotonic() - started

    def extract() -> float:
        started = time.monotonic()
        for folder in folders:
            extract_base_backup(folder, workdir / "extract" / folder.name)
        return time.monotonic() - started

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="pgdr-prepare") as pool:
        verifying, extracting = pool.submit(verify_stored), pool.submit(extract)
        try:
            timings["verify_stored"] = verifying.result()
        finally:
            extracted_or_error = extracting.exception()
    if extracted_or_error is not None:
        raise extracted_or_error
    timings["extract"] = extracting.result()
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    extracted = [workdir / "extract" / member.backup_id for member in chain]
    timings["verify_and_extract"] = time.monotonic() - t0
    t3 = time.monotonic()
    combined = combine_chain(extracted, data_dir)
    timings["combine"] = time.monotonic() - t3
    if len(chain) > 1:  # pg_combinebackup wrote new files: check them against the manifest it wrote
        t4 = time.monotonic()
        verify_backup(data_dir, f"the data directory combined from {', '.join(e.backup_id for e in chain)}")
        timings["verify_combined"] = time.monotonic() - t4
    return PreparedChain(chain, data_dir, timings, [e.backup_id for e in chain], combined)


def recover_cluster(
    cluster: ScratchCluster,
    archive: WalArchive,
    store: BackupStore,
    target: datetime | None,
    timeout_s: float = 6 * 3600,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> RecoveryResult:
    """Configure the prepared ``cluster`` to recover to ``target`` (``None``: the end of the
    archive), start it, wait. ``store`` holds the archive (listed as the replay begins)."""
    cluster.environment = {**cluster.environment, **archive.access.environment()}
    restore_command = archive.restore_command(cluster.spool_dir, archiver_bin_dir(), segment_size)
    cluster.configure(restore_command, target, archive.archived_names(store))
    try:
        result = cluster.start(target, timeout_s)
    finally:
        cluster.drop_spool()
    log.info(
        "Recovered to %s (target %s); %s bytes of WAL replayed in %.1fs.",
        result.achieved_point,
        target.isoformat() if target else "latest",
        result.wal_bytes_replayed,
        result.replay_seconds,
    )
    return result


def plan_point_in_time(server, res, moment: datetime | None, workdir: Path, source=None) -> dict[str, Any]:
    """Plan a recovery of ``server`` to ``moment``: the window, the chain, the WAL to replay, the expected time.

    ``moment`` ``None`` is *latest*: the end of the archive (every archived transaction replayed); the
    plan then names the last transaction the archive holds now and how far behind the present it is.

    :param res: the deployment (:class:`pgdr.resources.Resources`).
    :param source: one of the server's ``pitr.copies`` to read instead of its archive (``None``: the archive).
    :raises TargetOutsideWindow: naming the recoverable window, when ``moment`` lies outside it.
    """
    store, layout, archive = res.archive(server, source)
    catalog = BaseBackupCatalog(store, layout, server.name)
    workdir.mkdir(parents=True, exist_ok=True)
    window = recoverable_window(catalog, archive, store, workdir)
    entry = choose_backup(window, moment)
    chain = catalog.chain(entry, list(window.backups))
    size = entry.record.wal_segment_size
    start = entry.record.start_wal
    needed = []
    for segment in (s for s in archive.segments(store) if s.name >= start):
        needed.append(segment)  # up to the first segment archived after the moment: it holds the moment
        if moment is not None and segment.stored_at > moment:
            break
    expected = expected_recovery_seconds(e.verification for e in window.backups)
    behind = (datetime.now(UTC) - window.newest).total_seconds()
    placed = chain_disk_bytes(chain, store)
    return {
        "server": server.name,
        "target": moment.isoformat() if moment is not None else "latest",
        "end_of_archive": window.newest.isoformat(),  # the last transaction the archive holds (the 'latest' point)
        "end_of_archive_behind_seconds": round(behind, 1),
        "recovery_point_expected": (moment or window.newest).isoformat(),
        "base_backup": entry.backup_id,
        "chain": [e.backup_id for e in chain],
        "base_backup_bytes": sum(e.record.size for e in chain),
        "base_backup_ended": entry.record.finished_at.isoformat(),
        "system_identifier": entry.record.system_identifier,  # of the cluster the chain was taken from
        "pg_version": entry.record.pg_version,
        "wal_segments": len(needed),
        "wal_bytes": len(needed) * size,
        "chain_disk_bytes": placed,
        "recovery_disk_bytes": scratch_disk_bytes(placed, size),  # in a scratch cluster
        "window": {"oldest": window.oldest.isoformat(), "newest": window.newest.isoformat()},
        "size": f"base backup chain {', '.join(e.backup_id for e in chain)} "
        f"({sum(e.record.size for e in chain) / 1e6:.1f} MB stored), then up to {len(needed)} WAL segments "
        f"({len(needed) * size / 1e6:.0f} MB) replayed to the moment",
        "expected_recovery_seconds": expected,
        "expected_recovery": format_duration(expected) if expected else "unknown (no PITR verification yet)",
    }


def recover_in_scratch(
    run: tuple[str, str, str],
    purpose: str,
    catalog,
    entry,
    store,
    archive,
    target,
    login: str,
    workdir: Path,
    run_state,
):
    """Recover ``entry``'s chain in the scratch cluster of ``run`` (dag id, run id, key); return ``(cluster, prepared,
    result)``.

    Clusters of other runs on this worker are removed first when their run is over (by marker,
    :func:`pgdr.workdir.run_is_over`), and so is a previous try's cluster of this run: a retry starts
    again from the stored bytes. A cluster whose recovery fails is removed before the error goes up;
    one that recovered is the caller's to destroy.

    :param target: the recovery target time, or ``None`` for the end of the archive.
    :param workdir: a private directory for the downloaded chain (removed by the caller).
    :param run_state: returns the Airflow state of a run ``(dag_id, run_id)``.
    """
    from pgdr.physical.cluster import ScratchCluster, cluster_dir_name, remove_leftover_clusters
    from pgdr.workdir import work_dir_root

    dag_id, run_id, key = run
    root = work_dir_root()
    root.mkdir(parents=True, exist_ok=True)
    cluster = ScratchCluster(root / cluster_dir_name(dag_id, run_id, key), entry.record.pg_version, login=login)
    remove_leftover_clusters(root, run_state, keep=cluster.root)
    cluster.destroy()
    chain = catalog.chain(entry)
    check_room_for(chain, store, root, purpose)  # the work files and the cluster share the root's disk
    cluster.write_marker(dag_id, run_id, purpose)
    try:
        workdir.chmod(0o755)  # the cluster's user reads the extracted files through it
        prepared = prepare_data_directory(catalog, entry, store, workdir, cluster.data_dir, archive, chain=chain)
        result = recover_cluster(cluster, archive, store, target, segment_size=entry.record.wal_segment_size)
    except BaseException:
        cluster.destroy()
        raise
    return cluster, prepared, result
