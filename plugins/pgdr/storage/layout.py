"""Where every object lives in the storage target: the one place storage keys are built.

Layout version 1, under the target's prefix::

    v1/<database>/<backup_id>/data/<dump file>.zst     the pg_dump directory, file by file
    v1/<database>/<backup_id>/manifest.json            written last: the backup exists from then on
    v1/<database>/<backup_id>/verification.json        the verify-restore result (verified / failed)
    v1/<database>/<backup_id>/validation/...           Great Expectations results and report
    v1/<database>/<backup_id>/restores/<run>.{json,md} incident restore reports
    v1/reports/...                                     drill reports
    v1/_alerts/...                                     alert journal: failures per run, alerting state
    v1/_probe/...                                      health-check probe objects

Point-in-time recovery has a layout version of its own, ``pitr-v1/``, beside ``v1/``::

    pitr-v1/base/<server>/<backup_id>/base.tar.zst       pg_basebackup's tar, zstd (base.tar.gz before 2026-12)
    pitr-v1/base/<server>/<backup_id>/backup_manifest    PostgreSQL's own manifest (CRC32C of every file; SHA-256
                                                         in the gzip'd ones)
    pitr-v1/base/<server>/<backup_id>/backup.json        written last: the base backup exists from then on
    pitr-v1/base/<server>/<backup_id>/verification.json  the stored bytes checked, recoveries
    pitr-v1/wal/<server>/wals/...                        the WAL archive: barman-cloud's layout, written
                                                         only by the server's archive_command

A backup id is the UTC time of its recovery point plus a short random tag
(``20261122T093000Z-3fa2c1``): ids sort in time order and never collide.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

LAYOUT_VERSION = "v1"
PITR_LAYOUT_VERSION = "pitr-v1"
_BACKUP_ID = re.compile(r"^(\d{8}T\d{6}Z)-([0-9a-f]{6})$")


def new_backup_id(recovery_point: datetime) -> str:
    """Return a fresh backup id for a backup whose recovery point is ``recovery_point``."""
    stamp = recovery_point.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


def is_backup_id(text: str) -> bool:
    """Say whether ``text`` has the shape of a backup id."""
    return bool(_BACKUP_ID.match(text))


def backup_id_time(backup_id: str) -> datetime:
    """Return the recovery-point time encoded in ``backup_id``."""
    match = _BACKUP_ID.match(backup_id)
    if not match:
        raise ValueError(f"{backup_id!r} is not a pgdr backup id (expected e.g. 20261122T093000Z-3fa2c1)")
    return datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


@dataclass(frozen=True)
class BackupLayout:
    """Build storage keys for one storage target (``prefix`` may be empty)."""

    prefix: str = ""

    def _key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, LAYOUT_VERSION, *parts) if p)

    def database_prefix(self, database: str) -> str:
        """Return the key prefix (ending in ``/``) under which all backups of ``database`` live."""
        return self._key(database) + "/"

    def backup_prefix(self, database: str, backup_id: str) -> str:
        """Return the key prefix (ending in ``/``) of one backup."""
        return self._key(database, backup_id) + "/"

    def data_key(self, database: str, backup_id: str, file_name: str) -> str:
        """Return the key of one dump file, stored under the name pg_dump gave it (``3001.dat.gz``).

        Readers take data keys from the manifest, never from here: pgdr 0.1 stored its own zstd
        files as ``<name>.zst``, and those backups stay readable.
        """
        return self._key(database, backup_id, "data", file_name)

    def manifest_key(self, database: str, backup_id: str) -> str:
        """Return the key of a backup's manifest."""
        return self._key(database, backup_id, "manifest.json")

    def verification_key(self, database: str, backup_id: str) -> str:
        """Return the key of a backup's verification record."""
        return self._key(database, backup_id, "verification.json")

    def validation_key(self, database: str, backup_id: str, name: str) -> str:
        """Return the key of a validation artefact (GX results, HTML report) of a backup."""
        return self._key(database, backup_id, "validation", name)

    def restore_report_key(self, database: str, backup_id: str, name: str) -> str:
        """Return the key of an incident-restore report about a backup."""
        return self._key(database, backup_id, "restores", name)

    def report_key(self, *parts: str) -> str:
        """Return the key of a drill or health report."""
        return self._key("reports", *parts)

    def incident_key(self, declared: str, name: str) -> str:
        """Return the key of an incident's record (its MTTR and data-loss window), kept past backup retention for the
        drill's MTTR trend: ``reports/incidents/<declared, UTC>-<name>.json``."""
        return self.report_key("incidents", f"{declared}-{name}.json")

    def alert_key(self, *parts: str) -> str:
        """Return the key of an alert-journal object (failures of a run, alerting state)."""
        return self._key("_alerts", *parts)

    def probe_key(self, name: str) -> str:
        """Return the key of a storage health-probe object."""
        return self._key("_probe", name)

    def parse(self, key: str) -> tuple[str, str, str] | None:
        """Split a key into ``(database, backup_id, rest)``, or ``None`` if it is not a backup object."""
        head = self._key() + "/"
        if not key.startswith(head):
            return None
        parts = key[len(head) :].split("/", 2)
        if len(parts) < 3 or not is_backup_id(parts[1]):
            return None
        return parts[0], parts[1], parts[2]


@dataclass(frozen=True)
class PhysicalLayout:
    """Build storage keys of base backups and the WAL archive of one S3 target (``prefix`` may be empty)."""

    prefix: str = ""

    def _key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, PITR_LAYOUT_VERSION, *parts) if p)

    def incident_key(self, declared: str, name: str) -> str:
        """Return the key of a server recovery's incident record: where the logical layout of the same target keeps
        every incident's (:meth:`BackupLayout.incident_key`), which the drill's MTTR trend reads."""
        return BackupLayout(self.prefix).incident_key(declared, name)

    def server_prefix(self, server: str) -> str:
        """Return the key prefix (ending in ``/``) under which all base backups of ``server`` live."""
        return self._key("base", server) + "/"

    def recovery_report_key(self, server: str, started: str, host: str) -> str:
        """Return the key (without suffix) of a whole-server recovery's report: ``recoveries/<UTC time>-<host>``."""
        import re

        return self._key("base", server, "recoveries", f"{started}-{re.sub(r'[^A-Za-z0-9._-]', '_', host)[:60]}")

    def base_backup_prefix(self, server: str, backup_id: str) -> str:
        """Return the key prefix (ending in ``/``) of one base backup."""
        return self._key("base", server, backup_id) + "/"

    def file_key(self, server: str, backup_id: str, file_name: str) -> str:
        """Return the key of one file of a base backup (``base.tar.gz``, ``backup_manifest``)."""
        return self._key("base", server, backup_id, file_name)

    def record_key(self, server: str, backup_id: str) -> str:
        """Return the key of a base backup's record, written last."""
        return self._key("base", server, backup_id, "backup.json")

    def verification_key(self, server: str, backup_id: str) -> str:
        """Return the key of a base backup's verification record."""
        return self._key("base", server, backup_id, "verification.json")

    def wal_archive_prefix(self) -> str:
        """Return the key prefix barman-cloud is given as its destination (it adds ``<server>/wals/``)."""
        return self._key("wal")

    def wal_segments_prefix(self, server: str) -> str:
        """Return the key prefix (ending in ``/``) of ``server``'s archived WAL, as barman-cloud lays it out."""
        return self._key("wal", server, "wals") + "/"
