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
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from pgdr.errors import BackupNotFound, PermanentFailure
from pgdr.layout import BackupLayout, backup_id_time
from pgdr.storage import BackupStore

MANIFEST_FORMAT = 1


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
        text = f"{self.stored_size / 1e6:.1f} MB stored ({self.compression})"
        if self.database_bytes:
            text += f", from a {self.database_bytes / 1e6:.1f} MB database"
        return text

    def to_json(self) -> bytes:
        """Serialise the manifest as indented JSON."""
        data = asdict(self)
        for key in ("recovery_point", "started_at", "finished_at"):
            data[key] = getattr(self, key).isoformat()
        data["size"] = self.size
        data["stored_size"] = self.stored_size
        return json.dumps(data, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> BackupManifest:
        """Parse a manifest; a damaged one raises :class:`PermanentFailure` naming ``where``."""
        try:
            data = json.loads(raw)
            data.pop("size", None)
            data.pop("stored_size", None)
            for key in ("recovery_point", "started_at", "finished_at"):
                data[key] = datetime.fromisoformat(data[key])
            data["files"] = tuple(BackupFile(**f) for f in data["files"])
            return cls(**data)
        except (ValueError, KeyError, TypeError) as err:
            raise PermanentFailure(
                f"The manifest {where} is damaged or not a pgdr manifest ({type(err).__name__}: {err}). "
                "Treat this backup as unusable; choose another backup."
            ) from None


@dataclass(frozen=True)
class BackupEntry:
    """A complete backup as the catalog lists it: its manifest and verification status."""

    manifest: BackupManifest
    status: str  # "unverified", "verified" or "failed"
    verification: dict[str, Any] | None = None

    @property
    def backup_id(self) -> str:
        return self.manifest.backup_id

    @property
    def recovery_point(self) -> datetime:
        return self.manifest.recovery_point


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

    def _scan(self) -> dict[str, list[str]]:
        """Group every stored key of this database by backup id."""
        groups: dict[str, list[str]] = {}
        for obj in self.store.list(self.layout.database_prefix(self.database)):
            parsed = self.layout.parse(obj.key)
            if parsed and parsed[0] == self.database:
                groups.setdefault(parsed[1], []).append(obj.key)
        return groups

    def _entry(self, backup_id: str, keys: list[str] | None = None) -> BackupEntry:
        manifest_key = self.layout.manifest_key(self.database, backup_id)
        manifest = BackupManifest.from_json(self.store.get_bytes(manifest_key), self.store.describe(manifest_key))
        verification_key = self.layout.verification_key(self.database, backup_id)
        verification = None
        if (keys is not None and verification_key in keys) or (keys is None and self.store.exists(verification_key)):
            verification = json.loads(self.store.get_bytes(verification_key))
        status = verification["status"] if verification else "unverified"
        return BackupEntry(manifest, status, verification)

    def scan(self) -> tuple[list[BackupEntry], list[PartialBackup]]:
        """Return complete backups (oldest first) and partial uploads, in one listing."""
        complete: list[BackupEntry] = []
        partial: list[PartialBackup] = []
        for backup_id, keys in sorted(self._scan().items()):
            if self.layout.manifest_key(self.database, backup_id) in keys:
                complete.append(self._entry(backup_id, keys))
            else:
                partial.append(PartialBackup(backup_id, tuple(keys), backup_id_time(backup_id)))
        complete.sort(key=lambda e: (e.recovery_point, e.backup_id))
        return complete, partial

    def backups(self) -> list[BackupEntry]:
        """Return every complete backup, oldest first."""
        return self.scan()[0]

    def get(self, backup_id: str) -> BackupEntry:
        """Return one complete backup, or raise :class:`BackupNotFound` saying what exists."""
        if not self.store.exists(self.layout.manifest_key(self.database, backup_id)):
            newest = [e.backup_id for e in self.backups()[-5:]]
            listing = ", ".join(reversed(newest)) if newest else "none"
            raise BackupNotFound(
                f"No complete backup {backup_id!r} of database {self.database!r} in "
                f"{self.store.describe(self.layout.database_prefix(self.database))} "
                f"(a backup without a manifest does not exist). Newest backups: {listing}."
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
                + ("Run pgdr_verify_restore on a backup first, or restore 'latest'." if verified_only
                   else "Run pgdr_backup first.")
            )
        return entries[-1]

    def find_by_run(self, run_id: str) -> BackupEntry | None:
        """Return the backup an Airflow run already completed, so a retry does not back up twice."""
        for entry in reversed(self.backups()):
            if entry.manifest.airflow.get("run_id") == run_id:
                return entry
        return None

    def write_manifest(self, manifest: BackupManifest) -> str:
        """Store ``manifest``; from this moment the backup exists. Return its key."""
        key = self.layout.manifest_key(self.database, manifest.backup_id)
        self.store.put_bytes(key, manifest.to_json())
        return key

    def record_verification(self, backup_id: str, record: dict[str, Any]) -> str:
        """Store the verification record (``status`` is ``verified`` or ``failed``) of a backup."""
        if record.get("status") not in ("verified", "failed"):
            raise ValueError(f"verification status must be 'verified' or 'failed', got {record.get('status')!r}")
        key = self.layout.verification_key(self.database, backup_id)
        self.store.put_bytes(key, json.dumps(record, indent=2, sort_keys=True, default=str).encode())
        return key

    def delete_backup(self, backup_id: str, keys: list[str] | None = None) -> int:
        """Delete one backup: the manifest first, so it is never half-visible. Return objects deleted."""
        keys = keys if keys is not None else self._scan().get(backup_id, [])
        manifest_key = self.layout.manifest_key(self.database, backup_id)
        if manifest_key in keys:
            self.store.delete([manifest_key])
        rest = [k for k in keys if k != manifest_key]
        self.store.delete(rest)
        return len(keys)
