"""Retention: which backups to keep and which to delete.

A backup is kept while it is one of the newest ``keep_last`` complete backups, or while it is
younger than ``keep_days`` days. Whatever those rules say, the newest *verified* backup is kept:
it is the last backup known to restore, and deleting it would leave the database with no proven
recovery point. Partial uploads (no manifest) are deleted once older than ``partial_grace``, so
a backup still being uploaded is never touched.

The decision is a pure function of the catalog and the clock, so it is unit-tested directly and
can be shown before anything is deleted.

On a target with S3 Object Lock, a backup the policy no longer keeps may still be locked (the lock
outlasts ``keep_days``, or ``keep_last`` drops one sooner). Retention does not try to delete it:
S3 would refuse, once per run, for days. It *schedules* it (reported with the date its lock ends)
and the first run after that date deletes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pgdr.logical.catalog import BackupEntry, PartialBackup
from pgdr.plan import RetentionPolicy
from pgdr.storage.backends import delete_unless_locked

log = logging.getLogger(__name__)


@dataclass
class RetentionDecision:
    """What retention keeps and deletes, each with the reason a person would give."""

    keep: dict[str, str] = field(default_factory=dict)  # backup id -> why kept
    delete: dict[str, str] = field(default_factory=dict)  # backup id -> why deleted
    delete_partial: dict[str, str] = field(default_factory=dict)


def decide_retention(
    backups: list[BackupEntry],
    partials: list[PartialBackup],
    policy: RetentionPolicy,
    now: datetime,
) -> RetentionDecision:
    """Apply ``policy`` at time ``now`` to the complete ``backups`` and the ``partials``.

    :param backups: complete backups in any order.
    """
    decision = RetentionDecision()
    newest_first = sorted(backups, key=lambda e: (e.recovery_point, e.backup_id), reverse=True)
    newest_verified = next((e.backup_id for e in newest_first if e.status == "verified"), None)
    cutoff = now - timedelta(days=policy.keep_days)
    for rank, entry in enumerate(newest_first, start=1):
        if rank <= policy.keep_last:
            decision.keep[entry.backup_id] = f"one of the newest {policy.keep_last}"
        elif entry.recovery_point >= cutoff:
            decision.keep[entry.backup_id] = f"younger than {policy.keep_days} days"
        elif entry.backup_id == newest_verified:
            decision.keep[entry.backup_id] = "the newest verified backup"
        else:
            age = now - entry.recovery_point
            decision.delete[entry.backup_id] = (
                f"number {rank} by age (keep_last {policy.keep_last}) and {age.days} days old (keep_days "
                f"{policy.keep_days})"
            )
    for partial in partials:
        if now - partial.started > policy.partial_grace:
            decision.delete_partial[partial.backup_id] = (
                f"partial upload with no manifest, started {partial.started:%Y-%m-%d %H:%M} UTC"
            )
    return decision


def apply_retention(catalog, policy: RetentionPolicy, now: datetime) -> dict:
    """Apply ``policy`` to one database's backups (:func:`decide_retention`); return what was kept and deleted."""
    database = catalog.database
    complete, partials = catalog.scan()
    decision = decide_retention(complete, partials, policy, now)
    keys_by_id = {p.backup_id: list(p.keys) for p in partials}
    scheduled: dict[str, str] = {}

    def delete(backup_id: str, why: str, keys: list[str] | None = None) -> bool:
        return delete_unless_locked(
            f"Backup {backup_id} of {database}",
            why,
            catalog.held_until(backup_id, keys, now),
            lambda: catalog.delete_backup(backup_id, keys),
            scheduled,
            backup_id,
        )

    deleted = [backup_id for backup_id, why in decision.delete.items() if delete(backup_id, why)]
    deleted_partial = [b for b, why in decision.delete_partial.items() if delete(b, why, keys_by_id[b])]
    for backup_id, why in decision.keep.items():
        log.info("Keeping backup %s of %s: %s.", backup_id, database, why)
    return {
        "database": database,
        "kept": sorted(decision.keep),
        "deleted": sorted(deleted),
        "deleted_partial": sorted(deleted_partial),
        "scheduled": scheduled,
    }
