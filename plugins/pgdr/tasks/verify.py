"""What the tasks of ``pgdr_verify_restore`` do: prove one backup restorable, phase by phase, and record it."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from pgdr.airflow_glue.notify import CONTEXT_BACKUP_ID, CONTEXT_DATABASE
from pgdr.errors import BackupNotFound
from pgdr.logical.catalog import VERIFICATION_PHASES as VERIFY_PHASES
from pgdr.messages import SUPERUSER_RESTORE_WARNING
from pgdr.tasks.common import (
    _now,
    create_run_scratch,
    drop_scratch_and_roles,
    fail_fast,
    restore_into_scratch,
    run_scratch,
    task_workdir,
)

log = logging.getLogger(__name__)


def resolve_verification_targets(context) -> list[dict[str, str]]:
    """Body of ``find_backups``: which backups this run verifies.

    In order: the ``backup_id``/``database`` params of a manual run; the backups named by the
    asset events that triggered the run; for a scheduled or backfill run, the backups whose
    recovery point lies in the run's data interval (a scheduled run only takes those not yet
    verified, as a safety net for missed events).
    """
    from airflow.sdk.exceptions import AirflowSkipException

    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.plan import load_plan

    with fail_fast():
        plan = load_plan()
        params = context.get("params") or {}
        database, backup_id = params.get("database"), params.get("backup_id")
        if backup_id or database:
            if not database:
                if len(plan.databases) != 1:
                    from pgdr.errors import PlanError

                    raise PlanError(
                        f"Give the 'database' param with backup_id {backup_id!r}: the plan protects "
                        f"{', '.join(plan.database_names)}."
                    )
                database = plan.databases[0].name
            db = plan.database(database)
            store, layout = open_store(db.storage, plan)
            catalog = BackupCatalog(store, layout, db.name)
            entry = catalog.get(backup_id) if backup_id else catalog.latest()
            return [{"database": db.name, "backup_id": entry.backup_id}]

        events = context.get("triggering_asset_events") or {}
        targets = []
        for asset_events in events.values():
            for event in asset_events:
                extra = event.extra or {}
                if extra.get("database") and extra.get("backup_id"):
                    targets.append({"database": extra["database"], "backup_id": extra["backup_id"]})
        if targets:
            catalogs = _catalogs(plan)  # one listing per database serves both steps
            targets = _not_yet_verified(plan, targets, catalogs)
            targets += _events_airflow_dropped(plan, targets, catalogs)
            if not targets:
                raise AirflowSkipException("Every backup this run's events name was verified already by an earlier run.")
            return [dict(t) for t in {(t["database"], t["backup_id"]): t for t in targets}.values()]

        start, end = context.get("data_interval_start"), context.get("data_interval_end")
        if start is None or end is None:
            raise AirflowSkipException("This run names no backup (no params, no asset event, no data interval).")
        run_type = str(getattr(context["dag_run"].run_type, "value", context["dag_run"].run_type))
        for db in plan.databases:
            store, layout = open_store(db.storage, plan)
            for entry in BackupCatalog(store, layout, db.name).backups():
                if start <= entry.recovery_point < end and (run_type == "backfill" or entry.status == "unverified"):
                    targets.append({"database": db.name, "backup_id": entry.backup_id})
    if not targets:
        raise AirflowSkipException(
            f"No backup to verify was taken between {start:%Y-%m-%d %H:%M} and {end:%Y-%m-%d %H:%M} UTC; nothing to do."
        )
    return targets


CATCH_UP_WINDOW = timedelta(hours=24)


def _catalogs(plan) -> dict[str, list]:
    """Return every complete backup of each database of the plan (one listing per database)."""
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog

    catalogs = {}
    for db in plan.databases:
        store, layout = open_store(db.storage, plan)
        catalogs[db.name] = BackupCatalog(store, layout, db.name).backups()
    return catalogs


def _not_yet_verified(plan, targets: list[dict[str, str]], catalogs: dict[str, list]) -> list[dict[str, str]]:
    """Leave out the event-named backups an earlier run already verified (it caught their dropped events up)."""
    kept = []
    for target in targets:
        db = plan.database(target["database"])
        entry = next((e for e in catalogs[db.name] if e.backup_id == target["backup_id"]), None)
        if entry is None:
            kept.append(target)  # deleted or damaged since: its verification says what became of it
            continue
        if entry.status == "unverified":
            kept.append(target)
        else:
            run = (entry.verification or {}).get("airflow", {}).get("run_id", "an earlier run")
            log.info("Backup %s of %s was %s by %s already; not verifying it again.",
                     target["backup_id"], db.name, entry.status, run)
    return kept


def _events_airflow_dropped(plan, named: list[dict[str, str]], catalogs: dict[str, list]) -> list[dict[str, str]]:
    """Return the backups an asset-triggered run must verify although no event of its names them.

    Airflow 3.3 drops asset events that arrive between the moment a run is queued for earlier
    events and the moment it is created (apache/airflow#56050, fixed in 3.4): with a fleet backed
    up in a burst, the last backups of the burst would then wait for the daily safety-net run. So
    every asset-triggered run also takes, per database, the unverified backups of the last 24 hours
    that are newer than the database's newest verified (or failed) one. Runs of this DAG never
    overlap (``max_active_runs=1``), so no other run is verifying those.
    """
    named_keys = {(t["database"], t["backup_id"]) for t in named}
    since = datetime.now(UTC) - CATCH_UP_WINDOW
    found = []
    for db in plan.databases:
        entries = catalogs[db.name]
        looked_at = [e.recovery_point for e in entries if e.status != "unverified"]
        newest_looked_at = max(looked_at) if looked_at else None
        for entry in entries:
            if (entry.status == "unverified" and entry.recovery_point >= since
                    and (newest_looked_at is None or entry.recovery_point > newest_looked_at)
                    and (db.name, entry.backup_id) not in named_keys):
                found.append({"database": db.name, "backup_id": entry.backup_id})
    if found:
        log.warning(
            "Also verifying %d backup(s) whose asset events Airflow did not deliver to this run "
            "(apache/airflow#56050): %s", len(found), ", ".join(f"{t['database']} {t['backup_id']}" for t in found),
        )
    return found


def _verify_context(target: dict[str, str], context):
    """Load the plan objects one verification phase needs, and label the task for alerts."""
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.plan import load_plan

    context[CONTEXT_DATABASE] = target["database"]
    context[CONTEXT_BACKUP_ID] = target["backup_id"]
    plan = load_plan()
    db = plan.database(target["database"])
    store, layout = open_store(db.storage, plan)
    try:
        entry = BackupCatalog(store, layout, db.name).get(target["backup_id"])
    except BackupNotFound:  # find_backups found it: it was deleted since
        raise BackupNotFound(
            f"Backup {target['backup_id']} of database {target['database']!r} was deleted while it was being "
            "verified (retention in pgdr_backup's prune_expired, or someone with access to the storage). Nothing "
            "is recorded for it. If the deletion was not expected, find out what deletes backups."
        ) from None
    return plan, db, store, layout, entry


def run_check_checksums(target: dict[str, str], context) -> dict[str, Any]:
    """Body of ``check_checksums``: every stored file against the manifest's SHA-256."""
    from pgdr.airflow_glue.connections import backup_data_key
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.logical.restore import verify_checksums

    started = _now()
    with fail_fast():
        plan, db, store, layout, entry = _verify_context(target, context)
        data_key = backup_data_key(db, entry.manifest, plan, BackupCatalog(store, layout, db.name))
        result = verify_checksums(entry.manifest, store, workers=max(2, db.dump_jobs), data_key=data_key)
    log.info(
        "All %d files of backup %s (%.1f MB) match their SHA-256 in the manifest (%.1fs).",
        len(entry.manifest.files), entry.backup_id, entry.manifest.stored_size / 1e6, result["seconds"],
    )
    return {"started_at": started, "finished_at": _now(), **result}


def _purpose(target: dict[str, str]) -> str:
    return f"verify {target['database']} backup {target['backup_id']}"


def _scratch_for(target: dict[str, str], context, db, plan):
    return run_scratch("verify", db, plan, context, f"{target['database']}/{target['backup_id']}")


def run_create_scratch(target: dict[str, str], context) -> str:
    """Body of the ``create_scratch`` setup task: drop leftovers of killed runs, create ours."""
    with fail_fast():
        plan, db, _store, _layout, _entry = _verify_context(target, context)
        return create_run_scratch(
            _scratch_for(target, context, db, plan), "verify", db.name, f"verify {db.name} backup {target['backup_id']}", context
        )


def run_restore_backup(target: dict[str, str], scratch_name: str, context) -> dict[str, Any]:
    """Body of ``restore_backup``: download (verifying again), ``pg_restore -j``.

    The scratch database is made again with the backup's encoding and locale, and the roles the
    backup names that the verification server lacks are created as on the source server, without
    passwords (dropped again with the scratch database when nothing else uses them), so a backup whose owners and grants cannot be
    given back fails today, not during an incident.
    """
    from pgdr.airflow_glue.connections import backup_data_key
    from pgdr.logical.restore import download_backup

    started = _now()
    with fail_fast():
        plan, db, store, _layout, entry = _verify_context(target, context)
        scratch = _scratch_for(target, context, db, plan)
        purpose = _purpose(target)
        with task_workdir(context, f"restore-{db.name}") as workdir:
            download = download_backup(entry.manifest, store, workdir / "dump", workers=max(2, db.dump_jobs),
                                       data_key=backup_data_key(db, entry.manifest, plan))
            restore_s, created = restore_into_scratch(scratch, workdir / "dump", db.dump_jobs, workdir, purpose, context)
    log.info(
        "Backup %s restored into %s: download and verify %.1fs, pg_restore -j%d %.1fs.",
        entry.backup_id, scratch_name, download["seconds"], db.dump_jobs, restore_s,
    )
    return {"started_at": started, "finished_at": _now(), "download_seconds": download["seconds"], "restore_seconds": restore_s,
            "roles_created": created}


def run_check_integrity(target: dict[str, str], scratch_name: str, context) -> dict[str, Any]:
    """Body of ``check_integrity``: exact row counts, pg_amcheck, sequences."""
    from pgdr.checks.integrity import check_integrity

    started = _now()
    with fail_fast():
        plan, db, _store, _layout, entry = _verify_context(target, context)
        scratch = _scratch_for(target, context, db, plan)
        with task_workdir(context, f"amcheck-{db.name}") as workdir:
            report = check_integrity(scratch.endpoint, entry.manifest, workdir, jobs=db.dump_jobs, admin=scratch.server)
    return {"started_at": started, "finished_at": _now(), **report.to_dict()}


def run_validate_data(target: dict[str, str], scratch_name: str, context) -> dict[str, Any]:
    """Body of ``validate_data``: GX baseline and user suites; results stored next to the backup."""
    from pgdr.checks.validation import failure_error, render_html, validate_restored

    started = _now()
    with fail_fast():
        plan, db, store, layout, entry = _verify_context(target, context)
        scratch = _scratch_for(target, context, db, plan)
        report = validate_restored(scratch.endpoint, entry.manifest)
        results_key = layout.validation_key(db.name, entry.backup_id, "results.json")
        html_key = layout.validation_key(db.name, entry.backup_id, "report.html")
        store.put_bytes(results_key, report.to_json())
        extra = {"Airflow run": context["ti"].run_id}
        if db.restore_as_superuser:
            extra["Warning"] = SUPERUSER_RESTORE_WARNING
        store.put_bytes(html_key, render_html(report, entry.manifest, extra))
        log.info("Validation report: %s", store.describe(html_key))
        if not report.ok:
            raise failure_error(report, entry.manifest, store.describe(html_key))
    return {
        "started_at": started, "finished_at": _now(), "seconds": report.seconds,
        "summary": report.summary(), "results_key": results_key, "report_key": html_key,
        "report": store.describe(html_key),
    }


def run_apply_privileges(target: dict[str, str], scratch_name: str, context) -> dict[str, Any]:
    """Body of ``apply_privileges``: the backup's owners, grants and settings on the scratch copy, as a restore would."""
    from pgdr.airflow_glue.connections import backup_data_key
    from pgdr.logical.restore import give_back_privileges

    started = _now()
    with fail_fast():
        plan, db, store, _layout, entry = _verify_context(target, context)
        scratch = _scratch_for(target, context, db, plan)
        with task_workdir(context, f"privileges-{db.name}") as workdir:
            report = give_back_privileges(entry.manifest, store, scratch.server.with_dbname(scratch.name), workdir,
                                          backup_data_key(db, entry.manifest, plan), scratch=True,
                                          skip=db.skip_objects)
    return {"started_at": started, "finished_at": _now(), **report.to_dict()}


def run_drop_scratch(target: dict[str, str], scratch_name: str, context) -> bool:
    """Body of the ``drop_scratch`` teardown task: the scratch database, then the roles created for it that nothing uses."""
    from pgdr.plan import load_plan

    context[CONTEXT_DATABASE] = target["database"]
    context[CONTEXT_BACKUP_ID] = target["backup_id"]
    with fail_fast():  # needs no backup: the scratch database goes even when the backup went first
        plan = load_plan()
        scratch = _scratch_for(target, context, plan.database(target["database"]), plan)
        return drop_scratch_and_roles(scratch, _purpose(target), context)


def _forget_vanished_backup(target: dict[str, str]) -> None:
    """Remove what a verification wrote next to a backup that was deleted meanwhile (best effort)."""
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.plan import load_plan

    try:
        plan = load_plan()
        store, layout = open_store(plan.database(target["database"]).storage, plan)
        BackupCatalog(store, layout, target["database"]).delete_backup(target["backup_id"])
    except Exception as err:  # noqa: BLE001 - retention removes what has no manifest anyway
        log.warning("Could not remove the leftovers of deleted backup %s: %s", target["backup_id"], err)


def run_record_verification(target: dict[str, str], context) -> dict[str, Any]:
    """Body of ``record_verification``: write verified or failed next to the backup.

    Runs whatever happened upstream (trigger rule ``all_done``); if any phase did not succeed it
    records ``failed`` and then fails itself, so the run stays failed.
    """
    from airflow.sdk.exceptions import AirflowFailException

    from pgdr.airflow_glue.notify import send_slack
    from pgdr.logical.catalog import BackupCatalog

    ti = context["ti"]
    group = ti.task_id.rpartition(".")[0]
    phases = {
        phase: ti.xcom_pull(task_ids=f"{group}.{phase}" if group else phase, map_indexes=ti.map_index)
        for phase in VERIFY_PHASES
    }
    with fail_fast():
        try:
            plan, db, store, layout, entry = _verify_context(target, context)
        except BackupNotFound:
            _forget_vanished_backup(target)  # what this run wrote next to it (validation results)
            raise
    failed_phase = next((p for p in VERIFY_PHASES if not phases[p]), None)
    record: dict[str, Any] = {
        "status": "failed" if failed_phase else "verified",
        "database": db.name,
        "backup_id": entry.backup_id,
        "recovery_point": entry.manifest.recovery_point.isoformat(),
        "verified_at": _now(),
        "airflow": {"dag_id": ti.dag_id, "run_id": ti.run_id, "log_url": ti.log_url},
        "phases": {},
        "rto_target_seconds": db.rto.total_seconds(),
        **({"restored_as_superuser": True, "warning": SUPERUSER_RESTORE_WARNING} if db.restore_as_superuser else {}),
    }
    for phase, value in phases.items():
        if value:
            started, finished = datetime.fromisoformat(value["started_at"]), datetime.fromisoformat(value["finished_at"])
            record["phases"][phase] = {
                "started_at": value["started_at"], "finished_at": value["finished_at"],
                "seconds": (finished - started).total_seconds(),
                **{k: v for k, v in value.items() if k in ("download_seconds", "restore_seconds", "roles_created")},
            }
    if phases["check_integrity"]:
        record["integrity"] = {k: phases["check_integrity"][k] for k in ("tables_checked", "rows_checked", "sequences_checked", "amcheck_ok", "large_objects")}
    if phases["apply_privileges"]:
        record["privileges"] = {k: phases["apply_privileges"][k] for k in (
            "owners", "grants", "default_privileges", "database_properties", "superuser_objects", "skipped_objects", "seconds")}
    if phases["validate_data"]:
        record["validation"] = {**phases["validate_data"]["summary"], "report": phases["validate_data"]["report"]}
    if failed_phase:
        record["failed_phase"] = failed_phase
    else:
        first = datetime.fromisoformat(phases["check_checksums"]["started_at"])
        last = datetime.fromisoformat(phases["apply_privileges"]["finished_at"])
        achieved = (last - first).total_seconds()
        record["restore_seconds"] = achieved
        record["rto_met"] = achieved <= db.rto.total_seconds()
    key = BackupCatalog(store, layout, db.name).record_verification(entry.backup_id, record)
    log.info("Verification record written: %s (%s).", store.describe(key), record["status"])
    if failed_phase:
        raise AirflowFailException(
            f"Backup {entry.backup_id} of database {db.name!r} is marked FAILED: phase {failed_phase} did not "
            "succeed (its own alert and log say why). The backup is kept; do not rely on it for a restore."
        )
    if not record["rto_met"]:
        from pgdr.messages import rto_breach_message

        log.warning("RTO breached: restore took %.1fs, the plan's RTO is %.0fs.", record["restore_seconds"], db.rto.total_seconds())
        send_slack(
            rto_breach_message(ti.dag_id, db.name, entry.backup_id, record["restore_seconds"], db.rto.total_seconds(), ti.log_url),
            db.name, context,
        )
    return record
