"""What the tasks of ``pgdr_verify_restore`` do: prove one backup restorable, phase by phase, and record it.

Each task reads its context and calls :mod:`pgdr.verification` (which backups, what a phase works on)
or the checks themselves; the record is :func:`pgdr.records.verify_restore_record`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pgdr.airflow_glue.connections import resources
from pgdr.airflow_glue.notify import CONTEXT_BACKUP_ID, CONTEXT_DATABASE
from pgdr.airflow_glue.task_run import (
    _now,
    create_run_scratch,
    drop_scratch_and_roles,
    fail_fast,
    restore_into_scratch,
    run_scratch,
    task_workdir,
    timed,
)
from pgdr.errors import BackupNotFound

log = logging.getLogger(__name__)

# Where ``record_verification`` finds each phase's result: (task in the ``verify`` group, XCom key). A task runs
# several phases and pushes each one's result under its name as soon as it succeeds.
PHASE_XCOMS = {
    "check_checksums": ("restore_and_check", "check_checksums"),
    "restore_backup": ("restore_and_check", "restore_backup"),
    "check_integrity": ("restore_and_check", "check_integrity"),
    "validate_data": ("validate_and_apply_privileges", "validate_data"),
    "apply_privileges": ("validate_and_apply_privileges", "apply_privileges"),
}


@contextmanager
def _phase(context, name: str) -> Iterator[dict[str, Any]]:
    """Time one phase of a task (:func:`timed`); when it succeeds, push its result as the XCom ``name``."""
    with timed() as out:
        yield out
    context["ti"].xcom_push(key=name, value=out)


def resolve_verification_targets(context) -> list[dict[str, str]]:
    """Body of ``find_backups``: which backups this run verifies (see :mod:`pgdr.verification`)."""
    from airflow.sdk.exceptions import AirflowSkipException

    from pgdr.verification import NothingToVerify, event_targets, interval_targets, named_target

    params = context.get("params") or {}
    named = [
        {"database": (e.extra or {}).get("database"), "backup_id": (e.extra or {}).get("backup_id")}
        for events in (context.get("triggering_asset_events") or {}).values()
        for e in events
    ]
    named = [t for t in named if t["database"] and t["backup_id"]]
    start, end = context.get("data_interval_start"), context.get("data_interval_end")
    with fail_fast():
        try:
            database, backup_id, copy = (params.get(k) for k in ("database", "backup_id", "verify_from"))
            if database or backup_id or copy:
                return [named_target(resources(), database, backup_id, copy)]
            if named:
                return event_targets(resources(), named)
            if start is None or end is None:
                raise NothingToVerify("This run names no backup (no params, no asset event, no data interval).")
            run_type = context["dag_run"].run_type
            return interval_targets(
                resources(), start, end, backfill=str(getattr(run_type, "value", run_type)) == "backfill"
            )
        except NothingToVerify as why:
            raise AirflowSkipException(str(why)) from None


def _objects(target: dict[str, str], context):
    """Label the task for alerts; return what the phase works on (:class:`pgdr.verification.VerifyObjects`)."""
    from pgdr.verification import VerifyObjects

    _label(target, context)
    return VerifyObjects(target, resources())


def _label(target: dict[str, str], context) -> None:
    """Name the database and backup (and the copy it is read from) in the task's map index and its alerts."""
    context[CONTEXT_DATABASE] = target["database"]
    copy = f" in copy {target['from']}" if target.get("from") else ""
    context[CONTEXT_BACKUP_ID] = f"{target['backup_id']}{copy}"


def _scratch(objs, context):
    return _run_scratch(objs.target, objs.db, objs.res.plan, context)


def _run_scratch(target: dict[str, str], db, plan, context):
    """Return this run's scratch database for verifying ``target`` (the same name on every try and teardown)."""
    from pgdr.verification import target_key

    return run_scratch("verify", db, plan, context, target_key(target))


def run_create_scratch(target: dict[str, str], context) -> str:
    """Body of the ``create_scratch`` setup task: drop leftovers of killed runs, create ours."""
    with fail_fast():
        objs = _objects(target, context)
        return create_run_scratch(_scratch(objs, context), "verify", objs.db.name, objs.purpose, context)


def run_restore_and_check(target: dict[str, str], scratch_name: str, context) -> dict[str, Any]:
    """Body of ``restore_and_check``: three phases in one task (one worker process, one download).

    1. ``check_checksums``: every stored file downloaded with its SHA-256 compared to the manifest (an encrypted
       backup's every chunk authenticated; an unencrypted one refused where the plan encrypts), so a changed,
       truncated or missing file fails here, at once and without a retry;
    2. ``restore_backup``: ``pg_restore -j`` into the scratch database, as an incident restore would: made again with
       the backup's encoding and locale, and the roles the backup names that the verification server lacks created
       as on the source server, without passwords (dropped again with the scratch database when nothing else uses
       them), so a backup whose owners and grants cannot be given back fails today, not during an incident;
    3. ``check_integrity``: exact row counts against the manifest, ``pg_amcheck``, sequences.

    Each phase's result is pushed as an XCom under the phase's name as soon as it succeeds, so that
    ``record_verification`` names the phase that failed (:data:`PHASE_XCOMS`). A retry runs all three again.
    """
    from pgdr.checks.integrity import check_integrity
    from pgdr.logical.restore import download_backup

    with fail_fast():
        objs = _objects(target, context)
        manifest, scratch = objs.entry.manifest, _scratch(objs, context)
        with task_workdir(context, f"restore-{objs.db.name}") as workdir:
            with _phase(context, "check_checksums") as checked:
                download = download_backup(
                    manifest,
                    objs.store,
                    workdir / "dump",
                    workers=max(2, objs.db.dump_jobs),
                    data_key=objs.data_key(refuse_unencrypted=True),
                )
                checked.update(download)
            log.info(
                "All %d files of backup %s (%.1f MB) downloaded and match their SHA-256 in the manifest (%.1fs).",
                len(manifest.files),
                manifest.backup_id,
                manifest.stored_size / 1e6,
                download["seconds"],
            )
            with _phase(context, "restore_backup") as restored:
                outcome = restore_into_scratch(
                    scratch, workdir / "dump", objs.db.dump_jobs, workdir, objs.purpose, context
                )
                restored.update({"download_seconds": download["seconds"], **outcome.details()})
            log.info(
                "Backup %s restored into %s: pg_restore -j%d %.1fs.",
                manifest.backup_id,
                scratch_name,
                objs.db.dump_jobs,
                outcome.seconds,
            )
            with _phase(context, "check_integrity") as integrity:
                integrity.update(
                    check_integrity(
                        scratch.endpoint, manifest, workdir, jobs=objs.db.dump_jobs, admin=scratch.server
                    ).to_dict()
                )
    return {"check_checksums": checked, "restore_backup": restored, "check_integrity": integrity}


def run_validate_and_apply_privileges(target: dict[str, str], scratch_name: str, context) -> dict[str, Any]:
    """Body of ``validate_and_apply_privileges``: two phases in one task, each timed and pushed as its own XCom.

    1. ``validate_data``: the Great Expectations baseline and user suites; results (JSON) and the HTML report stored
       next to the backup, also when an expectation fails (which fails the task, without a retry);
    2. ``apply_privileges``: the backup's owners, grants, default privileges and database settings on the scratch
       copy, as an incident restore gives them back (after the checks, as there).
    """
    from pgdr.checks.validation import failure_error, render_html, validate_restored
    from pgdr.logical.restore import give_back_privileges
    from pgdr.verification import validation_extra

    with fail_fast():
        objs = _objects(target, context)
        db, entry, store, scratch = objs.db, objs.entry, objs.store, _scratch(objs, context)
        with _phase(context, "validate_data") as validated:
            report = validate_restored(scratch.endpoint, entry.manifest)
            results_key = objs.layout.validation_key(db.name, entry.backup_id, "results.json")
            html_key = objs.layout.validation_key(db.name, entry.backup_id, "report.html")
            store.put_bytes(results_key, report.to_json())
            store.put_bytes(html_key, render_html(report, entry.manifest, validation_extra(db, context["ti"].run_id)))
            log.info("Validation report: %s", store.describe(html_key))
            if not report.ok:
                raise failure_error(report, entry.manifest, store.describe(html_key))
            validated.update(
                {
                    "seconds": report.seconds,
                    "summary": report.summary(),
                    "results_key": results_key,
                    "report_key": html_key,
                    "report": store.describe(html_key),
                }
            )
        with _phase(context, "apply_privileges") as given, task_workdir(context, f"privileges-{db.name}") as workdir:
            given.update(
                give_back_privileges(
                    entry.manifest,
                    store,
                    scratch.server.with_dbname(scratch.name),
                    workdir,
                    objs.data_key(),
                    scratch=True,
                    skip=db.skip_objects,
                ).to_dict()
            )
    return {"validate_data": validated, "apply_privileges": given}


def run_drop_scratch(target: dict[str, str], scratch_name: str, context) -> bool:
    """Body of the ``drop_scratch`` teardown task: the scratch database, then the roles created for it that nothing
    uses."""
    _label(target, context)
    from pgdr.verification import purpose_of

    with fail_fast():  # needs no backup: the scratch database goes even when the backup went first
        res = resources()
        db = res.plan.database(target["database"])
        return drop_scratch_and_roles(_run_scratch(target, db, res.plan, context), purpose_of(target), context)


def _verification_receipt(objs, record, key: str, context) -> None:
    """The evidence receipt of a verification: its outcome, checks and durations, and the record it stands for."""
    from pgdr.airflow_glue.evidence import record_evidence

    if objs.res.plan.evidence is None:  # no evidence log
        return
    verified = record.status == "verified"
    details = {
        "failed_phase": record.failed_phase,
        "restore_seconds": record.restore_seconds,
        "rto_target_seconds": objs.db.rto.total_seconds(),
        "rto_met": record.rto_met,
        "recovery_point": record.recovery_point,
        "verified_from": objs.source.name,
        "checks": {
            "integrity": {k: record.integrity.get(k) for k in ("amcheck_ok", "rows_checked") if record.integrity},
            "validation_failed": (record.validation or {}).get("failed"),
        },
    }
    record_evidence(
        context,
        objs.res.plan,
        "backup_verified" if verified else "backup_verification_failed",
        {"database": objs.db.name, "backup_id": record.backup_id},
        "ok" if verified else "failed",
        details,
        (objs.source.name, key, lambda: objs.store.get_bytes(key)),
    )


def run_record_verification(target: dict[str, str], context) -> dict[str, Any]:
    """Body of ``record_verification``: write verified or failed next to the backup.

    Runs whatever happened upstream (trigger rule ``all_done``); if any phase did not succeed it
    records ``failed`` and then fails itself, so the run stays failed.
    """
    from pgdr.airflow_glue.notify import send_slack
    from pgdr.messages import rto_breach_message
    from pgdr.verification import forget_vanished_backup, record_verification

    ti = context["ti"]
    group = ti.task_id.rpartition(".")[0]
    phases = {
        p: ti.xcom_pull(task_ids=f"{group}.{task}" if group else task, key=key, map_indexes=ti.map_index)
        for p, (task, key) in PHASE_XCOMS.items()
    }
    with fail_fast():
        try:
            objs = _objects(target, context)
        except BackupNotFound:
            forget_vanished_backup(resources(), target)  # what this run wrote next to it (validation results)
            raise
        record = record_verification(
            objs,
            phases,
            {"dag_id": ti.dag_id, "run_id": ti.run_id, "log_url": ti.log_url},
            _now(),
            lambda written, key: _verification_receipt(objs, written, key, context),
        )
    if not record.rto_met:
        rto = objs.db.rto.total_seconds()
        text = rto_breach_message(ti.dag_id, objs.db.name, record.backup_id, record.restore_seconds, rto, ti.log_url)
        send_slack(text, objs.db.name, context)
    return record.to_dict()
