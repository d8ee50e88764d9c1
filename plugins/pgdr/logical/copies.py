"""Second copies: every complete backup of a database, copied to each storage target its plan names in ``copies``.

One bucket holds every recovery point of a database; whoever deletes it, or loses its region, or holds the
workers' keys, takes them all. A copy in another bucket (another region, another account) is the answer, and it
is only an answer if it is whole and readable, so a copy is made the way a backup is:

- every data file first, the manifest last: a backup exists in the copy only when all of it is there;
- a file is copied inside S3 (``CopyObject``) when both targets are buckets reached through the same AWS
  connection, or streamed through the worker otherwise (no local file); the source's bytes are hashed on the way;
- then every file is **read back from the copy** and its SHA-256 and size compared with the manifest's, before the
  manifest is written there. What the copy holds is what the backup stored: proven, not assumed;
- the manifest stored in the copy is the source's as written; under another prefix it names the copy's keys, and
  an encrypted one is authenticated anew under its data key (its HMAC covers the keys); a verification record of the
  source applies to the copy too (the bytes are the same, by SHA-256) and is copied beside it, so that
  ``latest-verified`` means the same thing in both places.

A copy keeps the database's retention, applied to the copy's own catalog: a backup the source's retention would
delete is not copied, and a deletion at the source (by retention, or by an attacker) is never followed.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from pgdr.errors import PermanentFailure, PgdrError, StorageUnavailable
from pgdr.logical.catalog import BackupCatalog, BackupEntry, BackupManifest
from pgdr.logical.retention import apply_retention, decide_retention
from pgdr.messages import first_line, format_duration
from pgdr.plan import ProtectedDatabase, StorageTarget
from pgdr.resources import Resources
from pgdr.storage.backends import BackupStore, S3Store, sha256_stream

log = logging.getLogger(__name__)


class CopyDamaged(PermanentFailure):
    """A file's bytes differ from its backup's manifest, at the source or in the copy: the copy is not made."""


@dataclass(frozen=True)
class CopiedBackup:
    """One backup copied to one target: what was moved, how, and how long it took."""

    backup_id: str
    target: str
    files: int
    stored_bytes: int
    seconds: float
    how: str  # "inside S3" or "streamed"

    def describe(self) -> str:
        return (
            f"{self.backup_id} to {self.target!r}: {self.files} files, {self.stored_bytes / 1e6:.1f} MB {self.how}, "
            f"checked in the copy, in {self.seconds:.1f}s"
        )


class _HashingReader:
    """A stream that hashes what is read through it (the source's bytes, while they are streamed to the copy)."""

    def __init__(self, stream):
        self._stream, self.digest, self.size = stream, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._stream.read(size)
        self.digest.update(chunk)
        self.size += len(chunk)
        return chunk


def transfer(
    source: BackupStore, copy: BackupStore, source_key: str, key: str, inside_s3: bool
) -> tuple[int, str] | None:
    """Copy one object from ``source`` to ``copy``: inside S3 (``CopyObject``: no byte passes through this worker;
    returns ``None``), or streamed through the worker (returns the size and SHA-256 of what was read, hashed on the
    way)."""
    if inside_s3:
        copy.copy_from(source, key, source_key)
        return None
    with source.open_read(source_key) as stream:
        reader = _HashingReader(stream)
        copy.put_stream(key, reader)
    return reader.size, reader.digest.hexdigest()


def copy_checked(
    source: BackupStore,
    copy: BackupStore,
    files: list[tuple[str, str, int, str]],
    whose: str,
    target: str,
    inside_s3: bool,
    verify: str,
    written: list[str],
) -> None:
    """Copy each file ``(source key, key in the copy, size, SHA-256)`` of one backup, as ``whose`` (its manifest or
    record) lists it: a streamed file's bytes checked on the way (:func:`check_sent`), then every copied file read back
    from the copy (:func:`check_read_back`). Each key is added to ``written`` before it is written (for the caller to
    remove on failure).

    :raises CopyDamaged: a file differs at the source or in the copy; ``verify`` is the DAG that tells which.
    """
    for source_key, key, size, sha256 in files:
        written.append(key)
        check_sent(
            transfer(source, copy, source_key, key, inside_s3),
            (size, sha256),
            source.describe(source_key),
            whose,
            verify,
        )
    for _source_key, key, size, sha256 in files:  # the copy's own bytes: what a restore from the copy will read
        check_read_back(copy, key, (size, sha256), whose, target, inside_s3, f"{verify} on it")


def check_sent(sent: tuple[int, str] | None, expected: tuple[int, str], where: str, whose: str, verify: str) -> None:
    """Compare a streamed file's size and SHA-256, hashed on the way (``sent``; ``None`` when copied inside S3), with
    ``expected`` (from ``whose``, its manifest or record).

    :raises CopyDamaged: the file differs at the source: the backup is damaged there, ``verify`` tells how.
    """
    if sent is not None and sent != expected:
        raise CopyDamaged(
            f"{where} is {sent[0]} bytes with SHA-256 {sent[1][:16]}…, but {whose} says {expected[0]} bytes, "
            f"{expected[1][:16]}…: the backup is damaged at the source, so it was not copied. Run {verify} on it, and "
            "find out what changed the bucket."
        )


def check_read_back(
    store: BackupStore, key: str, expected: tuple[int, str], whose: str, target: str, inside_s3: bool, how_to_tell: str
) -> None:
    """Read ``key`` back from the copy and compare its size and SHA-256 with ``expected`` (from ``whose``).

    :raises CopyDamaged: naming both, and (after a copy inside S3) that the source's object may be the damaged one.
    """
    with store.open_read(key) as stream:
        size, digest = sha256_stream(stream)
    if (size, digest) != expected:
        raise CopyDamaged(
            f"{store.describe(key)} reads back as {size} bytes with SHA-256 {digest[:16]}…, not the {expected[0]} "
            f"bytes, {expected[1][:16]}… of {whose}: the copy to {target!r} is not made (what was written is "
            "removed); the next run tries again."
            + (
                f" It was copied inside S3, so the source's file may be the damaged one: {how_to_tell} tells."
                if inside_s3
                else ""
            )
        )


def copies_inside_s3(source_target: StorageTarget, copy_target: StorageTarget) -> bool:
    """Say whether the copy can be made inside S3: both targets are buckets reached through one AWS connection."""
    return source_target.kind == copy_target.kind == "s3" and source_target.aws_conn_id == copy_target.aws_conn_id


def copy_backup(
    entry: BackupEntry,
    source: BackupCatalog,
    copy: BackupCatalog,
    target: str,
    inside_s3: bool,
    data_key_of: Callable[[BackupManifest], bytes | None],
):
    """Copy one complete backup from ``source`` to ``copy`` (files, check in the copy, manifest last).

    :param data_key_of: the data key of an encrypted backup (its manifest's HMAC checked), needed only when the copy
        keeps its objects under another prefix: the manifest then names other keys, and is authenticated anew.

    :raises CopyDamaged: a file differs from the manifest (nothing of this backup is left in the copy).
    :return: a :class:`CopiedBackup`.
    """
    manifest = entry.manifest
    started = time.monotonic()
    written: list[str] = []
    files = []
    try:
        for item in manifest.files:
            own = source.layout.data_key(manifest.database, manifest.backup_id, item.name)
            key = copy.layout.data_key(manifest.database, manifest.backup_id, item.name) + item.key[len(own) :]
            files.append(replace(item, key=key))
        copy_checked(
            source.store,
            copy.store,
            [(old.key, new.key, old.stored_size, old.sha256) for old, new in zip(manifest.files, files, strict=True)],
            f"the manifest of backup {manifest.backup_id}",
            target,
            inside_s3,
            "pgdr_verify_restore",
            written,
        )
        copy.write_manifest(_manifest_for_copy(manifest, tuple(files), data_key_of))
    except BaseException:
        remove_quietly(copy.store, written)
        raise
    copy.get(manifest.backup_id)  # the stored manifest reads back, about this backup, with this copy's keys
    if entry.verification is not None:
        copy.record_verification(entry.verification)
    return CopiedBackup(
        manifest.backup_id,
        target,
        len(files),
        manifest.stored_size,
        time.monotonic() - started,
        "inside S3" if inside_s3 else "streamed",
    )


def _manifest_for_copy(
    manifest: BackupManifest, files: tuple, data_key_of: Callable[[BackupManifest], bytes | None]
) -> BackupManifest:
    """The manifest the copy stores: the source's as written (its ``storage`` still says where the backup was taken
    to), with the copy's data keys when its prefix differs; an encrypted one is then authenticated anew under its own
    data key (the HMAC covers the keys), after the source's HMAC is checked."""
    from pgdr.storage.encryption import manifest_mac

    if [f.key for f in files] == [f.key for f in manifest.files]:
        return manifest  # the same keys in another bucket: the manifest as written, its HMAC intact
    moved = replace(manifest, files=files)
    if manifest.encryption is None:
        return moved
    data_key = data_key_of(manifest)
    return replace(moved, encryption=replace(manifest.encryption, manifest_mac=manifest_mac(data_key, moved.to_dict())))


def remove_quietly(store: BackupStore, keys: list[str]) -> None:
    """Remove the files of a copy that failed (they have no manifest: invisible, but they cost storage)."""
    try:
        store.delete(keys)
    except Exception as err:  # noqa: BLE001 - retention removes partial uploads later; the copy's error matters more
        log.warning(
            "Could not remove the %d files of a failed copy (%s); retention removes them later.", len(keys), err
        )


def backups_to_copy(entries: list[BackupEntry], db: ProtectedDatabase, now: datetime) -> list[BackupEntry]:
    """Of the source's complete backups (``entries``), those a copy should hold, oldest first: those its retention
    keeps, less those whose verification failed (known not to restore)."""
    keep = decide_retention(entries, [], db.retention, now).keep
    return [e for e in entries if e.backup_id in keep and e.status != "failed"]


def copy_database(db: ProtectedDatabase, res: Resources, now: datetime) -> dict:
    """Bring every copy target of ``db`` up to date with its storage target; apply retention in each copy.

    Each target is tried even when another fails. A damaged backup does not stop the others.

    :raises StorageUnavailable: a target (or the source) could not be reached (the task retries).
    :raises CopyDamaged: a backup could not be copied because its bytes differ from its manifest.
    :return: a summary: per target, the backups copied, verification records brought over, retention's deletions.
    """
    source_store, source_layout = res.store(db.storage)
    source = BackupCatalog(source_store, source_layout, db.name)
    wanted = backups_to_copy(source.backups(), db, now)
    summary: dict = {"database": db.name, "source": db.storage.describe(), "targets": {}}
    problems: list[PgdrError] = []
    for target in db.copies:
        done: dict = {"copied": [], "verifications": 0, "deleted": [], "error": None}
        summary["targets"][target.name] = done
        try:
            store, layout = res.store(target)
            copy = BackupCatalog(store, layout, db.name)
            present = {e.backup_id: e for e in copy.backups()}
            inside_s3 = copies_inside_s3(db.storage, target) and isinstance(store, S3Store)
            for entry in wanted:
                there = present.get(entry.backup_id)
                if there is None:
                    try:
                        copied = copy_backup(entry, source, copy, target.name, inside_s3, lambda m: res.data_key(db, m))
                    except PermanentFailure as err:  # this backup only (damaged, or its manifest tampered with)
                        log.error("%s", err)
                        problems.append(err)
                        continue
                    log.info("Copied %s", copied.describe())
                    done["copied"].append(copied.backup_id)
                elif (
                    entry.verification is not None
                    and there.verification != entry.verification
                    and not (there.verification and there.verification.verified_from == target.name)
                ):  # verified (or failed) after it was copied; a verification from the copy itself stays
                    copy.record_verification(entry.verification)
                    done["verifications"] += 1
            prune_store, _ = res.store(target, pruning=True)  # the only credentials that delete
            done["deleted"] = apply_retention(BackupCatalog(prune_store, layout, db.name), db.retention, now)["deleted"]
        except (PgdrError, OSError) as err:
            done["error"] = first_line(str(err))
            log.error("Copy of %r to %r failed: %s", db.name, target.name, err)
            problems.append(err if isinstance(err, PgdrError) else StorageUnavailable(str(err)))
    if problems:
        raise _combined(db, problems)
    return summary


def _combined(db: ProtectedDatabase, problems: list[Exception]) -> PgdrError:
    """One error for the task: retried when any part may pass on a retry, final when every part is damage."""
    text = f"Copies of database {db.name!r} are incomplete: " + " | ".join(first_line(str(p)) for p in problems)
    if all(isinstance(p, PermanentFailure) for p in problems):
        return CopyDamaged(text)
    return StorageUnavailable(text + " The task retries; the copies made so far are kept.")


@dataclass(frozen=True)
class CopyLag:
    """How far one copy target is behind the source: the backups missing there, and for how long."""

    target: str
    missing: tuple[str, ...]  # backup ids, oldest first
    lag_s: float  # since the oldest missing backup was stored; 0 when none is missing

    def problem(self, limit_s: float) -> str | None:
        if not self.missing or self.lag_s <= limit_s:
            return None
        return (
            f"{_backups(len(self.missing))} not in copy {self.target!r}; the oldest ({self.missing[0]}) was stored "
            f"{format_duration(self.lag_s)} ago (copy_rpo {format_duration(limit_s)}). pgdr_copy is failing or not "
            "running: look at its last run"
        )


def _backups(count: int) -> str:
    return f"{count} backup is" if count == 1 else f"{count} backups are"


def copy_lags(db: ProtectedDatabase, res: Resources, now: datetime, source: list[BackupEntry]) -> list[CopyLag]:
    """How far each copy target of ``db`` is behind its storage target, whose complete backups are ``source``
    (reads the copies' listings only, no manifest there)."""
    wanted = backups_to_copy(source, db, now)
    lags = []
    for target in db.copies:
        store, layout = res.store(target)
        present = BackupCatalog(store, layout, db.name).complete_ids()
        missing = [e for e in wanted if e.backup_id not in present]
        lag = (now - missing[0].manifest.finished_at).total_seconds() if missing else 0.0
        lags.append(CopyLag(target.name, tuple(e.backup_id for e in missing), max(0.0, lag)))
    return lags
