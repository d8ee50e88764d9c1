"""Verify-restore: which backups a run proves restorable, and what each phase works on.

A run of ``pgdr_verify_restore`` verifies, in this order of precedence: the backup its form names
(``database``, ``backup_id``; the newest of the database without an id); the backups named by the
asset events that triggered it; for a scheduled or backfill run, the backups whose recovery point
lies in its data interval (a scheduled run only takes those not yet verified, as a safety net for
missed events). A scheduled run also restores, per copy target of a database (``copies``), the newest backup in
the copy *from the copy* when its last such verification is older than ``verify_copies_every`` (:func:`copy_targets`):
the copy is proven, not assumed. The phases themselves (checksums, restore into a scratch database, integrity,
validation, owners and grants) and the record they leave (:class:`pgdr.records.VerificationRecord`)
are shared with the incident restore and the drill.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from pgdr.errors import BackupNotFound, PermanentFailure, PlanError
from pgdr.logical.catalog import VERIFICATION_PHASES, BackupCatalog, BackupEntry
from pgdr.messages import format_duration

log = logging.getLogger(__name__)

CATCH_UP_WINDOW = timedelta(hours=24)


class NothingToVerify(Exception):
    """This run has no backup to verify; the message says why (the task is skipped, not failed)."""


def named_target(res, database: str | None, backup_id: str | None, copy: str | None = None) -> dict[str, str]:
    """Return the backup a manual run's form names (``backup_id``, or the newest backup of ``database``), in copy
    target ``copy`` when it names one."""
    plan = res.plan
    if not database:
        if len(plan.databases) != 1:
            raise PlanError(
                f"Give the 'database' param with backup_id {backup_id!r}: the plan protects "
                f"{', '.join(plan.database_names)}."
            )
        database = plan.databases[0].name
    db = plan.database(database)
    try:
        source = db.storage_named(copy)
    except ValueError as err:
        raise PlanError(f"{err}. Give verify_from a copy of {db.name!r}, or leave it empty.") from None
    store, layout = res.store(source)
    catalog = BackupCatalog(store, layout, db.name)
    entry = catalog.get(backup_id) if backup_id else catalog.latest()
    target = {"database": db.name, "backup_id": entry.backup_id}
    return target | {"from": source.name} if source is not db.storage else target


def catalogs(res) -> dict[str, list[BackupEntry]]:
    """Return every complete backup of each database of the plan (one listing per database)."""
    found = {}
    for db in res.plan.databases:
        store, layout = res.store(db.storage)
        found[db.name] = BackupCatalog(store, layout, db.name).backups()
    return found


def event_targets(res, named: list[dict[str, str]]) -> list[dict[str, str]]:
    """Return the backups an asset-triggered run verifies: those its events name and no earlier run verified,
    and those whose events Airflow dropped (:func:`events_airflow_dropped`), each once."""
    for target in named:
        res.plan.database(target["database"])  # an event of a database the plan no longer protects fails the run here
    listed = catalogs(res)  # one listing per database serves both steps
    targets = not_yet_verified(named, listed)
    targets += events_airflow_dropped(res.plan, targets, listed)
    if not targets:
        raise NothingToVerify("Every backup this run's events name was verified already by an earlier run.")
    return [dict(t) for t in {(t["database"], t["backup_id"]): t for t in targets}.values()]


def interval_targets(res, start: datetime, end: datetime, backfill: bool) -> list[dict[str, str]]:
    """Return the backups whose recovery point lies in ``[start, end)``: all for a backfill, else
    the unverified ones and the copies due for a verification of their own (:func:`copy_targets`)."""
    targets = []
    for db in res.plan.databases:
        store, layout = res.store(db.storage)
        for entry in BackupCatalog(store, layout, db.name).backups():
            if start <= entry.recovery_point < end and (backfill or entry.status == "unverified"):
                targets.append({"database": db.name, "backup_id": entry.backup_id})
    if not backfill:
        targets += copy_targets(res, datetime.now(UTC))
    if not targets:
        raise NothingToVerify(
            f"No backup to verify was taken between {start:%Y-%m-%d %H:%M} and {end:%Y-%m-%d %H:%M} UTC; nothing to do."
        )
    return targets


# A daily run at the same hour finds the last verification a little less than N days old: it counts as due.
COPY_VERIFICATION_SLACK = timedelta(hours=12)


def last_copy_verification(entries: list[BackupEntry], copy: str):
    """Return the newest verification record made by restoring from copy target ``copy`` (``None``: never)."""
    made = [e.verification for e in entries if e.verification and e.verification.verified_from == copy]
    return max(made, key=lambda r: r.verified_at or "", default=None)


def copy_targets(res, now: datetime) -> list[dict[str, str]]:
    """Return, per copy target of each database, the copy's newest backup when the copy was last proven by a restore
    from it ``verify_copies_every`` ago or more (or never). A copy that cannot be read is left for the health
    check ``copy_lag`` to report; it does not stop the verification of the others."""
    targets = []
    for db in res.plan.databases:
        for copy in db.copies:
            try:
                store, layout = res.store(copy)
                entries = [e for e in BackupCatalog(store, layout, db.name).backups() if e.status != "failed"]
            except Exception as err:  # noqa: BLE001 - health's copy_lag alerts on an unreadable copy
                log.warning("Copy %r of %s cannot be read, so it is not verified this run: %s", copy.name, db.name, err)
                continue
            if not entries:
                log.warning("Copy %r of %s holds no backup yet; nothing to verify there.", copy.name, db.name)
                continue
            last = last_copy_verification(entries, copy.name)
            if last is not None and last.verified_at:
                age = now - datetime.fromisoformat(last.verified_at)
                if age < db.verify_copies_every - COPY_VERIFICATION_SLACK:
                    continue
            targets.append({"database": db.name, "backup_id": entries[-1].backup_id, "from": copy.name})
            log.info(
                "Verifying copy %r of %s by restoring its newest backup %s from the copy (verify_copies_every %s).",
                copy.name,
                db.name,
                entries[-1].backup_id,
                format_duration(db.verify_copies_every.total_seconds()),
            )
    return targets


def not_yet_verified(targets: list[dict[str, str]], listed: dict[str, list[BackupEntry]]) -> list[dict[str, str]]:
    """Leave out the event-named backups an earlier run already verified (it caught their dropped events up)."""
    kept = []
    for target in targets:
        entry = next((e for e in listed.get(target["database"], []) if e.backup_id == target["backup_id"]), None)
        if entry is None or entry.status == "unverified":
            kept.append(target)  # one deleted or damaged since is kept: its verification says what became of it
            continue
        run = entry.verification.run_id if entry.verification else None
        log.info(
            "Backup %s of %s was %s by %s already; not verifying it again.",
            target["backup_id"],
            target["database"],
            entry.status,
            run or "an earlier run",
        )
    return kept


def events_airflow_dropped(
    plan, named: list[dict[str, str]], listed: dict[str, list[BackupEntry]], now: datetime | None = None
) -> list[dict[str, str]]:
    """Return the backups an asset-triggered run must verify although no event of its names them.

    Airflow 3.3 drops asset events that arrive between the moment a run is queued for earlier
    events and the moment it is created (apache/airflow#56050, fixed in 3.4): with a fleet backed
    up in a burst, the last backups of the burst would then wait for the daily safety-net run. So
    every asset-triggered run also takes, per database, the unverified backups of the last 24 hours
    that are newer than the database's newest verified (or failed) one. Runs of this DAG never
    overlap (``max_active_runs=1``), so no other run is verifying those.
    """
    named_keys = {(t["database"], t["backup_id"]) for t in named}
    since = (now or datetime.now(UTC)) - CATCH_UP_WINDOW
    found = []
    for db in plan.databases:
        entries = listed[db.name]
        looked_at = [e.recovery_point for e in entries if e.status != "unverified"]
        newest_looked_at = max(looked_at) if looked_at else None
        for entry in entries:
            if (
                entry.status == "unverified"
                and entry.recovery_point >= since
                and (newest_looked_at is None or entry.recovery_point > newest_looked_at)
                and (db.name, entry.backup_id) not in named_keys
            ):
                found.append({"database": db.name, "backup_id": entry.backup_id})
    if found:
        log.warning(
            "Also verifying %d backup(s) whose asset events Airflow did not deliver to this run "
            "(apache/airflow#56050): %s",
            len(found),
            ", ".join(f"{t['database']} {t['backup_id']}" for t in found),
        )
    return found


def purpose_of(target: dict[str, str]) -> str:
    """Return what a verification's scratch database and the roles made for it are for (their markers say it)."""
    copy = f" from copy {target['from']}" if target.get("from") else ""
    return f"verify {target['database']} backup {target['backup_id']}{copy}"


def target_key(target: dict[str, str]) -> str:
    """Return what tells one verification of a run from another (the same backup may be verified from a copy too)."""
    return "/".join(filter(None, (target["database"], target["backup_id"], target.get("from"))))


class VerifyObjects:
    """What one phase of one verification works on: the database, its store (a copy's when the target names one in
    ``from``) and the backup."""

    def __init__(self, target: dict[str, str], res):
        self.res, self.target = res, target
        self.db = res.plan.database(target["database"])
        try:
            self.source = self.db.storage_named(target.get("from"))
        except ValueError as err:  # a copy the plan no longer has
            raise PlanError(f"{err}. Give a copy the plan names, or none.") from None
        self.store, self.layout = res.store(self.source)
        self.catalog = BackupCatalog(self.store, self.layout, self.db.name)
        try:
            self.entry = self.catalog.get(target["backup_id"])
        except BackupNotFound:  # found by find_backups: it was deleted since
            raise BackupNotFound(
                f"Backup {target['backup_id']} of database {target['database']!r} was deleted from "
                f"{self.store.describe()} while it was being "
                "verified (retention in pgdr_backup's prune_expired, or someone with access to the storage). "
                "Nothing is recorded for it. If the deletion was not expected, find out what deletes backups."
            ) from None

    @property
    def purpose(self) -> str:
        return purpose_of(self.target)

    def data_key(self, refuse_unencrypted: bool = False) -> bytes | None:
        return self.res.data_key(self.db, self.entry.manifest, self.catalog if refuse_unencrypted else None)


def forget_vanished_backup(res, target: dict[str, str]) -> None:
    """Remove what a verification wrote next to a backup that was deleted meanwhile (best effort)."""
    try:
        store, layout = res.store(res.plan.database(target["database"]).storage_named(target.get("from")))
        BackupCatalog(store, layout, target["database"]).delete_backup(target["backup_id"])
    except Exception as err:  # noqa: BLE001 - retention removes what has no manifest anyway
        log.warning("Could not remove the leftovers of deleted backup %s: %s", target["backup_id"], err)


def validation_extra(db, run_id: str) -> dict[str, Any]:
    """Return what a verification's validation report says beside the results: the run, and a superuser warning."""
    from pgdr.messages import SUPERUSER_RESTORE_WARNING

    extra = {"Airflow run": run_id}
    if db.restore_as_superuser:
        extra["Warning"] = SUPERUSER_RESTORE_WARNING
    return extra


class VerificationFailed(PermanentFailure):
    """A phase of a verify-restore did not succeed: the backup is recorded as failed."""


def record_verification(objs: VerifyObjects, phases: dict, airflow: dict, verified_at: str, receipt=None):
    """Write the verification record of ``objs``' backup from what its phases returned; return it.

    :param receipt: called with the record and its key once it is written (the evidence log's receipt), before a
        failure is raised.
    :raises VerificationFailed: after writing it, when a phase did not succeed.
    """
    from pgdr.messages import SUPERUSER_RESTORE_WARNING, verification_failed
    from pgdr.records import verify_restore_record

    db, entry = objs.db, objs.entry
    record = verify_restore_record(
        database=db.name,
        backup_id=entry.backup_id,
        recovery_point=entry.manifest.recovery_point.isoformat(),
        verified_at=verified_at,
        airflow=airflow,
        phases=phases,
        order=VERIFICATION_PHASES,
        rto_target_seconds=db.rto.total_seconds(),
        superuser_warning=SUPERUSER_RESTORE_WARNING if db.restore_as_superuser else None,
        verified_from=objs.target.get("from"),
    )
    key = objs.catalog.record_verification(record)
    log.info("Verification record written: %s (%s).", objs.store.describe(key), record.status)
    if receipt is not None:
        receipt(record, key)
    if record.failed_phase:
        raise VerificationFailed(
            verification_failed(entry.backup_id, db.name, record.failed_phase, objs.target.get("from"))
        )
    if not record.rto_met:
        log.warning(
            "RTO breached: restore took %.1fs, the plan's RTO is %.0fs.", record.restore_seconds, db.rto.total_seconds()
        )
    return record
