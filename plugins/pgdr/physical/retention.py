"""Retention by recovery window: keep what recovering to any moment of the last ``keep_window`` needs.

To recover to the moment ``now - keep_window`` pgdr needs the newest base backup that ended at
or before it (the *anchor*), the chain that backup builds on, and every WAL segment from the
anchor's start on. Every newer base backup is kept too (each is a faster starting point), with
its chain. So is the newest verified chain, however old: a chain proven restorable is never
deleted for one that is not. Everything older goes, and with it the WAL no kept base backup
needs. Uploads without a record (killed runs) go after a grace period.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pgdr.physical.archive import WalSegment, segment_number
from pgdr.physical.catalog import BaseBackupEntry
from pgdr.storage.backends import delete_unless_locked
from pgdr.storage.layout import backup_id_time

log = logging.getLogger(__name__)


@dataclass
class PitrRetentionDecision:
    """Which base backups and WAL segments to keep or delete, each with its reason."""

    keep: dict[str, str] = field(default_factory=dict)
    delete: dict[str, str] = field(default_factory=dict)
    delete_partial: list[str] = field(default_factory=list)
    delete_wal_before: str | None = None  # segments older than this one are needed by no kept base backup
    oldest_recoverable: datetime | None = None


def _chain_ids(entry: BaseBackupEntry, by_id: dict[str, BaseBackupEntry]) -> list[str]:
    ids = [entry.backup_id]
    while by_id[ids[-1]].record.parent is not None and by_id[ids[-1]].record.parent in by_id:
        ids.append(by_id[ids[-1]].record.parent)
    return ids


def decide_pitr_retention(
    entries: list[BaseBackupEntry],
    partial: list[str],
    keep_window: timedelta,
    now: datetime,
    partial_grace: timedelta = timedelta(hours=6),
) -> PitrRetentionDecision:
    """Decide what the recovery window ``keep_window`` keeps of ``entries`` (complete base backups)."""
    decision = PitrRetentionDecision()
    by_id = {e.backup_id: e for e in entries}
    ordered = sorted(entries, key=lambda e: e.record.finished_at)
    cutoff = now - keep_window
    anchors = [e for e in ordered if e.record.finished_at <= cutoff]
    first_kept = ordered.index(anchors[-1]) if anchors else 0
    for entry in ordered[first_kept:]:
        why = "starts the recovery window" if anchors and entry is anchors[-1] else "inside the recovery window"
        for member in _chain_ids(entry, by_id):
            decision.keep.setdefault(member, why if member == entry.backup_id else f"in the chain of {entry.backup_id}")
    verified = [e for e in ordered if e.status == "verified"]
    if verified:
        for member in _chain_ids(verified[-1], by_id):
            decision.keep.setdefault(member, "the newest verified chain")
    for entry in ordered:
        if entry.backup_id not in decision.keep:
            decision.delete[entry.backup_id] = (
                f"ended {entry.record.finished_at:%Y-%m-%d %H:%M} UTC, before the {keep_window} recovery window"
            )
    kept = [by_id[i] for i in decision.keep]
    if kept:
        oldest = min(kept, key=lambda e: segment_number(e.record.start_wal, e.record.wal_segment_size))
        decision.delete_wal_before = oldest.record.start_wal
        decision.oldest_recoverable = min(e.record.finished_at for e in kept)
    for backup_id in partial:
        if now - backup_id_time(backup_id) > partial_grace:
            decision.delete_partial.append(backup_id)
    return decision


def expired_segments(segments: list[WalSegment], delete_before: str | None, segment_size: int) -> list[WalSegment]:
    """Return the archived segments older than ``delete_before`` (none when nothing is kept)."""
    if delete_before is None:
        return []
    limit = segment_number(delete_before, segment_size)
    return [s for s in segments if s.number(segment_size) < limit]


def apply_pitr_retention(catalog, archive, store, policy, now: datetime) -> dict:
    """Apply the recovery-window retention of one server (:func:`decide_pitr_retention`); return what it did.

    :param policy: the server's :class:`~pgdr.plan.PitrPolicy` (``keep_window``, ``partial_grace``).
    """
    server = catalog.server
    entries = catalog.backups()
    decision = decide_pitr_retention(entries, catalog.partial(), policy.keep_window, now, policy.partial_grace)
    # Under S3 Object Lock a base backup or segment past the window may still be locked: scheduled, not tried.
    scheduled: dict[str, str] = {}

    def delete(backup_id: str, why: str) -> bool:
        return delete_unless_locked(
            f"Base backup {backup_id} of {server}",
            why,
            catalog.held_until(backup_id, now),
            lambda: catalog.delete_backup(backup_id),
            scheduled,
            backup_id,
        )

    deleted = [backup_id for backup_id, why in decision.delete.items() if delete(backup_id, why)]
    deleted_partial = [
        backup_id
        for backup_id in decision.delete_partial
        if delete(backup_id, "unfinished: no record, older than the grace period")
    ]
    segment_size = entries[0].record.wal_segment_size if entries else 16 * 1024 * 1024
    expired = expired_segments(archive.segments(store), decision.delete_wal_before, segment_size)
    held = store.held([s.key for s in expired], now) if expired else {}
    if held:
        log.info(
            "%d WAL segments older than %s are under Object Lock until %s UTC at the latest: deleted once it ends.",
            len(held),
            decision.delete_wal_before,
            f"{max(held.values()):%Y-%m-%d %H:%M}",
        )
        expired = [s for s in expired if s.key not in held]
    if expired:
        log.info(
            "Deleting %d WAL segments older than %s (needed by no kept base backup).",
            len(expired),
            decision.delete_wal_before,
        )
        store.delete([s.key for s in expired])
    for backup_id, why in decision.keep.items():
        log.info("Keeping base backup %s of %s: %s.", backup_id, server, why)
    return {
        "server": server,
        "kept": sorted(decision.keep),
        "deleted": sorted(deleted),
        "deleted_partial": deleted_partial,
        "scheduled": scheduled,
        "wal_segments_deleted": len(expired),
        "wal_segments_held": len(held),
        "oldest_recoverable": decision.oldest_recoverable.isoformat() if decision.oldest_recoverable else None,
    }
