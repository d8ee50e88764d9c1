"""Second copies of a server's point-in-time recovery: its WAL archive and its base backups, in each S3 target the
plan names in ``pitr.copies``.

The server's ``archive_command`` (barman-cloud-wal-archive) writes one destination, the plan's ``pitr.storage``:
it cannot ship a segment to two buckets, and pgdr does not make it try (a second upload inside archive_command
would make every segment wait for the slower region, and a failing copy would stop the primary's archiving). The
copy *follows* the archive instead: each run of ``pgdr_copy`` copies the segments (and timeline history files) the
copy lacks, then the base backups, so the copy is as recent as the last run. How far behind it is, is the health
check ``copy_lag.<target>`` of the server, against ``pitr.copy_rpo``; a segment missing in the copy between two that
are there is named by the same check with the recovery window it breaks.

A copy is made the way the archive and the backups are, and is proven the same way:

- the WAL first, then the base backups: a base backup in the copy always finds the WAL its recovery starts with;
- each copied object is **read back from the copy** and its size and SHA-256 compared: a base backup's files with
  its record, a WAL segment with the bytes read at the source (hashed on the way when streamed; read at the source
  when copied inside S3); a base backup's record is written last, naming the copy's keys;
- the copy keeps the server's ``keep_window`` on its own catalog (:func:`pgdr.physical.retention.apply_pitr_retention`):
  a deletion at the source, by retention or by an attacker, is never followed.

Names read from the source bucket are untrusted: an object whose file name is not a WAL file's is not copied.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, replace
from datetime import datetime

from pgdr.errors import PermanentFailure, PgdrError, StorageUnavailable
from pgdr.logical.copies import CopyDamaged, check_read_back, copies_inside_s3, copy_checked, remove_quietly, transfer
from pgdr.messages import first_line, format_duration
from pgdr.physical.archive import DEFAULT_SEGMENT_SIZE, WalArchive, WalSegment, first_gap
from pgdr.physical.catalog import BaseBackupCatalog, BaseBackupEntry
from pgdr.physical.retention import apply_pitr_retention
from pgdr.plan import ProtectedServer, StorageTarget
from pgdr.resources import Resources
from pgdr.storage.backends import BackupStore, S3Store, sha256_stream

log = logging.getLogger(__name__)

# What PostgreSQL hands archive_command (segments, .partial, .backup labels, timeline .history files), with the
# compression suffix barman-cloud adds: nothing else under the archive's prefix is copied.
# barman-cloud keeps them in a folder per 16 hex digits of the name (``0000000100000000/000000010000000000000003.zst``).
_WAL_FILE = re.compile(
    r"^(?:[0-9A-F]{16}/)?[0-9A-F]{8}(?:[0-9A-F]{16}(?:\.partial|\.[0-9A-F]{8}\.backup)?|\.history)(?:\.[a-z0-9]{1,4})?$"
)


def is_wal_file(path: str) -> bool:
    """Say whether ``path`` (under the archive's prefix) is the name of a WAL file barman-cloud stores: anything else
    found there is not copied (a key naming another prefix, a newline, a folder deeper)."""
    return _WAL_FILE.fullmatch(path) is not None


@dataclass(frozen=True)
class _WalListing:
    """One listing of a WAL archive: its WAL files by their path under the archive's prefix, and its segments."""

    files: frozenset[str]
    segments: list[WalSegment]


@dataclass(frozen=True)
class _Archive:
    """One side of a copy: a server's base backups and WAL archive in one target."""

    target: StorageTarget
    store: BackupStore
    catalog: BaseBackupCatalog
    archive: WalArchive

    def wal_listing(self) -> _WalListing:
        """The WAL archive's files (only those with WAL files' names) and its segments, from one listing."""
        prefix = self.archive.layout.wal_segments_prefix(self.archive.server)
        objects = list(self.store.list(prefix))
        files = set()
        for obj in objects:
            name = obj.key[len(prefix) :]
            if is_wal_file(name):
                files.add(name)
            else:
                log.warning("Not copying %s: not the name of a WAL file.", self.store.describe(obj.key)[:300])
        return _WalListing(frozenset(files), self.archive.segments(self.store, objects))

    def wal_key(self, name: str) -> str:
        return self.archive.layout.wal_segments_prefix(self.archive.server) + name


def _open(
    server: ProtectedServer, res: Resources, target: StorageTarget | None = None, pruning: bool = False
) -> _Archive:
    store, layout, archive = res.archive(server, target, pruning)
    return _Archive(target or server.pitr.storage, store, BaseBackupCatalog(store, layout, server.name), archive)


def base_backups_to_copy(entries: list[BaseBackupEntry]) -> list[BaseBackupEntry]:
    """Of the source's complete base backups (oldest first), those a copy holds: all but those whose verification
    failed (known not to restore) and the incremental ones built on a base backup left out or missing (their chain
    cannot be restored). The source's retention already decided what is kept."""
    wanted: list[BaseBackupEntry] = []
    ids: set[str] = set()
    for entry in entries:
        if entry.status == "failed" or (entry.record.parent is not None and entry.record.parent not in ids):
            continue
        wanted.append(entry)
        ids.add(entry.backup_id)
    return wanted


def _wal_floor(wanted: list[BaseBackupEntry]) -> str | None:
    """The oldest WAL segment a copy needs: where the recovery of its oldest base backup starts (None: no backup,
    every segment)."""
    return min((e.record.start_wal for e in wanted), default=None)


def _file_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _needed(path: str, floor: str | None) -> bool:
    """A WAL file a copy holds: every timeline history file, every segment from ``floor`` on."""
    name = _file_name(path)
    return floor is None or ".history" in name or name[:24] >= floor


def copy_wal(
    source: _Archive, source_files: frozenset[str], copy: _Archive, floor: str | None, inside_s3: bool
) -> tuple[list[str], list[PgdrError]]:
    """Copy the WAL files the copy lacks (from ``floor`` on), oldest first, each read back there.

    :param source_files: the source archive's WAL files (its listing, made once for every copy).
    :return: the names copied, and the problems (a file that differs in the copy is removed there; the next run
        tries again).
    """
    there = copy.wal_listing().files
    copied, problems = [], []
    for name in sorted(source_files):
        if name in there or not _needed(name, floor):
            continue
        source_key, key = source.wal_key(name), copy.wal_key(name)
        try:
            sent = transfer(source.store, copy.store, source_key, key, inside_s3)
            if sent is None:  # copied inside S3: what the source holds now, to compare the copy with
                with source.store.open_read(source_key) as stream:
                    sent = sha256_stream(stream)
            check_read_back(
                copy.store,
                key,
                sent,
                f"WAL file {name} in the archive {source.archive.describe()}",
                copy.target.name,
                inside_s3,
                "a restore from the source's archive",
            )
        except CopyDamaged as err:
            remove_quietly(copy.store, [key])
            log.error("%s", err)
            problems.append(err)
            continue
        copied.append(name)
    return copied, problems


def copy_base_backup(entry: BaseBackupEntry, source: _Archive, copy: _Archive, inside_s3: bool) -> None:
    """Copy one complete base backup: its files, each read back from the copy and compared with its record, then the
    record (naming the copy's keys), then its verification record.

    :raises CopyDamaged: a file differs from the record (nothing of this backup is left in the copy).
    """
    record = entry.record
    layout, server = copy.catalog.layout, copy.catalog.server
    written: list[str] = []
    try:
        files = [replace(item, key=layout.file_key(server, record.backup_id, item.name)) for item in record.files]
        copy_checked(
            source.store,
            copy.store,
            [(old.key, new.key, old.size, old.sha256) for old, new in zip(record.files, files, strict=True)],
            f"the record of base backup {record.backup_id}",
            copy.target.name,
            inside_s3,
            "pgdr_verify_pitr",
            written,
        )
        written.append(copy.catalog.write_record(replace(record, files=tuple(files))))
    except BaseException:
        remove_quietly(copy.store, written)
        raise
    if entry.verification is not None:
        copy.catalog.record_verification(entry.verification)


def copy_server(server: ProtectedServer, res: Resources, now: datetime) -> dict:
    """Bring every copy target of ``server`` up to date with its archive and base backups; retention in each copy.

    Each target is tried even when another fails; a damaged file or base backup does not stop the others.

    :raises StorageUnavailable: a target (or the source) could not be reached (the task retries).
    :raises CopyDamaged: something could not be copied because its bytes differ at the source or in the copy.
    :return: a summary: per target, the WAL files and base backups copied, verifications brought over, deletions.
    """
    source = _open(server, res)
    wanted = base_backups_to_copy(source.catalog.backups())
    source_files = source.wal_listing().files
    summary: dict = {"server": server.name, "source": source.archive.describe(), "targets": {}}
    problems: list[PgdrError] = []
    for target in server.pitr.copies:
        done: dict = {"wal_files": 0, "base_backups": [], "verifications": 0, "retention": None, "error": None}
        summary["targets"][target.name] = done
        started = time.monotonic()
        try:
            copy = _open(server, res, target)
            inside_s3 = copies_inside_s3(server.pitr.storage, target) and isinstance(copy.store, S3Store)
            wal, failed = copy_wal(source, source_files, copy, _wal_floor(wanted), inside_s3)
            done["wal_files"] = len(wal)
            problems += failed
            present = {e.backup_id: e for e in copy.catalog.backups()}
            for entry in wanted:
                there = present.get(entry.backup_id)
                if there is not None:
                    if entry.verification is not None and there.verification != entry.verification:
                        copy.catalog.record_verification(entry.verification)  # verified after it was copied
                        done["verifications"] += 1
                    continue
                if entry.record.parent is not None and entry.record.parent not in present:
                    problems.append(
                        CopyDamaged(
                            f"Base backup {entry.backup_id} of server {server.name!r} was not copied to "
                            f"{target.name!r}: it is incremental on {entry.record.parent}, which is not in the copy "
                            "(see the error about it). The next full base backup starts a chain the copy can hold."
                        )
                    )
                    continue
                try:
                    copy_base_backup(entry, source, copy, inside_s3)
                except PermanentFailure as err:
                    log.error("%s", err)
                    problems.append(err)
                    continue
                present[entry.backup_id] = entry
                done["base_backups"].append(entry.backup_id)
            pruner = _open(server, res, target, pruning=True)  # the only credentials that delete
            done["retention"] = apply_pitr_retention(pruner.catalog, pruner.archive, pruner.store, server.pitr, now)
            log.info(
                "Copy %r of server %r: %d WAL files and %d base backups copied (%s) in %.1fs, %d verification records "
                "brought over.",
                target.name,
                server.name,
                len(wal),
                len(done["base_backups"]),
                "inside S3" if inside_s3 else "streamed",
                time.monotonic() - started,
                done["verifications"],
            )
        except (PgdrError, OSError) as err:
            done["error"] = first_line(str(err))
            log.error("Copy of server %r to %r failed: %s", server.name, target.name, err)
            problems.append(err if isinstance(err, PgdrError) else StorageUnavailable(str(err)))
    if problems:
        text = f"Copies of server {server.name!r} are incomplete: " + " | ".join(first_line(str(p)) for p in problems)
        if all(isinstance(p, PermanentFailure) for p in problems):
            raise CopyDamaged(text)
        raise StorageUnavailable(text + " The task retries; the copies made so far are kept.")
    return summary


@dataclass(frozen=True)
class ServerCopyLag:
    """How far one copy of a server's archive and base backups is behind the source, and where its WAL breaks."""

    target: str
    missing_wal: tuple[str, ...]  # WAL files the source has and the copy lacks (from the copy's floor on)
    missing_backups: tuple[str, ...]  # base backup ids, oldest first
    lag_s: float  # since the oldest missing thing was stored; 0 when nothing is missing
    gap: str | None  # a segment missing in the copy before its newest one: the window it breaks, in words

    def problem(self, limit_s: float) -> str | None:
        if self.gap is not None:
            return self.gap
        if self.lag_s <= limit_s:
            return None
        what = []
        if self.missing_wal:
            what.append(f"{len(self.missing_wal)} WAL files (from {self.missing_wal[0]})")
        if self.missing_backups:
            what.append(f"{len(self.missing_backups)} base backups (from {self.missing_backups[0]})")
        return (
            f"copy {self.target!r} lacks {' and '.join(what)}; the oldest was stored {format_duration(self.lag_s)} ago "
            f"(copy_rpo {format_duration(limit_s)}): a recovery from the copy would lose that much more than one "
            "from the archive. pgdr_copy is failing or not running: look at its last run"
        )


def server_copy_lags(
    server: ProtectedServer, res: Resources, now: datetime, source_backups: list[BaseBackupEntry] | None = None
) -> list[ServerCopyLag]:
    """How far each copy target of ``server`` is behind its archive and base backups (one listing of each side's WAL
    and its base-backup records).

    :param source_backups: the archive's base backups when the caller has read them (else they are read here).
    """
    source = _open(server, res)
    wanted = base_backups_to_copy(source.catalog.backups() if source_backups is None else source_backups)
    floor = _wal_floor(wanted)
    listing = source.wal_listing()
    stored = {s.name: s for s in listing.segments}
    lags = []
    for target in server.pitr.copies:
        copy = _open(server, res, target)
        copied = copy.wal_listing()
        held = copy.catalog.backups()
        ids = {e.backup_id for e in held}
        missing_wal = [n for n in sorted(listing.files) if n not in copied.files and _needed(n, floor)]
        missing_backups = [e for e in wanted if e.backup_id not in ids]
        times = [stored[_file_name(n)[:24]].stored_at for n in missing_wal if _file_name(n)[:24] in stored]
        times += [e.record.finished_at for e in missing_backups]
        lag = max(0.0, (now - min(times)).total_seconds()) if times else 0.0
        gap = _gap_in_copy(copied.segments, held, target.name, stored)
        lags.append(
            ServerCopyLag(target.name, tuple(missing_wal), tuple(e.backup_id for e in missing_backups), lag, gap)
        )
    return lags


def _gap_in_copy(
    segments: list[WalSegment], held: list[BaseBackupEntry], target: str, archived: dict[str, WalSegment]
) -> str | None:
    """Say which segment is missing in the copy's WAL after the start of its newest base backup (the one a recovery
    of the latest state uses), and which recovery window that breaks; ``None`` when it is continuous.

    :param archived: the source archive's segments by name: when the last reachable one was archived (the copy's
        own time is when it was copied, later by the copy's lag).
    """
    if not held:
        return None
    newest = held[-1].record
    size = newest.wal_segment_size or DEFAULT_SEGMENT_SIZE
    gap = first_gap(segments, newest.start_wal, size)
    if gap is None:
        return None
    if gap.reachable is None:
        return (
            f"copy {target!r} lacks WAL segment {gap.missing}, where the recovery of its newest base backup "
            f"{newest.backup_id} starts: no recovery from the copy's newest base backup is possible. pgdr_copy copies "
            "it on its next run if the archive still has it"
        )
    reachable_at = archived.get(gap.reachable.name, gap.reachable).stored_at
    return (
        f"copy {target!r} lacks WAL segment {gap.missing} ({gap.after} later segments are there): a recovery from the "
        f"copy can reach only moments before {reachable_at:%Y-%m-%d %H:%M:%S} UTC; the window after it "
        "is broken in the copy. pgdr_copy copies the segment on its next run if the archive still has it; if the "
        "archive lacks it too, take a full base backup (pgdr_basebackup kind=full) and let pgdr_copy copy it"
    )
