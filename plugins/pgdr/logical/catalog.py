"""The catalog of backups: manifests, verification marks, and what exists for readers.

A backup exists when, and only when, its manifest is stored: the manifest is written after
every data file, so a reader never sees half a backup. Objects under a backup id with no
manifest are a *partial upload* (a killed or failing run); they are invisible to every reader
and are removed by retention once they are old enough that no run can still be writing them.

The verify-restore DAG writes a *verification record* next to the manifest: ``verified`` or
``failed``, with timings and the validation summary. Retention never deletes the newest
verified backup, whatever its age.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import MISSING, asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from pgdr.errors import BackupNotFound, PermanentFailure, StorageUnavailable
from pgdr.identifiers import legacy_table_key, printable
from pgdr.messages import first_line
from pgdr.parallel import bounded_map
from pgdr.records import STATUSES, VerificationRecord
from pgdr.storage.backends import BackupStore
from pgdr.storage.encryption import EncryptionRecord, sealed_size
from pgdr.storage.layout import BackupLayout, backup_id_time, is_backup_id

log = logging.getLogger(__name__)

# 2: row-count and sequence keys are written as SQL writes names (pgdr.identifiers); format 1
# (pgdr 0.1 and 0.2) joined schema and name with a dot, unquoted, and is read as such.
# The timed phases of a verify-restore, as its verification record lists them.
VERIFICATION_PHASES = ("check_checksums", "restore_backup", "check_integrity", "validate_data", "apply_privileges")
MANIFEST_FORMAT = 2
# Records read side by side in a scan: fewer than the S3 client's connection pool (16), so none waits for one.
CATALOG_READERS = 8
MAX_FILE_BYTES = 1 << 50  # 1 PiB: a larger size in a manifest is a damaged or forged record
# The files pg_dump -Fd writes (toc.dat, <dump id>.dat, blobs_<id>.toc, blob_<oid>.dat), with
# pg_dump's own compression suffix; pgdr 0.1 stored them with a .zst key suffix of its own.
# The files pg_dump writes, and the source server's roles (pg_dumpall --globals-only) that pgdr stores beside them.
_DUMP_FILE = re.compile(
    r"^((toc\.dat|\d{1,10}\.dat|blobs(_\d{1,10})?\.toc|blob_\d{1,10}\.dat)(\.gz|\.lz4|\.zst)?|globals\.sql)$"
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestInvalid(PermanentFailure):
    """A manifest is damaged, or forged by someone who can write to the bucket: it is not used."""


@dataclass(frozen=True)
class BackupFile:
    """One dump file as stored: name in the dump directory, key, sizes and SHA-256 of the stored bytes."""

    name: str
    key: str
    size: int  # bytes of the file pg_restore reads (equal to stored_size unless compressed_by "pgdr")
    stored_size: int  # bytes as stored
    sha256: str  # of the stored bytes


@dataclass(frozen=True)
class BackupManifest:
    """Everything a restore needs to know about one backup, and proof of what it contains."""

    backup_id: str
    database: str
    dbname: str
    recovery_point: datetime  # the snapshot time: the moment the backup's data is from
    started_at: datetime
    finished_at: datetime
    server_version: str
    client_version: str
    format: str  # "directory" (pg_dump -Fd): restorable in parallel
    compression: str  # pg_dump's --compress spec ("gzip:1", "none"); "zstd" for compressed_by "pgdr"
    compression_level: int | None
    dump_jobs: int
    files: tuple[BackupFile, ...]
    row_counts: dict[str, int]  # exact, counted in the dump's own snapshot
    large_objects: int
    storage: str
    airflow: dict[str, Any] = field(default_factory=dict)
    sequences: dict[str, int | None] = field(default_factory=dict)  # last values, read with the counts
    manifest_format: int = MANIFEST_FORMAT
    # Who compressed the files: "pg_dump" (stored as pg_dump wrote them, pg_restore reads them
    # directly) or "pgdr" (backups of pgdr before 0.2: pg_dump -Z0, then zstd per file by pgdr;
    # still restorable). Manifests that do not say are of the older kind.
    compressed_by: str = "pgdr"
    database_bytes: int | None = None  # pg_database_size() at the recovery point
    # Client-side encryption (pgdr.storage.encryption): None for a backup stored as pg_dump wrote it.
    encryption: EncryptionRecord | None = None

    @property
    def size(self) -> int:
        """Return the size of the dump pg_restore reads, in bytes."""
        return sum(f.size for f in self.files)

    @property
    def stored_size(self) -> int:
        """Return the bytes stored for this backup (compressed)."""
        return sum(f.stored_size for f in self.files)

    def size_summary(self) -> str:
        """Return the backup's size as an on-call engineer reads it, e.g. ``4.2 MB stored (gzip:1), ...``."""
        if self.compressed_by == "pgdr":
            return f"{self.size / 1e6:.1f} MB dumped, {self.stored_size / 1e6:.1f} MB stored (zstd, by pgdr 0.1)"
        text = f"{self.stored_size / 1e6:.1f} MB stored ({self.compression}"
        text += f", encrypted with master key {self.encryption.key_id})" if self.encryption else ")"
        if self.database_bytes:
            text += f", from a {self.database_bytes / 1e6:.1f} MB database"
        return text

    def to_dict(self) -> dict[str, Any]:
        """Return the manifest as the JSON object it is stored as."""
        data = asdict(self)
        for key in ("recovery_point", "started_at", "finished_at"):
            data[key] = getattr(self, key).isoformat()
        data["size"] = self.size
        data["stored_size"] = self.stored_size
        if data["encryption"] is None:
            del data["encryption"]  # an unencrypted manifest reads as it did before pgdr 0.4
        return data

    def to_json(self) -> bytes:
        """Serialise the manifest as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> BackupManifest:
        """Parse and check a manifest; anything damaged or out of shape raises :class:`ManifestInvalid`.

        A manifest comes from a bucket, so it is untrusted input: every field is checked for type
        and range before any of it is used, and the error names ``where`` and the field.
        """
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise _invalid(where, "the file", f"is not JSON ({err})") from None
        if not isinstance(data, dict):
            raise _invalid(where, "the file", "is not a JSON object")
        data.pop("size", None)
        data.pop("stored_size", None)
        missing = [
            name
            for name, f in cls.__dataclass_fields__.items()
            if name not in data and f.default is MISSING and f.default_factory is MISSING
        ]
        if missing:
            raise _invalid(where, ", ".join(missing), "is missing")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise _invalid(where, ", ".join(unknown), "is not a field of a pgdr manifest")
        for key in ("recovery_point", "started_at", "finished_at"):
            data[key] = _time(data[key], where, key)
        if not isinstance(data["backup_id"], str) or not is_backup_id(data["backup_id"]):
            raise _invalid(where, "backup_id", f"is {printable(repr(data['backup_id']))[:80]}, not a pgdr backup id")
        for key in ("database", "dbname", "server_version", "client_version", "format", "compression", "storage"):
            if not isinstance(data[key], str) or "\x00" in data[key]:
                raise _invalid(where, key, "must be text")
        if data["format"] != "directory":
            raise _invalid(
                where, "format", f"is {printable(data['format'])!r}; pgdr writes directory-format dumps only"
            )
        data.setdefault("compressed_by", "pgdr")
        if data["compressed_by"] not in ("pg_dump", "pgdr"):
            raise _invalid(where, "compressed_by", "must be pg_dump or pgdr")
        _count(data["dump_jobs"], where, "dump_jobs", 1, 1024)
        _count(data["large_objects"], where, "large_objects")
        if data.get("compression_level") is not None:
            _count(data["compression_level"], where, "compression_level", 0, 22)
        if data.get("database_bytes") is not None:
            _count(data["database_bytes"], where, "database_bytes", 0, MAX_FILE_BYTES)
        data["manifest_format"] = data.get("manifest_format", 1)
        if data["manifest_format"] not in (1, MANIFEST_FORMAT):
            raise _invalid(
                where, "manifest_format", f"is {data['manifest_format']!r}; this pgdr reads 1 and {MANIFEST_FORMAT}"
            )
        data["row_counts"] = _name_map(data["row_counts"], where, "row_counts", data["manifest_format"], nullable=False)
        data["sequences"] = _name_map(
            data.get("sequences") or {}, where, "sequences", data["manifest_format"], nullable=True
        )
        data["manifest_format"] = MANIFEST_FORMAT  # keys are in today's syntax from here on
        if not isinstance(data.get("airflow", {}), dict):
            raise _invalid(where, "airflow", "must be a mapping")
        data["files"] = _files(data["files"], where)
        if data.get("encryption") is not None:
            data["encryption"] = EncryptionRecord.from_dict(data["encryption"], lambda f, p: _invalid(where, f, p))
            if data["compressed_by"] != "pg_dump":
                raise _invalid(where, "encryption", "is only written by pgdr versions whose files pg_dump compressed")
            for index, entry in enumerate(data["files"]):
                if entry.stored_size != sealed_size(entry.size):
                    raise _invalid(
                        where,
                        f"files[{index}].stored_size",
                        f"is {entry.stored_size}, but {entry.size} bytes encrypt to {sealed_size(entry.size)}",
                    )
        return cls(**data)


def _invalid(where: str, field: str, problem: str) -> ManifestInvalid:
    return ManifestInvalid(
        f"The manifest {where} is damaged or not a pgdr manifest: {field} {problem}. pgdr does not use this backup "
        "(nothing was read or written for it). Choose another backup, and find out who or what changed the storage."
    )


def _time(value: Any, where: str, field: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise _invalid(where, field, f"is {printable(repr(value))[:60]}, not an ISO 8601 time with a UTC offset")
    return moment


def _count(value: Any, where: str, field: str, low: int = 0, high: int = 1 << 62) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _invalid(where, field, f"is {printable(repr(value))[:60]}, not a whole number from {low} to {high}")
    return value


def _name_map(value: Any, where: str, field: str, manifest_format: int, nullable: bool) -> dict[str, int | None]:
    if not isinstance(value, dict):
        raise _invalid(where, field, "must be a mapping of schema.table names to numbers")
    result: dict[str, int | None] = {}
    for key, number in value.items():
        if not isinstance(key, str) or "\x00" in key:
            raise _invalid(where, f"{field} key {printable(repr(key))[:60]}", "is not a name")
        if not (nullable and number is None):
            _count(number, where, f"{field}[{printable(key)!r}]", -(1 << 63) if nullable else 0, (1 << 63) - 1)
        result[legacy_table_key(key) if manifest_format == 1 else key] = number
    return result


def _files(value: Any, where: str) -> tuple[BackupFile, ...]:
    if not isinstance(value, list) or not value:
        raise _invalid(where, "files", "must be a non-empty list")
    files, names = [], set()
    for index, item in enumerate(value):
        field = f"files[{index}]"
        if not isinstance(item, dict) or set(item) != set(BackupFile.__dataclass_fields__):
            raise _invalid(where, field, f"must have exactly the fields {', '.join(BackupFile.__dataclass_fields__)}")
        name, key = item["name"], item["key"]
        if not isinstance(name, str) or not _DUMP_FILE.match(name):
            raise _invalid(
                where, f"{field}.name", f"is {printable(repr(name))[:80]}, not the name of a file pg_dump writes"
            )
        if name in names:
            raise _invalid(where, f"{field}.name", f"{name!r} is listed twice")
        names.add(name)
        if not isinstance(key, str) or not key:
            raise _invalid(where, f"{field}.key", "must be a storage key")
        _count(item["size"], where, f"{field}.size", 0, MAX_FILE_BYTES)
        _count(item["stored_size"], where, f"{field}.stored_size", 0, MAX_FILE_BYTES)
        if not isinstance(item["sha256"], str) or not _SHA256.match(item["sha256"]):
            raise _invalid(where, f"{field}.sha256", "is not a SHA-256 in hex")
        files.append(BackupFile(**item))
    return tuple(files)


def check_manifest_location(
    manifest: BackupManifest, layout: BackupLayout, database: str, backup_id: str, where: str
) -> None:
    """Refuse a manifest that is not about the backup it is stored as, or names a key outside it.

    Every data key must be the key pgdr itself gives that file (pgdr 0.1's ``.zst`` form
    included): a manifest that points elsewhere in the bucket is never followed.
    """
    if manifest.backup_id != backup_id:
        raise _invalid(
            where, "backup_id", f"is {manifest.backup_id!r}, but the manifest is stored as backup {backup_id!r}"
        )
    if manifest.database != database:
        raise _invalid(
            where, "database", f"is {printable(manifest.database)!r}, but the manifest is stored under {database!r}"
        )
    for index, entry in enumerate(manifest.files):
        own = layout.data_key(database, backup_id, entry.name)
        allowed = (own, own + ".zst") if manifest.compressed_by == "pgdr" else (own,)
        if entry.key not in allowed:
            raise _invalid(
                where,
                f"files[{index}].key",
                f"is {printable(entry.key)[:120]!r}, outside this backup's own data folder (expected {own!r})",
            )


@dataclass(frozen=True)
class BackupEntry:
    """A complete backup as the catalog lists it: its manifest and verification status."""

    manifest: BackupManifest
    status: str  # "unverified", "verified" or "failed"
    verification: VerificationRecord | None = None

    @property
    def backup_id(self) -> str:
        return self.manifest.backup_id

    @property
    def recovery_point(self) -> datetime:
        return self.manifest.recovery_point


@dataclass(frozen=True)
class DamagedBackup:
    """A backup whose manifest or verification record cannot be used, and why."""

    backup_id: str
    problem: str


@dataclass(frozen=True)
class PartialBackup:
    """Objects under a backup id that has no manifest: an upload that never finished."""

    backup_id: str
    keys: tuple[str, ...]
    started: datetime


class BackupCatalog:
    """Read and update the backups of one database in one storage target."""

    def __init__(self, store: BackupStore, layout: BackupLayout, database: str):
        self.store = store
        self.layout = layout
        self.database = database
        self.damaged: list[DamagedBackup] = []  # what the last scan had to leave out, and why

    def _scan(self) -> dict[str, list[str]]:
        """Group every stored key of this database by backup id."""
        groups: dict[str, list[str]] = {}
        for obj in self.store.list(self.layout.database_prefix(self.database)):
            parsed = self.layout.parse(obj.key)
            if parsed and parsed[0] == self.database:
                groups.setdefault(parsed[1], []).append(obj.key)
        return groups

    def _entry(self, backup_id: str, keys: list[str] | None = None) -> BackupEntry:
        manifest = self._manifest(backup_id)
        verification_key = self.layout.verification_key(self.database, backup_id)
        verification = None
        if (keys is not None and verification_key in keys) or (keys is None and self.store.exists(verification_key)):
            verification = VerificationRecord.from_json(self.store.get_bytes(verification_key))
            if verification is None:
                self.damaged.append(
                    DamagedBackup(
                        backup_id,
                        f"its verification record {self.store.describe(verification_key)} is damaged; the backup "
                        "counts as unverified until pgdr_verify_restore verifies it again",
                    )
                )
        status = verification.status if verification else "unverified"
        return BackupEntry(manifest, status, verification)

    def _manifest(self, backup_id: str) -> BackupManifest:
        """Read and check the manifest of ``backup_id``. When its current version is not a valid manifest of this
        backup and the store keeps earlier versions (a versioned bucket; under Object Lock no one can remove them),
        use the newest valid earlier one, and record the invalid one in :attr:`damaged`: whatever wrote it (a
        damaged upload, an attacker with the workers' credentials) must be found, but the backup stays usable."""
        key = self.layout.manifest_key(self.database, backup_id)
        where = self.store.describe(key)

        def read(raw: bytes) -> BackupManifest:
            manifest = BackupManifest.from_json(raw, where)
            check_manifest_location(manifest, self.layout, self.database, backup_id, where)
            return manifest

        try:
            return read(self.store.get_bytes(key))
        except PermanentFailure as err:
            try:
                earlier = self.store.earlier_versions(key)
            except (PermanentFailure, StorageUnavailable) as lookup:  # e.g. no s3:ListBucketVersions: say the first
                log.warning("The earlier versions of %s cannot be listed (%s).", where, lookup)
                raise err from None
            for written, raw in earlier:
                try:
                    manifest = read(raw)
                except PermanentFailure:
                    continue
                self.damaged.append(
                    DamagedBackup(
                        backup_id,
                        f"pgdr reads the earlier version of its manifest written {written:%Y-%m-%d %H:%M:%S} UTC: the "
                        f"current one is not valid ({first_line(err)[:100]}). Find out what wrote it",
                    )
                )
                log.warning(
                    "The current manifest of backup %s is not valid (%s); using the one of %s.", backup_id, err, written
                )
                return manifest
            raise

    def scan(self) -> tuple[list[BackupEntry], list[PartialBackup]]:
        """Return complete backups (oldest first) and partial uploads, in one listing.

        One damaged record must not hide every other backup during an incident: a backup whose
        manifest cannot be used is left out (and listed in :attr:`damaged`, which the health DAG
        alerts on); one whose verification record cannot be read counts as unverified.
        """
        self.damaged = []
        with_manifest: list[tuple[str, list[str]]] = []
        partial: list[PartialBackup] = []
        for backup_id, keys in sorted(self._scan().items()):
            if self.layout.manifest_key(self.database, backup_id) in keys:
                with_manifest.append((backup_id, keys))
            else:
                partial.append(PartialBackup(backup_id, tuple(keys), backup_id_time(backup_id)))

        def read(item: tuple[str, list[str]]) -> BackupEntry | None:
            backup_id, keys = item
            try:
                return self._entry(backup_id, keys)
            except PermanentFailure as err:
                self.damaged.append(DamagedBackup(backup_id, str(err)))
                log.warning("Skipping backup %s of %s: %s", backup_id, self.database, err)
                return None

        # A manifest and a verification record per backup: read side by side, a week of hourly backups is a few
        # round trips to the bucket instead of 336 in a row.
        complete = [e for e in bounded_map(read, with_manifest, CATALOG_READERS, "pgdr-catalog") if e is not None]
        self.damaged.sort(key=lambda d: d.backup_id)  # as a scan one backup after another found them
        complete.sort(key=lambda e: (e.recovery_point, e.backup_id))
        return complete, partial

    def complete_ids(self) -> set[str]:
        """Return the ids of the backups that have a manifest, from one listing (no manifest is read)."""
        return {
            backup_id
            for backup_id, keys in self._scan().items()
            if self.layout.manifest_key(self.database, backup_id) in keys
        }

    def backups(self) -> list[BackupEntry]:
        """Return every complete backup, oldest first."""
        return self.scan()[0]

    def get(self, backup_id: str) -> BackupEntry:
        """Return one complete backup, or raise :class:`BackupNotFound` saying what exists."""
        if not isinstance(backup_id, str) or not is_backup_id(backup_id):
            raise BackupNotFound(
                f"{printable(repr(backup_id))[:80]} is not a pgdr backup id (they look like "
                f"20261122T093000Z-3fa2c1). Pick one from the list of backups of database {self.database!r}."
            )
        if not self.store.exists(self.layout.manifest_key(self.database, backup_id)):
            newest = [e.backup_id for e in self.backups()[-5:]]
            listing = ", ".join(reversed(newest)) if newest else "none"
            raise BackupNotFound(
                f"No complete backup {backup_id!r} of database {self.database!r} in "
                f"{self.store.describe(self.layout.database_prefix(self.database))} (a backup without a manifest "
                f"does not exist). Newest backups: {listing}."
            )
        return self._entry(backup_id)

    def latest(self, verified_only: bool = False) -> BackupEntry:
        """Return the newest complete (or newest verified) backup."""
        entries = [e for e in self.backups() if not verified_only or e.status == "verified"]
        if not entries:
            kind = "verified backup" if verified_only else "backup"
            raise BackupNotFound(
                f"Database {self.database!r} has no {kind} in "
                f"{self.store.describe(self.layout.database_prefix(self.database))}. "
                + (
                    "Run pgdr_verify_restore on a backup first, or restore 'latest'."
                    if verified_only
                    else "Run pgdr_backup first."
                )
            )
        return entries[-1]

    def find_by_run(self, dag_id: str | None, run_id: str) -> BackupEntry | None:
        """Return the backup a run of ``dag_id`` already completed, so a retry does not back up twice.

        Keyed on the DAG too: at 03:00 on the 1st, ``pgdr_drill`` and an hourly ``pgdr_backup``
        have the same scheduled run id, and one must never take the other's backup for its own.
        """
        for entry in reversed(self.backups()):
            made_by = entry.manifest.airflow
            if made_by.get("run_id") == run_id and made_by.get("dag_id") == dag_id:
                return entry
        return None

    def write_manifest(self, manifest: BackupManifest) -> str:
        """Store ``manifest``; from this moment the backup exists. Return its key."""
        key = self.layout.manifest_key(self.database, manifest.backup_id)
        self.store.put_bytes(key, manifest.to_json())
        return key

    def record_verification(self, record: VerificationRecord) -> str:
        """Store the verification record of one of this database's backups; return its key."""
        if record.status not in STATUSES or record.database not in (None, self.database):
            raise ValueError(
                f"not a verification record of a backup of {self.database!r}: {record.status!r}, {record.database!r}"
            )
        key = self.layout.verification_key(self.database, record.backup_id)
        self.store.put_bytes(key, record.to_json())
        return key

    def held_until(self, backup_id: str, keys: list[str] | None = None, now: datetime | None = None) -> datetime | None:
        """Return until when Object Lock keeps (part of) one backup from being deleted; ``None``: it may be now."""
        keys = keys if keys is not None else self._scan().get(backup_id, [])
        held = self.store.held(keys, now or datetime.now(UTC))
        return max(held.values()) if held else None

    def delete_backup(self, backup_id: str, keys: list[str] | None = None) -> int:
        """Delete one backup: the manifest first, so it is never half-visible. Return objects deleted."""
        keys = keys if keys is not None else self._scan().get(backup_id, [])
        manifest_key = self.layout.manifest_key(self.database, backup_id)
        if manifest_key in keys:
            self.store.delete([manifest_key])
        rest = [k for k in keys if k != manifest_key]
        self.store.delete(rest)
        return len(keys)
