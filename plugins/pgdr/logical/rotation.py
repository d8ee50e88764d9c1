"""Rotating the master key of client-side encryption: re-wrap data keys, never re-upload data.

Each encrypted backup's data key is stored wrapped by one master key (its manifest's ``key_id``).
When the connection's current master key changes, new backups use the new key at once; the old
backups still name the old key. :func:`rewrap_backups` opens each old backup's data key with the
old master key (checking the manifest's HMAC, so a manifest changed by someone without the key
is never re-signed), wraps it under the current one and rewrites only the manifest. The data
files, their checksums and the HMAC stay as they are. Once no retained backup names an old key
id, that key may leave the connection; :func:`keys_no_longer_needed` says which.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from pgdr.errors import PermanentFailure
from pgdr.logical.catalog import BackupCatalog
from pgdr.messages import first_line
from pgdr.storage.encryption import MasterKeys, rewrap, unlock_backup

log = logging.getLogger(__name__)


@dataclass
class RotationResult:
    """What rotating one database's backups did."""

    database: str
    key_conn_id: str
    current_key: str
    rewrapped: list[str] = field(default_factory=list)  # backup ids now wrapped by the current key
    already_current: list[str] = field(default_factory=list)
    unencrypted: list[str] = field(default_factory=list)  # taken before the plan encrypted this database
    problems: dict[str, str] = field(default_factory=dict)  # backup id -> why it was left as it is
    keys_in_use: dict[str, list[str]] = field(default_factory=dict)  # key id -> backup ids wrapped by it

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}

    def add_copy(self, target: str, other: RotationResult | None, error: str | None = None) -> None:
        """Count a second copy's backups (:mod:`pgdr.logical.copies`) in with the source's, each named with its copy:
        an old key is unneeded only when no copy needs it either; an unreadable copy keeps every key."""

        def named(backup_id: str) -> str:
            return f"{backup_id} (copy {target})"

        if other is None:
            self.problems[f"copy {target}"] = f"not re-wrapped: {error}"
            return
        self.rewrapped += [named(b) for b in other.rewrapped]
        self.already_current += [named(b) for b in other.already_current]
        self.unencrypted += [named(b) for b in other.unencrypted]
        self.problems.update({named(b): why for b, why in other.problems.items()})
        for key_id, backups in other.keys_in_use.items():
            self.keys_in_use.setdefault(key_id, []).extend(named(b) for b in backups)


def rewrap_backups(catalog: BackupCatalog, keys: MasterKeys, key_conn_id: str) -> RotationResult:
    """Re-wrap, under ``keys.current``, the data key of every backup in ``catalog`` wrapped by an older key."""
    result = RotationResult(catalog.database, key_conn_id, keys.current)
    for entry in catalog.backups():
        manifest, backup_id = entry.manifest, entry.backup_id
        record = manifest.encryption
        if record is None:
            result.unencrypted.append(backup_id)
            continue
        if record.key_id == keys.current:
            result.already_current.append(backup_id)
            result.keys_in_use.setdefault(record.key_id, []).append(backup_id)
            continue
        try:
            data_key = unlock_backup(manifest, keys)  # the old key, and the manifest's HMAC
            rotated = replace(manifest, encryption=rewrap(keys, record, manifest.database, backup_id))
            catalog.write_manifest(rotated)
            if unlock_backup(catalog.get(backup_id).manifest, keys) != data_key:  # read back what was written
                raise PermanentFailure(f"the rewritten manifest of {backup_id} does not open to the same data key")
        except PermanentFailure as err:
            result.problems[backup_id] = first_line(err)
            result.keys_in_use.setdefault(record.key_id, []).append(backup_id)
            log.error("Backup %s of %s keeps master key %r: %s", backup_id, catalog.database, record.key_id, err)
            continue
        result.rewrapped.append(backup_id)
        result.keys_in_use.setdefault(keys.current, []).append(backup_id)
        log.info(
            "Backup %s of %s: data key re-wrapped from master key %r to %r.",
            backup_id,
            catalog.database,
            record.key_id,
            keys.current,
        )
    for damaged in catalog.damaged:
        result.problems[damaged.backup_id] = first_line(damaged.problem)
    return result


def keys_no_longer_needed(keys: MasterKeys, results: list[RotationResult]) -> list[str]:
    """Return the key ids of ``keys`` that no backup in ``results`` is wrapped by (never the current one).

    A backup that could not be read (a damaged manifest) may still need any key: while there is
    one, no key is reported as unneeded.
    """
    if any(r.problems for r in results):
        return []
    in_use = {key_id for r in results for key_id in r.keys_in_use}
    return sorted(k for k in keys.keys if k != keys.current and k not in in_use)


def rotation_report(results: list[dict], keys_of) -> dict:
    """Return, per key connection, what rotating its databases' backups did and which old key ids no retained
    backup needs any more.

    :param results: every database's :meth:`RotationResult.to_dict`.
    :param keys_of: returns the master keys a key connection holds.
    :raises PermanentFailure: when a backup could not be re-wrapped (it keeps its old key, which must stay).
    """
    by_conn: dict[str, list[RotationResult]] = {}
    for raw in results:
        result = RotationResult(**raw)
        by_conn.setdefault(result.key_conn_id, []).append(result)
    report: dict = {}
    for conn_id, group in by_conn.items():
        keys = keys_of(conn_id)
        unneeded = keys_no_longer_needed(keys, group)
        report[conn_id] = {
            "current_key": keys.current,
            "rewrapped": sum(len(r.rewrapped) for r in group),
            "key_ids_in_use": sorted({k for r in group for k in r.keys_in_use}),
            "key_ids_no_longer_needed": unneeded,
            "problems": {f"{r.database}/{b}": p for r in group for b, p in r.problems.items()},
        }
        if unneeded:
            log.info(
                "Connection %r: no retained backup needs master key(s) %s any more. Remove them from the "
                "connection's previous_keys once your key escrow holds a copy (a backup restored from elsewhere "
                "may still need one).",
                conn_id,
                ", ".join(unneeded),
            )
        else:
            log.info(
                "Connection %r: every key it holds is still needed, or it holds only the current key %r.",
                conn_id,
                keys.current,
            )
    problems = {k: v for entry in report.values() for k, v in entry["problems"].items()}
    if problems:
        listed = "; ".join(f"{k}: {v}" for k, v in list(problems.items())[:5])
        raise PermanentFailure(
            f"{len(problems)} backups keep their old master key and could not be re-wrapped: {listed}. Keep "
            "every old key in the connection until they are re-wrapped, expire, or are deleted on purpose."
        )
    return report
