"""What the tasks of ``pgdr_drill`` do; the measuring and reporting live in :mod:`pgdr.drill`.

Every phase task returns its timed phases (plain values in XCom); ``measure`` gathers them per
database whatever happened (trigger rule ``all_done``), and ``publish_report`` writes the
report, sends it, and then fails the run if any database failed its drill.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from pgdr.airflow_glue.connections import (
    backup_data_key,
    connection_exists,
    database_endpoint,
    encryption_keys,
    open_store,
    server_endpoint,
)
from pgdr.airflow_glue.notify import CONTEXT_BACKUP_ID, CONTEXT_DATABASE
from pgdr.airflow_glue.task_run import (
    _airflow_info,
    _now,
    create_run_scratch,
    drop_scratch_and_roles,
    fail_fast,
    restore_into_scratch,
    run_scratch,
    task_workdir,
)
from pgdr.drill import phase
from pgdr.plan import load_plan

log = logging.getLogger(__name__)

SCENARIOS = ("full-restore", "latest-verified")
PHASE_TASKS = ("rehearse_backup", "restore_timed", "check_timed", "negative_control")


def select_databases(context) -> list[str]:
    """Body of ``select_databases``: the plan's databases, or the subset named in the form."""
    from pgdr.incident import InvalidRestoreRequest

    params = context["params"]
    with fail_fast():
        plan = load_plan()
        chosen = [d for d in (params.get("databases") or []) if d] or plan.database_names
        unknown = [d for d in chosen if d not in plan.database_names]
        if unknown:
            raise InvalidRestoreRequest(
                f"Databases not in the DR plan: {', '.join(unknown)}. The plan protects "
                f"{', '.join(plan.database_names)}."
            )
        if (params.get("scenario") or "full-restore") not in SCENARIOS:
            raise InvalidRestoreRequest(
                f"scenario must be one of {', '.join(SCENARIOS)}; got {params.get('scenario')!r}."
            )
    return chosen


def _objects(database: str, context):
    from pgdr.logical.catalog import BackupCatalog

    context[CONTEXT_DATABASE] = database
    plan = load_plan()
    db = plan.database(database)
    store, layout = open_store(db.storage, plan)
    return plan, db, store, layout, BackupCatalog(store, layout, db.name)


def run_rehearse_backup(database: str, context) -> dict[str, Any]:
    """Body of ``rehearse_backup``: a fresh backup through pgdr_backup's code (or the newest verified one)."""
    from pgdr.logical.backup import take_backup

    scenario = (context.get("params") or {}).get("scenario") or "full-restore"
    with fail_fast():
        plan, db, store, layout, catalog = _objects(database, context)
        if scenario == "latest-verified":
            entry = catalog.latest(verified_only=True)
            context[CONTEXT_BACKUP_ID] = entry.backup_id
            backup_data_key(db, entry.manifest, plan, catalog)  # a missing key fails here, before the scratch database
            return {"backup_id": entry.backup_id, "phases": []}
        with task_workdir(context, f"drill-backup-{database}") as workdir:
            result = take_backup(
                db,
                database_endpoint(db, plan),
                store,
                layout,
                workdir,
                _airflow_info(context),
                keys=encryption_keys(db, plan),
            )
    context[CONTEXT_BACKUP_ID] = result.manifest.backup_id
    phases = [phase(name, *result.phases[name]) for name in ("dump", "upload") if name in (result.phases or {})]
    return {"backup_id": result.manifest.backup_id, "phases": phases}


def _scratch(database: str, context, db, plan):
    return run_scratch("drill", db, plan, context, database)


def run_create_scratch(database: str, context) -> str:
    """Body of the drill's ``create_scratch`` setup task."""
    with fail_fast():
        plan, db, *_ = _objects(database, context)
        return create_run_scratch(
            _scratch(database, context, db, plan), "drill", database, f"drill {database}", context
        )


def run_restore_timed(database: str, backup: dict, context) -> dict[str, Any]:
    """Body of ``restore_timed``: checksum, download and restore, each timed."""
    from pgdr.logical.restore import download_backup, verify_checksums

    phases = []
    with fail_fast():
        plan, db, store, _layout, catalog = _objects(database, context)
        context[CONTEXT_BACKUP_ID] = backup["backup_id"]
        manifest = catalog.get(backup["backup_id"]).manifest
        scratch = _scratch(database, context, db, plan)
        workers = max(2, db.dump_jobs)
        started = _now()
        data_key = backup_data_key(db, manifest, plan, catalog)
        verify_checksums(manifest, store, workers, data_key=data_key)
        phases.append(phase("checksum", started, _now()))
        with task_workdir(context, f"drill-restore-{database}") as workdir:
            started = _now()
            download_backup(manifest, store, workdir / "dump", workers, data_key=data_key)
            phases.append(phase("download", started, _now()))
            started = _now()
            _, created = restore_into_scratch(
                scratch, workdir / "dump", db.dump_jobs, workdir, f"drill {database}", context
            )
            phases.append(phase("restore", started, _now()))
    return {"phases": phases, "roles_created": created}


def run_check_timed(database: str, backup: dict, context) -> dict[str, Any]:
    """Body of ``check_timed``: integrity checks and validation of the scratch restore, each timed."""
    from pgdr.checks.integrity import check_integrity
    from pgdr.checks.validation import validate_restored
    from pgdr.logical.restore import give_back_privileges

    with fail_fast():
        plan, db, store, _layout, catalog = _objects(database, context)
        context[CONTEXT_BACKUP_ID] = backup["backup_id"]
        manifest = catalog.get(backup["backup_id"]).manifest
        scratch = _scratch(database, context, db, plan)
        started = _now()
        with task_workdir(context, f"drill-checks-{database}") as workdir:
            check_integrity(scratch.endpoint, manifest, workdir, db.dump_jobs, admin=scratch.server)
        checks = phase("checks", started, _now())
        started = _now()
        report = validate_restored(scratch.endpoint, manifest)
        validation = phase("validation", started, _now())
    summary = report.summary()
    if not report.ok:
        from pgdr.checks.validation import failure_error

        with fail_fast():
            raise failure_error(report, manifest, "the drill report")
    with fail_fast():
        started = _now()
        with task_workdir(context, f"drill-privileges-{database}") as workdir:
            applied = give_back_privileges(
                manifest,
                store,
                scratch.server.with_dbname(scratch.name),
                workdir,
                backup_data_key(db, manifest, plan),
                scratch=True,
                skip=db.skip_objects,
            )
        privileges = phase("privileges", started, _now())
    return {"phases": [checks, validation, privileges], "validation": summary, "privileges": applied.to_dict()}


def run_negative_control(database: str, backup: dict, context) -> dict[str, Any]:
    """Body of ``negative_control``: a corrupted private copy of one file must be rejected
    (:func:`pgdr.drill.negative_control`)."""
    from pgdr.drill import negative_control

    with fail_fast():
        plan, db, store, _layout, catalog = _objects(database, context)
        manifest = catalog.get(backup["backup_id"]).manifest
        with task_workdir(context, f"drill-control-{database}") as workdir:
            return negative_control(manifest, store, backup_data_key(db, manifest, plan), workdir)


def run_drop_scratch(database: str, context) -> bool:
    """Body of the drill's ``drop_scratch`` teardown task: the scratch database, then the roles made for it that
    nothing uses."""
    with fail_fast():
        plan, db, *_ = _objects(database, context)
        return drop_scratch_and_roles(_scratch(database, context, db, plan), f"drill {database}", context)


def run_measure(database: str, context) -> dict[str, Any]:
    """Body of ``measure`` (all_done): RTO from the phases, RPO from the catalog, verdicts."""
    from pgdr.drill import evaluate, rpo_metrics

    ti, started_at = context["ti"], context["dag_run"].start_date.isoformat()
    group = ti.task_id.rpartition(".")[0]
    values = {
        name: ti.xcom_pull(task_ids=f"{group}.{name}" if group else name, map_indexes=ti.map_index)
        for name in PHASE_TASKS
    }
    plan, db, _store, _layout, catalog = _objects(database, context)
    failed_phase = next((n for n in PHASE_TASKS if not values[n]), None)
    phases = [p for n in PHASE_TASKS if values[n] for p in values[n].get("phases", [])]
    backups = catalog.backups()
    rpo = rpo_metrics(
        [b for b in backups if b.recovery_point <= datetime.fromisoformat(started_at)],
        datetime.fromisoformat(started_at),
    )
    return evaluate(
        database,
        db.rto.total_seconds(),
        db.rpo.total_seconds(),
        phases,
        rpo,
        values["negative_control"],
        failed_phase,
        (values["check_timed"] or {}).get("validation"),
        (values["rehearse_backup"] or {}).get("backup_id"),
    )


def run_rehearse_pitr(server_name: str, context) -> dict[str, Any]:
    """Body of ``rehearse_pitr``: recover the server's newest chain to the end of its archive ("latest") in a
    scratch cluster and measure the RPO achieved: the drill's start minus the newest heartbeat recovered."""
    from pgdr.airflow_glue.task_run import pitr_server_context, recover_scratch_cluster
    from pgdr.drill import pitr_rehearsal
    from pgdr.errors import BackupNotFound
    from pgdr.physical.heartbeat import heartbeats, write_heartbeat

    began, started_at = time.monotonic(), context["dag_run"].start_date.isoformat()
    with fail_fast():
        plan, server, store, archive, catalog = pitr_server_context(server_name, context)
        endpoint = server_endpoint(server, plan)
        write_heartbeat(endpoint, f"pgdr_drill {context['ti'].run_id} (drill start)")
        entries = [e for e in catalog.backups() if e.status != "failed"]
        if not entries:
            raise BackupNotFound(
                f"Server {server.name!r} has no base backup to rehearse a point-in-time recovery from: trigger "
                "pgdr_basebackup."
            )
        cluster, prepared, result = recover_scratch_cluster(
            context,
            server.name,
            f"drill: recovery of server {server.name} to the end of its archive",
            catalog,
            entries[-1],
            store,
            archive,
            None,
            endpoint.user,
        )
        try:
            recovered = heartbeats(cluster.endpoint())
        finally:
            cluster.destroy()
    rehearsal = pitr_rehearsal(
        server,
        entries[-1].backup_id,
        datetime.fromisoformat(started_at),
        recovered,
        time.monotonic() - began,
        prepared.timings,
        result.to_dict(),
    )
    log.info(
        "PITR rehearsal of %s: newest heartbeat recovered %s, achieved RPO %s s (target %s s).",
        server.name,
        rehearsal["newest_heartbeat"],
        rehearsal["rpo"]["achieved_s"],
        rehearsal["rpo"]["target_s"],
    )
    return rehearsal


def _pulled_list(ti, task_id: str) -> list[dict[str, Any]]:
    """Return every map index's XCom of ``task_id`` (one index comes back bare), the empty ones left out."""
    values = ti.xcom_pull(task_ids=task_id) or []
    return [v for v in ([values] if isinstance(values, dict) else list(values)) if v]


def run_publish_report(context) -> dict[str, Any]:
    """Body of ``publish_report``: markdown, HTML (with the trend chart) and JSON; Slack and e-mail; fails a failed
    drill."""
    from airflow.sdk.exceptions import AirflowFailException

    from pgdr.airflow_glue.alert_journal import AlertJournal
    from pgdr.airflow_glue.notify import send_slack
    from pgdr.drill import broken_parts, drill_id_of, drill_report, headline, store_report, unfinished_rehearsals
    from pgdr.messages import drill_summary

    ti, dag_run = context["ti"], context["dag_run"]
    results, pitr = _pulled_list(ti, "rehearse.measure"), _pulled_list(ti, "rehearse_pitr")
    plan = load_plan()
    store, layout = open_store(plan.default_storage or plan.databases[0].storage, plan)
    failures, _ = (
        AlertJournal.for_plan().failures(ti.dag_id, ti.run_id) if len(pitr) < len(plan.servers) else ([], None)
    )
    errors = {f.database: f.error for f in failures if f.task_id == "rehearse_pitr"}
    started_at = (dag_run.start_date or datetime.now(UTC)).astimezone(UTC)
    report = drill_report(
        drill_id_of(started_at, ti.run_id),
        ti.run_id,
        (context.get("params") or {}).get("scenario") or "full-restore",
        started_at,
        _now(),
        results,
        pitr + unfinished_rehearsals(plan.servers, pitr, errors),
    )
    location, page = store_report(report, store, layout)
    log.info("Drill report: %s\n%s", location, "\n".join(headline(report)))
    send_slack(drill_summary(report, headline(report), location), None, context)
    notify = plan.notify
    if notify.smtp_conn_id and notify.email_to and connection_exists(notify.smtp_conn_id):
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        SmtpNotifier(
            from_email=notify.email_from,
            to=list(notify.email_to),
            smtp_conn_id=notify.smtp_conn_id,
            subject=f"[pgdr] DR drill {report['drill_id']}: {report['status'].upper()}",
            html_content=page,
        ).notify(context)
    broken = broken_parts(report)
    if broken:
        raise AirflowFailException(
            f"The DR drill failed for {', '.join(broken)} (a phase or a point-in-time recovery rehearsal failed, or "
            f"the negative control was not rejected). The report lists the action items: {location}"
        )
    return {
        "status": report["status"],
        "report": location,
        "drill_id": report["drill_id"],
        "headline": headline(report),
    }
