"""What the tasks of ``pgdr_drill`` do; the measuring and reporting live in :mod:`pgdr.drill`.

Every phase task returns its timed phases (plain values in XCom); ``measure`` gathers them per
database whatever happened (trigger rule ``all_done``), and ``publish_report`` writes the
report, sends it, and then fails the run if any database failed its drill.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from pgdr.airflow_glue.connections import (
    backup_data_key,
    database_endpoint,
    encryption_keys,
    open_store,
    resources,
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

SCENARIOS = ("full-restore", "latest-verified", "primary-target-lost")
# The databases' storage targets are treated as lost: each database is restored from its first copy (``copies``), its
# RPO measured from what the copy holds; nothing of the rehearsal reads the lost target.
TARGET_LOST = "primary-target-lost"


def _scenario(context) -> str:
    return (context.get("params") or {}).get("scenario") or "full-restore"


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
        if _scenario(context) not in SCENARIOS:
            raise InvalidRestoreRequest(
                f"scenario must be one of {', '.join(SCENARIOS)}; got {params.get('scenario')!r}."
            )
        if _scenario(context) == TARGET_LOST and not any(plan.database(d).copies for d in chosen):
            raise InvalidRestoreRequest(
                f"Scenario {TARGET_LOST} restores each database from its second copy, and none of "
                f"{', '.join(chosen)} has one: losing their storage target loses every backup. Add copies: [...] to "
                "the plan (README, 'A second copy'), or rehearse another scenario."
            )
    return chosen


def _objects(database: str, context):
    """Return the plan, the database, and the store, layout and catalog the rehearsal reads (its first copy's in
    scenario primary-target-lost)."""
    from pgdr.logical.catalog import BackupCatalog

    plan, db = _plan_db(database, context)
    store, layout = open_store(rehearsal_target(db, _scenario(context)), plan)
    return plan, db, store, layout, BackupCatalog(store, layout, db.name)


def _plan_db(database: str, context):
    context[CONTEXT_DATABASE] = database
    plan = load_plan()
    return plan, plan.database(database)


def rehearsal_target(db, scenario: str):
    """Return the storage target a drill of ``scenario`` reads ``db``'s backups from."""
    from pgdr.incident import InvalidRestoreRequest

    if scenario != TARGET_LOST:
        return db.storage
    if not db.copies:
        raise InvalidRestoreRequest(
            f"Database {db.name!r} has no second copy, so with its storage target {db.storage.name!r} lost nothing is "
            "left to restore it from: every backup would be gone. Add copies: [...] to it in the plan (README, "
            "'A second copy')."
        )
    return db.copies[0]


def run_rehearse_backup(database: str, context) -> dict[str, Any]:
    """Body of ``rehearse_backup``: a fresh backup through pgdr_backup's code (or the newest verified one)."""
    from pgdr.logical.backup import take_backup

    scenario = _scenario(context)
    with fail_fast():
        plan, db, store, layout, catalog = _objects(database, context)
        if scenario in ("latest-verified", TARGET_LOST):  # with the target lost, no fresh backup can be stored
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
        plan, db = _plan_db(database, context)
        return create_run_scratch(
            _scratch(database, context, db, plan), "drill", database, f"drill {database}", context
        )


def run_restore_timed(database: str, backup: dict, context) -> dict[str, Any]:
    """Body of ``restore_timed``: checksum, download and restore, each timed (:func:`pgdr.drill.restore_timed`)."""
    from pgdr.drill import restore_timed

    with fail_fast():
        plan, db, store, _layout, catalog = _objects(database, context)
        context[CONTEXT_BACKUP_ID] = backup["backup_id"]
        manifest = catalog.get(backup["backup_id"]).manifest
        scratch = _scratch(database, context, db, plan)

        def restore_into(dump, workdir):
            return restore_into_scratch(scratch, dump, db.dump_jobs, workdir, f"drill {database}", context)

        with task_workdir(context, f"drill-restore-{database}") as workdir:
            data_key = backup_data_key(db, manifest, plan, catalog)
            return restore_timed(db, manifest, store, data_key, restore_into, workdir)


def run_check_timed(database: str, backup: dict, context) -> dict[str, Any]:
    """Body of ``check_timed``: checks, validation and privileges of the scratch restore, each timed."""
    from pgdr.drill import check_timed

    with fail_fast():
        plan, db, store, _layout, catalog = _objects(database, context)
        context[CONTEXT_BACKUP_ID] = backup["backup_id"]
        manifest = catalog.get(backup["backup_id"]).manifest
        return check_timed(
            db,
            manifest,
            store,
            backup_data_key(db, manifest, plan),
            _scratch(database, context, db, plan),
            lambda label: task_workdir(context, label),
        )


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
        plan, db = _plan_db(database, context)
        return drop_scratch_and_roles(_scratch(database, context, db, plan), f"drill {database}", context)


def run_measure(database: str, context) -> dict[str, Any]:
    """Body of ``measure`` (all_done): RTO from the phases, RPO from the catalog, verdicts (see
    :func:`pgdr.drill.measure`)."""
    from pgdr.drill import measure

    ti = context["ti"]
    group = ti.task_id.rpartition(".")[0]
    values = {n: ti.xcom_pull(task_ids=f"{group}.{n}" if group else n, map_indexes=ti.map_index) for n in PHASE_TASKS}
    from pgdr.incident import InvalidRestoreRequest

    try:
        _plan, db, _store, _layout, catalog = _objects(database, context)
        backups = catalog.backups()
    except InvalidRestoreRequest:  # no copy to rehearse a lost target with: rehearse_backup failed saying so
        _plan, db = _plan_db(database, context)
        backups = []
    return measure(db, resources(), backups, values, PHASE_TASKS, context["dag_run"].start_date)


def run_rehearse_pitr(server_name: str, context) -> dict[str, Any]:
    """Body of ``rehearse_pitr``: the RPO a recovery to the end of the archive achieves (see
    :func:`pgdr.drill.rehearse_pitr`)."""
    from pgdr.airflow_glue.task_run import AirflowTaskRun, pitr_server_context
    from pgdr.drill import pitr_rehearsal_failed, rehearse_pitr

    read_from = None
    if _scenario(context) == TARGET_LOST:  # recovered from the first copy; without one, the finding is the report's
        pitr = load_plan().server(server_name).pitr
        if not pitr.copies:
            return pitr_rehearsal_failed(
                server_name,
                pitr.rpo.total_seconds(),
                f"with its storage target lost, server {server_name!r} cannot be recovered to a moment: its base "
                "backups and WAL archive have no second copy (add pitr.copies: [a target in another bucket or region] "
                "and let pgdr_copy fill it); its databases are restored from their copies' dumps",
            )
        read_from = pitr.copies[0].name
    with fail_fast():
        plan, server, store, archive, catalog = pitr_server_context(server_name, context, read_from)
        return rehearse_pitr(
            server,
            server_endpoint(server, plan),
            catalog,
            store,
            archive,
            AirflowTaskRun(context),
            context["dag_run"].start_date,
        )


def _pulled_list(ti, task_id: str) -> list[dict[str, Any]]:
    """Return every map index's XCom of ``task_id`` (one index comes back bare), the empty ones left out."""
    values = ti.xcom_pull(task_ids=task_id) or []
    return [v for v in ([values] if isinstance(values, dict) else list(values)) if v]


def report_target(plan, scenario: str):
    """Return where the drill's report is stored: the plan's default storage target (else the first database's);
    with the storage targets lost, the first copy that is not one of them."""
    usual = plan.default_storage or plan.databases[0].storage
    if scenario != TARGET_LOST:
        return usual
    lost = {db.storage.name for db in plan.databases}
    return next((c for db in plan.databases for c in db.copies if c.name not in lost), usual)


def incidents_of_the_year(plan, now: datetime) -> list[dict[str, Any]]:
    """The incident records (:func:`pgdr.incident_review.incident_records`) of the last 365 days in every storage
    target of the plan's databases and servers, copies included: the drill's MTTR trend. A target that cannot be
    read is named in the log and left out; the drill goes on."""
    from pgdr.incident_review import incident_records

    targets = {
        t.name: t
        for t in [
            *(t for db in plan.databases for t in (db.storage, *db.copies)),
            *(t for s in plan.servers for t in (s.pitr.storage, *s.pitr.copies)),
        ]
    }
    found: dict[tuple, dict[str, Any]] = {}
    for target in targets.values():
        try:
            store, layout = open_store(target, plan)
            for record in incident_records(store, layout, now - timedelta(days=365)):
                found.setdefault((record["kind"], record["subject"], record.get("run_id")), record)
        except Exception as err:  # noqa: BLE001 - an unreachable target must not stop the drill's report
            log.warning(
                "Incident records in storage target %s not read (%s): the MTTR trend lacks them.", target.name, err
            )
    return sorted(found.values(), key=lambda r: r["declared_at"])


def run_publish_report(context) -> dict[str, Any]:
    """Body of ``publish_report``: markdown, HTML (with the trend chart) and JSON; Slack and e-mail; fails a failed
    drill."""
    from airflow.sdk.exceptions import AirflowFailException

    from pgdr.airflow_glue.alert_journal import AlertJournal
    from pgdr.airflow_glue.evidence import record_evidence
    from pgdr.airflow_glue.notify import send_email, send_slack
    from pgdr.drill import (
        broken_parts,
        drill_id_of,
        drill_report,
        headline,
        report_action_items,
        store_report,
        unfinished_rehearsals,
    )
    from pgdr.messages import drill_summary

    ti, dag_run = context["ti"], context["dag_run"]
    results, pitr = _pulled_list(ti, "rehearse.measure"), _pulled_list(ti, "rehearse_pitr")
    plan = load_plan()
    store, layout = open_store(report_target(plan, _scenario(context)), plan)
    failures, _ = (
        AlertJournal.for_plan().failures(ti.dag_id, ti.run_id) if len(pitr) < len(plan.servers) else ([], None)
    )
    errors = {f.database: f.error for f in failures if f.task_id == "rehearse_pitr"}
    started_at = (dag_run.start_date or datetime.now(UTC)).astimezone(UTC)
    report = drill_report(
        drill_id_of(started_at, ti.run_id),
        ti.run_id,
        _scenario(context),
        started_at,
        _now(),
        results,
        pitr + unfinished_rehearsals(plan.servers, pitr, errors),
        incidents_of_the_year(plan, started_at),
    )
    location, page = store_report(report, store, layout)
    log.info("Drill report: %s\n%s", location, "\n".join(headline(report)))
    broken = broken_parts(report)
    details = {
        "drill_id": report["drill_id"],
        "scenario": report["scenario"],
        "status": report["status"],
        "headline": headline(report),
        "broken": broken,
        "action_items": report_action_items(report),
        "report": location,
    }
    record_evidence(context, plan, "drill_run", {"drill": report["drill_id"]}, "failed" if broken else "ok", details)
    send_slack(drill_summary(report, headline(report), location), None, context)
    send_email(plan.notify, f"[pgdr] DR drill {report['drill_id']}: {report['status'].upper()}", page, context)
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
