"""What pgdr's DAG tasks do: thin Airflow-facing functions over the domain modules.

DAG files stay short by calling these. Each function reads the plan and connections at run
time (never at parse time), keeps its work files in a private directory that is always
removed, and turns :class:`~pgdr.errors.PermanentFailure` into ``AirflowFailException`` so that a
failure retrying cannot fix pages at once instead of retrying.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pgdr.errors import BackupNotFound, PermanentFailure
from pgdr.notify import CONTEXT_BACKUP_ID, CONTEXT_DATABASE, on_task_failure
from pgdr.plan import DRPlan

log = logging.getLogger(__name__)

OWNER = "pgdr"
MAX_RETRY_DELAY = timedelta(minutes=30)


def default_args(plan: DRPlan, execution_timeout: timedelta) -> dict[str, Any]:
    """Return the ``default_args`` every pgdr DAG uses: retries with backoff, alerts, timeout."""
    return {
        "owner": OWNER,
        "retries": plan.retries,
        "retry_delay": plan.retry_delay,
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": MAX_RETRY_DELAY,
        "execution_timeout": execution_timeout,
        "on_failure_callback": on_task_failure,
    }


@contextmanager
def fail_fast() -> Iterator[None]:
    """Re-raise a :class:`PermanentFailure` as ``AirflowFailException`` (no retry)."""
    try:
        yield
    except PermanentFailure as err:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(str(err)) from err


OWNER_FILE = ".pgdr-owner"


@contextmanager
def task_workdir(context, label: str) -> Iterator[Path]:
    """Yield a private work directory for one task try; it is removed whatever happens.

    A try killed with SIGKILL (an out-of-memory kill, a worker that died) cannot clean up: its
    directory, with the dump or download and the passfile, stays. Each directory therefore names
    its owner (host, process id and the process's start time), and every new one removes the
    directories of owners on this host that no longer run, and only those.
    """
    from pgdr.backup import work_dir_root

    ti = context["ti"]
    root = work_dir_root()
    root.mkdir(parents=True, exist_ok=True)
    remove_dead_workdirs(root)
    path = Path(tempfile.mkdtemp(prefix=f"pgdr-{label}-{ti.map_index}-", dir=root))
    try:
        (path / OWNER_FILE).write_text(json.dumps(_process_identity(os.getpid())))
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _process_identity(pid: int) -> dict[str, Any] | None:
    """Return this host's name, ``pid`` and the process's start time (``None`` if it does not run)."""
    try:
        # Field 22 of /proc/<pid>/stat is the start time: a reused pid has another one.
        stat = Path(f"/proc/{pid}/stat").read_text()
        started = stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        started = None
    return {"host": socket.gethostname(), "pid": pid, "started": started}


def remove_dead_workdirs(root: Path) -> list[Path]:
    """Remove work directories under ``root`` whose owning process on this host no longer runs."""
    removed = []
    for owner_file in root.glob(f"pgdr-*/{OWNER_FILE}"):
        try:
            owner = json.loads(owner_file.read_text())
        except (OSError, ValueError):
            continue  # being written right now, or not ours to judge
        if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
            continue
        if _process_identity(int(owner.get("pid", 0))) == owner:
            continue
        shutil.rmtree(owner_file.parent, ignore_errors=True)
        removed.append(owner_file.parent)
        log.warning("Removed %s, the work directory of a task that was killed (pid %s).", owner_file.parent, owner.get("pid"))
    return removed


def backfill_skip_reason(run_type: str, logical_date: datetime | None, queued_at: datetime | None) -> str | None:
    """Say why a backup run must not back up, or ``None`` if it should.

    A backup records the database as it is *now*. A backfill run, or a manual run given a logical
    date in the past, would label today's data with an old date, so it is skipped. A scheduled run
    that starts late (after scheduler downtime) still backs up: a late backup beats none.
    """
    run_type = str(getattr(run_type, "value", run_type))
    if run_type == "backfill":
        return (
            f"This is a backfill run for {logical_date:%Y-%m-%d %H:%M} UTC. A backup can only capture the "
            "database as it is now, so pgdr does not label a fresh dump with a past date. Nothing was done; "
            "backfill pgdr_verify_restore instead to verify the backups taken in that period."
        )
    if run_type == "manual" and logical_date is not None:
        reference = queued_at or datetime.now(UTC)
        if reference - logical_date > timedelta(hours=1):
            return (
                f"This manual run has the past logical date {logical_date:%Y-%m-%d %H:%M} UTC. A backup can "
                "only capture the database as it is now; trigger the DAG without a logical date to back up now."
            )
    return None


def _airflow_info(context) -> dict[str, Any]:
    ti = context["ti"]
    logical_date = context.get("logical_date")
    return {
        "dag_id": ti.dag_id,
        "run_id": ti.run_id,
        "task_id": ti.task_id,
        "try_number": ti.try_number,
        "logical_date": logical_date.isoformat() if logical_date else None,
    }


def run_backup(database: str, context) -> dict[str, Any]:
    """Body of the ``back_up`` task: back up one database and emit the backup asset event."""
    from airflow.sdk.exceptions import AirflowSkipException

    from pgdr.assets import BACKUP_ASSET
    from pgdr.backup import take_backup
    from pgdr.connections import database_endpoint, open_store
    from pgdr.plan import load_plan

    context[CONTEXT_DATABASE] = database
    dag_run = context["dag_run"]
    reason = backfill_skip_reason(dag_run.run_type, context.get("logical_date"), getattr(dag_run, "queued_at", None))
    if reason:
        raise AirflowSkipException(reason)
    with fail_fast():
        plan = load_plan()
        db = plan.database(database)
        endpoint = database_endpoint(db, plan)
        store, layout = open_store(db.storage, plan)
        with task_workdir(context, f"backup-{database}") as workdir:
            result = take_backup(db, endpoint, store, layout, workdir, _airflow_info(context))
    manifest = result.manifest
    context[CONTEXT_BACKUP_ID] = manifest.backup_id
    summary = {
        "database": database,
        "backup_id": manifest.backup_id,
        "location": result.location,
        "manifest_key": result.manifest_key,
        "storage": db.storage.name,
        "recovery_point": manifest.recovery_point.isoformat(),
        "stored_bytes": manifest.stored_size,
        "dump_bytes": manifest.size,
        "tables": len(manifest.row_counts),
        "rows": sum(manifest.row_counts.values()),
    }
    context["outlet_events"][BACKUP_ASSET].extra = summary
    log.info(
        "%s backup %s of database %s: recovery point %s, %d tables, %d rows, %s. Manifest: %s",
        "Reused" if result.reused else "Completed", manifest.backup_id, database,
        manifest.recovery_point.isoformat(), summary["tables"], summary["rows"],
        manifest.size_summary(), store.describe(result.manifest_key),
    )
    return summary


def run_retention(database: str, context) -> dict[str, Any]:
    """Body of the ``prune_expired`` task: apply the plan's retention policy to one database."""
    from pgdr.catalog import BackupCatalog
    from pgdr.connections import open_store
    from pgdr.plan import load_plan
    from pgdr.retention import decide_retention

    context[CONTEXT_DATABASE] = database
    with fail_fast():
        plan = load_plan()
        db = plan.database(database)
        store, layout = open_store(db.storage, plan)
        catalog = BackupCatalog(store, layout, database)
        complete, partials = catalog.scan()
        decision = decide_retention(complete, partials, db.retention, datetime.now(UTC))
        keys_by_id = {p.backup_id: list(p.keys) for p in partials}
        for backup_id, why in decision.delete.items():
            log.info("Deleting backup %s of %s: %s.", backup_id, database, why)
            catalog.delete_backup(backup_id)
        for backup_id, why in decision.delete_partial.items():
            log.info("Deleting %s of %s: %s.", backup_id, database, why)
            catalog.delete_backup(backup_id, keys_by_id[backup_id])
    for backup_id, why in decision.keep.items():
        log.info("Keeping backup %s of %s: %s.", backup_id, database, why)
    return {
        "database": database,
        "kept": sorted(decision.keep),
        "deleted": sorted(decision.delete),
        "deleted_partial": sorted(decision.delete_partial),
    }


# ------------------------------------------------------------------------------------------------
# pgdr_verify_restore
# ------------------------------------------------------------------------------------------------

VERIFY_PHASES = ("check_checksums", "restore_backup", "check_integrity", "validate_data")


def _now() -> str:
    return datetime.now(UTC).isoformat()


def resolve_verification_targets(context) -> list[dict[str, str]]:
    """Body of ``find_backups``: which backups this run verifies.

    In order: the ``backup_id``/``database`` params of a manual run; the backups named by the
    asset events that triggered the run; for a scheduled or backfill run, the backups whose
    recovery point lies in the run's data interval (a scheduled run only takes those not yet
    verified, as a safety net for missed events).
    """
    from airflow.sdk.exceptions import AirflowSkipException

    from pgdr.catalog import BackupCatalog
    from pgdr.connections import open_store
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


def _verify_context(target: dict[str, str], context):
    """Load the plan objects one verification phase needs, and label the task for alerts."""
    from pgdr.catalog import BackupCatalog
    from pgdr.connections import open_store
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
    from pgdr.restore import verify_checksums

    started = _now()
    with fail_fast():
        _plan, db, store, _layout, entry = _verify_context(target, context)
        result = verify_checksums(entry.manifest, store, workers=max(2, db.dump_jobs))
    log.info(
        "All %d files of backup %s (%.1f MB) match their SHA-256 in the manifest (%.1fs).",
        len(entry.manifest.files), entry.backup_id, entry.manifest.stored_size / 1e6, result["seconds"],
    )
    return {"started_at": started, "finished_at": _now(), **result}


def run_scratch(kind: str, db, plan, context, key: str):
    """Return this run's scratch database of ``kind`` for ``db`` (the same name on every retry).

    :param key: what, within the run, the scratch database is for (a database, a backup).
    """
    from pgdr.connections import database_endpoint, restore_endpoint
    from pgdr.scratch import ScratchDatabase, scratch_name

    server = database_endpoint(db, plan, conn_id=db.verify_conn_id)
    restorer = restore_endpoint(db, plan, server)
    return ScratchDatabase(server, scratch_name(kind, db.name, f"{context['ti'].run_id}/{key}"), restorer)


def create_run_scratch(scratch, kind: str, database: str, purpose: str, context) -> str:
    """Drop scratch databases of ``kind`` left by killed runs, then create this run's; return its name."""
    from pgdr.plan import load_plan
    from pgdr.postgres import check_restore_role
    from pgdr.scratch import drop_leftovers, scratch_comment

    ti = context["ti"]
    run_id = ti.run_id
    check_restore_role(scratch.endpoint, load_plan().database(database).restore_as_superuser)
    drop_leftovers(scratch.server, kind, database, run_id, lambda other: ti.get_dagrun_state(dag_id=ti.dag_id, run_id=other))
    scratch.create(scratch_comment(purpose, run_id))
    return scratch.name


def refill_on_retry(scratch, context, purpose: str) -> None:
    """Empty this run's scratch database again before a retried restore: a failed try left half a restore in it."""
    from pgdr.scratch import scratch_comment

    if context["ti"].try_number > 1:
        log.info("Try %d: re-creating %s empty before restoring again.", context["ti"].try_number, scratch.name)
        scratch.create(scratch_comment(purpose, context["ti"].run_id))


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
    """Body of ``restore_backup``: download (verifying again), ``pg_restore -j``."""
    from pgdr.restore import download_backup, restore_dump

    started = _now()
    with fail_fast():
        plan, db, store, _layout, entry = _verify_context(target, context)
        scratch = _scratch_for(target, context, db, plan)
        refill_on_retry(scratch, context, f"verify {db.name} backup {target['backup_id']}")
        with task_workdir(context, f"restore-{db.name}") as workdir:
            download = download_backup(entry.manifest, store, workdir / "dump", workers=max(2, db.dump_jobs))
            restore_s = restore_dump(scratch.endpoint, workdir / "dump", db.dump_jobs, workdir)
    log.info(
        "Backup %s restored into %s: download and verify %.1fs, pg_restore -j%d %.1fs.",
        entry.backup_id, scratch_name, download["seconds"], db.dump_jobs, restore_s,
    )
    return {"started_at": started, "finished_at": _now(), "download_seconds": download["seconds"], "restore_seconds": restore_s}


def run_check_integrity(target: dict[str, str], scratch_name: str, context) -> dict[str, Any]:
    """Body of ``check_integrity``: exact row counts, pg_amcheck, sequences."""
    from pgdr.integrity import check_integrity

    started = _now()
    with fail_fast():
        plan, db, _store, _layout, entry = _verify_context(target, context)
        scratch = _scratch_for(target, context, db, plan)
        with task_workdir(context, f"amcheck-{db.name}") as workdir:
            report = check_integrity(scratch.endpoint, entry.manifest, workdir, jobs=db.dump_jobs, admin=scratch.server)
    return {"started_at": started, "finished_at": _now(), **report.to_dict()}


def run_validate_data(target: dict[str, str], scratch_name: str, context) -> dict[str, Any]:
    """Body of ``validate_data``: GX baseline and user suites; results stored next to the backup."""
    from pgdr.validation import failure_error, render_html, validate_restored

    started = _now()
    with fail_fast():
        plan, db, store, layout, entry = _verify_context(target, context)
        scratch = _scratch_for(target, context, db, plan)
        report = validate_restored(scratch.endpoint, entry.manifest)
        results_key = layout.validation_key(db.name, entry.backup_id, "results.json")
        html_key = layout.validation_key(db.name, entry.backup_id, "report.html")
        store.put_bytes(results_key, report.to_json())
        store.put_bytes(html_key, render_html(report, entry.manifest, {"Airflow run": context["ti"].run_id}))
        log.info("Validation report: %s", store.describe(html_key))
        if not report.ok:
            raise failure_error(report, entry.manifest, store.describe(html_key))
    return {
        "started_at": started, "finished_at": _now(), "seconds": report.seconds,
        "summary": report.summary(), "results_key": results_key, "report_key": html_key,
        "report": store.describe(html_key),
    }


def run_drop_scratch(target: dict[str, str], scratch_name: str, context) -> bool:
    """Body of the ``drop_scratch`` teardown task."""
    from pgdr.plan import load_plan

    context[CONTEXT_DATABASE] = target["database"]
    context[CONTEXT_BACKUP_ID] = target["backup_id"]
    with fail_fast():  # needs no backup: the scratch database goes even when the backup went first
        plan = load_plan()
        return _scratch_for(target, context, plan.database(target["database"]), plan).drop()


def _forget_vanished_backup(target: dict[str, str]) -> None:
    """Remove what a verification wrote next to a backup that was deleted meanwhile (best effort)."""
    from pgdr.catalog import BackupCatalog
    from pgdr.connections import open_store
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

    from pgdr.catalog import BackupCatalog
    from pgdr.notify import send_slack

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
    }
    for phase, value in phases.items():
        if value:
            started, finished = datetime.fromisoformat(value["started_at"]), datetime.fromisoformat(value["finished_at"])
            record["phases"][phase] = {
                "started_at": value["started_at"], "finished_at": value["finished_at"],
                "seconds": (finished - started).total_seconds(),
                **{k: v for k, v in value.items() if k in ("download_seconds", "restore_seconds")},
            }
    if phases["check_integrity"]:
        record["integrity"] = {k: phases["check_integrity"][k] for k in ("tables_checked", "rows_checked", "sequences_checked", "amcheck_ok", "large_objects")}
    if phases["validate_data"]:
        record["validation"] = {**phases["validate_data"]["summary"], "report": phases["validate_data"]["report"]}
    if failed_phase:
        record["failed_phase"] = failed_phase
    else:
        first = datetime.fromisoformat(phases["check_checksums"]["started_at"])
        last = datetime.fromisoformat(phases["validate_data"]["finished_at"])
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
        from pgdr.alerts import rto_breach_message

        log.warning("RTO breached: restore took %.1fs, the plan's RTO is %.0fs.", record["restore_seconds"], db.rto.total_seconds())
        send_slack(
            rto_breach_message(ti.dag_id, db.name, entry.backup_id, record["restore_seconds"], db.rto.total_seconds(), ti.log_url),
            db.name, context,
        )
    return record


# ------------------------------------------------------------------------------------------------
# pgdr_health
# ------------------------------------------------------------------------------------------------


def run_health_database(database: str, context) -> list[dict[str, Any]]:
    """Body of ``check_database``: source, storage, backup ages; emits metrics. Never fails on a bad check."""
    from dataclasses import asdict

    from pgdr.health import check_backup_ages, check_source, check_storage, emit_metrics, last_measurements
    from pgdr.plan import load_plan

    context[CONTEXT_DATABASE] = database
    with fail_fast():
        plan = load_plan()
        db = plan.database(database)
    results = [check_source(db, plan), check_storage(db, plan), *check_backup_ages(db, plan, datetime.now(UTC))]
    try:
        extra = last_measurements(db, plan)
    except Exception as err:  # noqa: BLE001 - metrics must not hide the checks
        log.warning("Could not read the last restore and drill numbers of %s: %s", database, err)
        extra = {}
    emit_metrics(results, extra)
    for r in results:
        log.log(logging.INFO if r.ok else logging.WARNING, "%s %s: %s: %s", "OK  " if r.ok else "FAIL", database, r.check, r.detail)
    return [asdict(r) for r in results]


def run_health_workers(context) -> list[dict[str, Any]]:
    """Body of ``check_workers``: free space where pgdr keeps its work files."""
    from dataclasses import asdict

    from pgdr.backup import work_dir_root
    from pgdr.health import check_free_space, emit_metrics
    from pgdr.plan import load_plan

    result = check_free_space(work_dir_root(), load_plan().health.min_free_gb)
    emit_metrics([result])
    log.log(logging.INFO if result.ok else logging.WARNING, "%s", result.detail)
    return [asdict(result)]


def run_health_alerts(results: list[list[dict[str, Any]]], context) -> dict[str, Any]:
    """Body of ``alert_on_changes``: one Slack message for the checks that changed state, if any."""
    from pgdr.alert_journal import AlertJournal
    from pgdr.health import CheckResult, transition_message, transitions
    from pgdr.notify import send_slack

    flat = [CheckResult(**r) for group in results for r in (group or [])]
    failing, recovered = transitions(flat, AlertJournal.for_plan())
    if failing or recovered:
        send_slack(transition_message(failing, recovered), None, context)
    still = [r for r in flat if not r.ok]
    log.info("%d checks, %d failing (%d new), %d recovered.", len(flat), len(still), len(failing), len(recovered))
    return {"checks": len(flat), "failing": [f"{r.database}:{r.check}" for r in still],
            "newly_failing": len(failing), "recovered": len(recovered)}
