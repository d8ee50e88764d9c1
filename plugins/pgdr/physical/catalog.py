"""The catalog of base backups: records, chains and the recovery window.

A *base backup* is a copy of a whole server's data directory taken while it runs
(``pg_basebackup``). It is consistent only together with the WAL written while it was taken;
from its end on, replaying archived WAL brings it to any later moment. A *full* base backup
stands alone; an *incremental* one (PostgreSQL 17+) holds only the blocks changed since its
parent, so a restore combines the *chain* full → incremental → ... with ``pg_combinebackup``.

The *recovery window* of a server is the span of moments it can be recovered to: from the end
of its oldest retained base backup to the last transaction in the newest archived WAL segment.

Each base backup's record (``backup.json``) is written last: until then the backup does not
exist for any reader. Records are read from the bucket, so they are untrusted input: every
field is checked before a byte of the backup is downloaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from pgdr.errors import BackupNotFound
from pgdr.identifiers import printable
from pgdr.logical.catalog import ManifestInvalid
from pgdr.records import STATUSES, VerificationRecord
from pgdr.storage.backends import BackupStore
from pgdr.storage.layout import PhysicalLayout, is_backup_id

RECORD_FORMAT = 1
_LSN = re.compile(r"^[0-9A-F]{1,8}/[0-9A-F]{1,8}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FILE_NAME = re.compile(r"^(base|[0-9]{1,10})\.tar(\.gz|\.zst)?$|^backup_manifest$")
MAX_FILE_BYTES = 1 << 44


@dataclass(frozen=True)
class BaseBackupFile:
    """One stored file of a base backup."""

    name: str  # base.tar.zst (base.tar.gz before 2026-12), backup_manifest
    key: str
    size: int
    sha256: str


SOURCE_FIELDS = {"source", "source_conn_id", "standby_lag_s"}  # a record's ``source`` (BackupSource.summary())


@dataclass(frozen=True)
class BaseBackupRecord:
    """What pgdr knows of one base backup; stored as ``backup.json``, written last."""

    backup_id: str
    server: str
    kind: str  # "full" or "incremental"
    parent: str | None  # the base backup an incremental one builds on
    system_identifier: str  # the cluster's identity: a chain never mixes two clusters
    pg_version: int  # server_version_num
    timeline: int
    start_lsn: str
    end_lsn: str
    start_wal: str  # the first WAL segment recovery from this backup needs
    started_at: datetime
    finished_at: datetime  # recovery can reach any moment from here on
    wal_segment_size: int
    files: tuple[BaseBackupFile, ...]
    airflow: dict[str, Any] | None = None
    record_format: int = RECORD_FORMAT
    # Where pg_basebackup read it: {"source": "standby", "source_conn_id": ..., "standby_lag_s": ...} when a hot
    # standby of the server (its source_conn_id); None: the primary (the field is then left out of backup.json, so a
    # pgdr that predates it reads the record).
    source: dict[str, Any] | None = None

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, name: str) -> BaseBackupFile:
        for entry in self.files:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def summary(self, location: str) -> dict:
        """Return what the base backup's asset event and XCom say of it (plain values)."""
        return {
            "server": self.server,
            "backup_id": self.backup_id,
            "kind": self.kind,
            "parent": self.parent,
            "finished_at": self.finished_at.isoformat(),
            "stored_bytes": self.size,
            "start_wal": self.start_wal,
            "location": location,
            **(self.source or {"source": "primary"}),
        }

    def to_json(self) -> bytes:
        data = asdict(self)
        data["started_at"] = self.started_at.isoformat()
        data["finished_at"] = self.finished_at.isoformat()
        if self.source is None:
            del data["source"]
        return json.dumps(data, indent=2).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str, layout: PhysicalLayout, server: str, backup_id: str) -> BaseBackupRecord:
        """Parse and check a stored record; :class:`ManifestInvalid` if anything is off."""
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise _invalid(where, "the file", "is not JSON") from None
        fields = set(cls.__dataclass_fields__)
        if (
            not isinstance(data, dict)
            or not set(data) <= fields
            or not (fields - {"airflow", "record_format", "source"}) <= set(data)
        ):
            raise _invalid(where, "the record", f"must have the fields {', '.join(sorted(fields))}")
        if data["record_format"] != RECORD_FORMAT:
            raise _invalid(
                where,
                "record_format",
                f"is {printable(repr(data['record_format']))[:20]}; this pgdr reads format {RECORD_FORMAT}",
            )
        if data["backup_id"] != backup_id or data["server"] != server:
            raise _invalid(where, "backup_id/server", f"do not match where the record is stored ({server}/{backup_id})")
        if data["kind"] not in ("full", "incremental"):
            raise _invalid(where, "kind", "must be full or incremental")
        parent = data["parent"]
        if (data["kind"] == "full") != (parent is None) or (
            parent is not None and not (isinstance(parent, str) and is_backup_id(parent))
        ):
            raise _invalid(where, "parent", "must be a backup id for an incremental backup and null for a full one")
        if not isinstance(data["system_identifier"], str) or not data["system_identifier"].isdigit():
            raise _invalid(where, "system_identifier", "must be a string of digits")
        for name in ("pg_version", "timeline", "wal_segment_size"):
            if isinstance(data[name], bool) or not isinstance(data[name], int) or data[name] <= 0:
                raise _invalid(where, name, "must be a positive whole number")
        for name in ("start_lsn", "end_lsn"):
            if not isinstance(data[name], str) or not _LSN.match(data[name]):
                raise _invalid(where, name, "must be an LSN such as 0/3000028")
        if not isinstance(data["start_wal"], str) or not re.fullmatch(r"[0-9A-F]{24}", data["start_wal"]):
            raise _invalid(where, "start_wal", "must be a WAL segment name")
        for name in ("started_at", "finished_at"):
            try:
                data[name] = datetime.fromisoformat(data[name])
            except (TypeError, ValueError):
                raise _invalid(where, name, "must be an ISO 8601 time") from None
            if data[name].tzinfo is None:
                raise _invalid(where, name, "must carry a UTC offset")
        if data.get("airflow") is not None and not isinstance(data["airflow"], dict):
            raise _invalid(where, "airflow", "must be a mapping")
        source = data.get("source")
        if source is not None and not (
            isinstance(source, dict)
            and set(source) <= SOURCE_FIELDS
            and all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in source.values())
        ):
            raise _invalid(where, "source", f"must be a mapping of {', '.join(sorted(SOURCE_FIELDS))} to plain values")
        files = []
        if not isinstance(data["files"], list) or not data["files"]:
            raise _invalid(where, "files", "must be a non-empty list")
        for index, item in enumerate(data["files"]):
            if not isinstance(item, dict) or set(item) != set(BaseBackupFile.__dataclass_fields__):
                raise _invalid(where, f"files[{index}]", "must have the fields name, key, size, sha256")
            if not isinstance(item["name"], str) or not _FILE_NAME.match(item["name"]):
                raise _invalid(
                    where,
                    f"files[{index}].name",
                    f"is {printable(repr(item['name']))[:60]}, not a file pg_basebackup writes",
                )
            if item["key"] != layout.file_key(server, backup_id, item["name"]):
                raise _invalid(where, f"files[{index}].key", "lies outside this base backup's own folder")
            if (
                isinstance(item["size"], bool)
                or not isinstance(item["size"], int)
                or not 0 <= item["size"] <= MAX_FILE_BYTES
            ):
                raise _invalid(where, f"files[{index}].size", "must be a size in bytes")
            if not isinstance(item["sha256"], str) or not _SHA256.match(item["sha256"]):
                raise _invalid(where, f"files[{index}].sha256", "is not a SHA-256 in hex")
            files.append(BaseBackupFile(**item))
        names = [f.name for f in files]
        tars = [name for name in names if name in ("base.tar.zst", "base.tar.gz", "base.tar")]
        if "backup_manifest" not in names or len(tars) != 1 or len(set(names)) != len(names):
            raise _invalid(where, "files", "must list one base.tar(.zst/.gz) and backup_manifest, each once")
        data["files"] = tuple(files)
        return cls(**data)


def _invalid(where: str, field: str, problem: str) -> ManifestInvalid:
    return ManifestInvalid(
        f"The base backup record {where} is damaged or not pgdr's: {field} {problem}. pgdr does not use this base "
        "backup (nothing was read or written for it). Choose another moment or base backup, and find out who or "
        "what changed the storage."
    )


@dataclass(frozen=True)
class BaseBackupEntry:
    """A complete base backup as the catalog lists it, with its verification status."""

    record: BaseBackupRecord
    status: str  # "unverified", "verified" or "failed"
    verification: VerificationRecord | None = None

    @property
    def backup_id(self) -> str:
        return self.record.backup_id


class BaseBackupCatalog:
    """The base backups of one server in one storage target."""

    def __init__(self, store: BackupStore, layout: PhysicalLayout, server: str):
        self.store = store
        self.layout = layout
        self.server = server
        self.damaged: list[str] = []  # messages about records that could not be read

    def _scan(self) -> dict[str, set[str]]:
        prefix = self.layout.server_prefix(self.server)
        found: dict[str, set[str]] = {}
        for obj in self.store.list(prefix):
            backup_id, _, rest = obj.key[len(prefix) :].partition("/")
            if is_backup_id(backup_id):
                found.setdefault(backup_id, set()).add(rest)
        return found

    def _entry(self, backup_id: str, names: set[str]) -> BaseBackupEntry:
        where = self.store.describe(self.layout.record_key(self.server, backup_id))
        record = BaseBackupRecord.from_json(
            self.store.get_bytes(self.layout.record_key(self.server, backup_id)),
            where,
            self.layout,
            self.server,
            backup_id,
        )
        verification = None
        if "verification.json" in names:
            try:
                verification = VerificationRecord.from_json(
                    self.store.get_bytes(self.layout.verification_key(self.server, backup_id))
                )
            except FileNotFoundError:  # deleted since the listing
                verification = None
        return BaseBackupEntry(record, verification.status if verification else "unverified", verification)

    def backups(self) -> list[BaseBackupEntry]:
        """Return every complete base backup (one with a record), oldest first; damaged records are skipped."""
        entries = []
        self.damaged = []
        for backup_id, names in sorted(self._scan().items()):
            if "backup.json" not in names:
                continue
            try:
                entries.append(self._entry(backup_id, names))
            except ManifestInvalid as err:
                self.damaged.append(str(err))
        return sorted(entries, key=lambda e: e.record.finished_at)

    def partial(self) -> list[str]:
        """Return the ids of base backups with objects but no record (killed or failing uploads)."""
        return [backup_id for backup_id, names in sorted(self._scan().items()) if "backup.json" not in names]

    def get(self, backup_id: str) -> BaseBackupEntry:
        if not is_backup_id(backup_id):
            raise BackupNotFound(
                f"{printable(backup_id)[:80]!r} is not a base backup id (e.g. 20261122T093000Z-3fa2c1)."
            )
        names = self._scan().get(backup_id, set())
        if "backup.json" not in names:
            raise BackupNotFound(
                f"Base backup {backup_id} of server {self.server!r} does not exist in "
                f"{self.store.describe(self.layout.server_prefix(self.server))} (or is not complete)."
            )
        return self._entry(backup_id, names)

    def chain(self, entry: BaseBackupEntry, entries: list[BaseBackupEntry] | None = None) -> list[BaseBackupEntry]:
        """Return the chain a restore of ``entry`` needs: its full base backup first, ``entry`` last."""
        by_id = {e.backup_id: e for e in (entries if entries is not None else self.backups())}
        chain = [entry]
        while chain[0].record.parent is not None:
            parent = by_id.get(chain[0].record.parent)
            if parent is None:
                raise BackupNotFound(
                    f"Incremental base backup {chain[0].backup_id} of server {self.server!r} builds on "
                    f"{chain[0].record.parent}, which is missing or damaged: this chain cannot be restored. Use an "
                    "older chain, and take a new full base backup (trigger pgdr_basebackup with kind=full)."
                )
            if parent.record.system_identifier != entry.record.system_identifier or len(chain) > 1000:
                raise _invalid(
                    self.store.describe(self.layout.record_key(self.server, parent.backup_id)),
                    "parent",
                    "belongs to another cluster or forms a loop",
                )
            chain.insert(0, parent)
        return chain

    def write_record(self, record: BaseBackupRecord) -> str:
        key = self.layout.record_key(self.server, record.backup_id)
        self.store.put_bytes(key, record.to_json())
        return key

    def record_verification(self, record: VerificationRecord) -> str:
        """Store the verification record of one of this server's base backups; return its key."""
        if record.status not in STATUSES or record.server not in (None, self.server):
            raise ValueError(
                f"not a verification record of a base backup of {self.server!r}: {record.status!r}, {record.server!r}"
            )
        key = self.layout.verification_key(self.server, record.backup_id)
        self.store.put_bytes(key, record.to_json())
        return key

    def _keys(self, backup_id: str) -> list[str]:
        return [obj.key for obj in self.store.list(self.layout.base_backup_prefix(self.server, backup_id))]

    def held_until(self, backup_id: str, now: datetime) -> datetime | None:
        """Return until when Object Lock keeps (part of) one base backup from being deleted; ``None``: it may be."""
        held = self.store.held(self._keys(backup_id), now)
        return max(held.values()) if held else None

    def delete_backup(self, backup_id: str) -> int:
        keys = self._keys(backup_id)
        # The record first: from then on no reader sees a half-deleted base backup.
        record = self.layout.record_key(self.server, backup_id)
        if record in keys:
            self.store.delete([record])
        self.store.delete([k for k in keys if k != record])
        return len(keys)
