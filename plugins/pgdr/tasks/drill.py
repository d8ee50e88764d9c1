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

from pgdr.airflow_glue.notify import CONTEXT_BACKUP_ID, CONTEXT_DATABASE
from pgdr.drill import phase
from pgdr.tasks.common import (
    _airflow_info,
    _now,
    create_run_scratch,
    drop_scratch_and_roles,
    fail_fast,
    restore_into_scratch,
    run_scratch,
    task_workdir,
)

log = logging.getLogger(__name__)

SCENARIOS = ("full-restore", "latest-verified")
PHASE_TASKS = ("rehearse_backup", "restore_timed", "check_timed", "negative_control")


def select_databases(params: dict[str, Any]) -> list[str]:
    """Body of ``select_databases``: the plan's databases, or the subset named in the form."""
    from pgdr.incident import InvalidRestoreRequest
    from pgdr.plan import load_plan

    with fail_fast():
        plan = load_plan()
        chosen = [d for d in (params.get("databases") or []) if d] or plan.database_names
        unknown = [d for d in chosen if d not in plan.database_names]
        if unknown:
            raise InvalidRestoreRequest(
                f"Databases not in the DR plan: {', '.join(unknown)}. The plan protects {', '.join(plan.database_names)}."
            )
        if (params.get("scenario") or "full-restore") not in SCENARIOS:
            raise InvalidRestoreRequest(f"scenario must be one of {', '.join(SCENARIOS)}; got {params.get('scenario')!r}.")
    return chosen


def _objects(database: str, context):
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.plan import load_plan

    context[CONTEXT_DATABASE] = database
    plan = load_plan()
    db = plan.database(database)
    store, layout = open_store(db.storage, plan)
    return plan, db, store, layout, BackupCatalog(store, layout, db.name)


def run_rehearse_backup(database: str, context) -> dict[str, Any]:
    """Body of ``rehearse_backup``: a fresh backup through pgdr_backup's code (or the newest verified one)."""
    from pgdr.airflow_glue.connections import backup_data_key, database_endpoint, encryption_keys
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
            result = take_backup(db, database_endpoint(db, plan), store, layout, workdir, _airflow_info(context),
                                 keys=encryption_keys(db, plan))
    context[CONTEXT_BACKUP_ID] = result.manifest.backup_id
    phases = [phase(name, *result.phases[name]) for name in ("dump", "upload") if name in (result.phases or {})]
    return {"backup_id": result.manifest.backup_id, "phases": phases}


def _scratch(database: str, context, db, plan):
    return run_scratch("drill", db, plan, context, database)


def run_create_scratch(database: str, context) -> str:
    """Body of the drill's ``create_scratch`` setup task."""
    with fail_fast():
        plan, db, *_ = _objects(database, context)
        return create_run_scratch(_scratch(database, context, db, plan), "drill", database, f"drill {database}", context)


def run_restore_timed(database: str, backup: dict, context) -> dict[str, Any]:
    """Body of ``restore_timed``: checksum, download and restore, each timed."""
    from pgdr.airflow_glue.connections import backup_data_key
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
            _, created = restore_into_scratch(scratch, workdir / "dump", db.dump_jobs, workdir, f"drill {database}", context)
            phases.append(phase("restore", started, _now()))
    return {"phases": phases, "roles_created": created}


def run_check_timed(database: str, backup: dict, context) -> dict[str, Any]:
    """Body of ``check_timed``: integrity checks and validation of the scratch restore, each timed."""
    from pgdr.airflow_glue.connections import backup_data_key
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
            applied = give_back_privileges(manifest, store, scratch.server.with_dbname(scratch.name), workdir,
                                           backup_data_key(db, manifest, plan), scratch=True,
                                           skip=db.skip_objects)
        privileges = phase("privileges", started, _now())
    return {"phases": [checks, validation, privileges], "validation": summary, "privileges": applied.to_dict()}


def run_negative_control(database: str, backup: dict, context) -> dict[str, Any]:
    """Body of ``negative_control``: corrupt a private copy of one file; verification must reject it.

    For an encrypted backup a second control forges the checksum too (as someone who can write to
    the bucket, but holds no key, could): AES-GCM authentication alone must then reject the copy.
    """
    import hashlib
    from dataclasses import replace

    from pgdr.airflow_glue.connections import backup_data_key
    from pgdr.drill import control_file
    from pgdr.errors import ChecksumMismatch
    from pgdr.logical.restore import verify_checksums
    from pgdr.storage.backends import LocalFolderStore

    with fail_fast():
        plan, db, store, _layout, catalog = _objects(database, context)
        manifest = catalog.get(backup["backup_id"]).manifest
        data_key = backup_data_key(db, manifest, plan)
        victim = control_file(manifest.files)
        with task_workdir(context, f"drill-control-{database}") as workdir:
            private = LocalFolderStore(workdir / "private-copy")
            data = bytearray(store.get_bytes(victim.key))
            data[len(data) // 2] ^= 0x01  # one flipped bit
            private.put_bytes(victim.key, bytes(data))
            controls = [("a flipped bit", victim)]
            if data_key is not None:
                controls.append(("a flipped bit with its checksum forged", replace(victim, sha256=hashlib.sha256(data).hexdigest())))
            messages = []
            for what, entry in controls:
                try:
                    verify_checksums(replace(manifest, files=(entry,)), private, workers=1, data_key=data_key)
                except ChecksumMismatch as err:
                    log.info("Negative control (%s): the corrupted copy of %s was rejected, as it must be: %s", what, victim.name, err)
                    found = "; ".join(p.problem for p in getattr(err, "problems", [])) or str(err)
                    messages.append(f"{what}: rejected, {found[:300]}")
                    continue
                log.error("Negative control FAILED: a corrupted copy of %s (%s) passed verification.", victim.name, what)
                return {"rejected": False, "file": victim.name, "message": f"a corrupted copy ({what}) passed verification",
                        "encrypted": data_key is not None}
    return {"rejected": True, "file": victim.name, "message": " | ".join(messages), "encrypted": data_key is not None}


def run_drop_scratch(database: str, context) -> bool:
    """Body of the drill's ``drop_scratch`` teardown task: the scratch database, then the roles made for it that nothing uses."""
    with fail_fast():
        plan, db, *_ = _objects(database, context)
        return drop_scratch_and_roles(_scratch(database, context, db, plan), f"drill {database}", context)


def run_measure(database: str, context, started_at: str) -> dict[str, Any]:
    """Body of ``measure`` (all_done): RTO from the phases, RPO from the catalog, verdicts."""
    from pgdr.drill import evaluate, rpo_metrics

    ti = context["ti"]
    group = ti.task_id.rpartition(".")[0]
    values = {
        name: ti.xcom_pull(task_ids=f"{group}.{name}" if group else name, map_indexes=ti.map_index)
        for name in PHASE_TASKS
    }
    plan, db, _store, _layout, catalog = _objects(database, context)
    failed_phase = next((n for n in PHASE_TASKS if not values[n]), None)
    phases = [p for n in PHASE_TASKS if values[n] for p in values[n].get("phases", [])]
    backups = catalog.backups()
    rpo = rpo_metrics([b for b in backups if b.recovery_point <= datetime.fromisoformat(started_at)], datetime.fromisoformat(started_at))
    return evaluate(
        database, db.rto.total_seconds(), db.rpo.total_seconds(), phases, rpo, values["negative_control"],
        failed_phase, (values["check_timed"] or {}).get("validation"), (values["rehearse_backup"] or {}).get("backup_id"),
    )


def run_rehearse_pitr(server_name: str, context, started_at: str) -> dict[str, Any]:
    """Body of ``rehearse_pitr``: recover the server's newest chain to the end of its archive ("latest") in a
    scratch cluster and measure the RPO achieved: the drill's start minus the newest heartbeat recovered."""
    from pgdr.airflow_glue.connections import server_endpoint
    from pgdr.physical.heartbeat import heartbeats, write_heartbeat
    from pgdr.tasks.common import pitr_server_context, recover_scratch_cluster

    ti = context["ti"]
    began = time.monotonic()
    with fail_fast():
        plan, server, store, archive, catalog = pitr_server_context(server_name, context)
        endpoint = server_endpoint(server, plan)
        start = datetime.fromisoformat(started_at)
        write_heartbeat(endpoint, f"pgdr_drill {ti.run_id} (drill start)")
        entries = [e for e in catalog.backups() if e.status != "failed"]
        if not entries:
            from pgdr.errors import BackupNotFound

            raise BackupNotFound(f"Server {server.name!r} has no base backup to rehearse a point-in-time recovery from: trigger pgdr_basebackup.")
        cluster, prepared, result = recover_scratch_cluster(
            context, server.name, f"drill: recovery of server {server.name} to the end of its archive", catalog, entries[-1],
            store, archive, None, endpoint.user,
        )
        try:
            recovered = [at for at in heartbeats(cluster.endpoint()) if at <= start]
        finally:
            cluster.destroy()
    newest = recovered[-1] if recovered else None
    rpo_s = (start - newest).total_seconds() if newest else None
    target = server.pitr.rpo.total_seconds()
    log.info("PITR rehearsal of %s: newest heartbeat recovered %s, achieved RPO %s s (target %s s).", server.name, newest, rpo_s, target)
    return {
        "server": server.name, "base_backup": entries[-1].backup_id, "newest_heartbeat": newest.isoformat() if newest else None,
        "rpo": {"target_s": target, "achieved_s": rpo_s, "met": rpo_s is not None and rpo_s <= target},
        "recovery_seconds": round(time.monotonic() - began, 2), "timings": {k: round(v, 2) for k, v in prepared.timings.items()},
        "recovery": result.to_dict(),
    }


def _unfinished_rehearsals(plan, pitr: list[dict[str, Any]], dag_id: str, run_id: str) -> list[dict[str, Any]]:
    """Return a failed record for each PITR server of the plan whose rehearsal returned nothing, with its error."""
    from pgdr.airflow_glue.alert_journal import AlertJournal
    from pgdr.drill import pitr_rehearsal_failed

    missing = [server for server in plan.servers if server.name not in {p["server"] for p in pitr}]
    if not missing:
        return []
    failures, _storage_error = AlertJournal.for_plan().failures(dag_id, run_id)
    errors = {f.database: f.error for f in failures if f.task_id == "rehearse_pitr"}
    return [
        pitr_rehearsal_failed(server.name, server.pitr.rpo.total_seconds(),
                              errors.get(f"server {server.name}") or errors.get(server.name)
                              or "the rehearse_pitr task failed; its alert and log say why")
        for server in missing
    ]


def run_publish_report(results: list[dict[str, Any]], context, pitr: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Body of ``publish_report``: markdown, HTML (with the trend chart) and JSON; Slack and e-mail."""
    import json
    import re

    from airflow.sdk.exceptions import AirflowFailException

    from pgdr.airflow_glue.connections import connection_exists, open_store
    from pgdr.airflow_glue.notify import send_slack
    from pgdr.drill import headline, render_html, render_markdown, report_json, trend_chart
    from pgdr.plan import load_plan

    ti, dag_run = context["ti"], context["dag_run"]
    plan = load_plan()
    store, layout = open_store(plan.default_storage or plan.databases[0].storage, plan)
    pitr = list(pitr or []) + _unfinished_rehearsals(plan, pitr or [], ti.dag_id, ti.run_id)
    started_at = (dag_run.start_date or datetime.now(UTC)).astimezone(UTC)
    drill_id = started_at.strftime("%Y%m%dT%H%M%SZ") + "-" + re.sub(r"[^A-Za-z0-9]+", "", ti.run_id)[-6:]
    report = {
        "drill_id": drill_id,
        "run_id": ti.run_id,
        "scenario": (context.get("params") or {}).get("scenario") or "full-restore",
        "started_at": started_at.isoformat(),
        "finished_at": _now(),
        "status": "pass" if results and all(r["status"] == "pass" for r in results) and all(p["rpo"]["met"] for p in pitr or []) else "fail",
        "databases": results,
        "pitr": pitr,
    }
    history = []
    for obj in store.list(layout.report_key("drills") + "/"):
        if obj.key.endswith("/drill.json"):
            try:
                history.append(json.loads(store.get_bytes(obj.key)))
            except ValueError:
                log.warning("Skipping an unreadable past drill report %s", obj.key)
    history = sorted([h for h in history if h.get("drill_id") != drill_id] + [report], key=lambda h: h["started_at"])
    chart = trend_chart(history)
    keys = {name: layout.report_key("drills", drill_id, name) for name in ("drill.json", "drill.md", "drill.html", "trend.png")}
    store.put_bytes(keys["drill.json"], report_json(report))
    store.put_bytes(keys["drill.md"], render_markdown(report).encode())
    page = render_html(report, chart)
    store.put_bytes(keys["drill.html"], page.encode())
    store.put_bytes(keys["trend.png"], chart)
    location = store.describe(keys["drill.html"])
    log.info("Drill report: %s\n%s", location, "\n".join(headline(report)))

    icon = ":white_check_mark:" if report["status"] == "pass" else ":warning:"
    text = "\n".join([f"{icon} [pgdr] DR drill {drill_id}: {report['status'].upper()}", *headline(report), f"Report: {location}"])
    send_slack(text, None, context)
    notify = plan.notify
    if notify.smtp_conn_id and notify.email_to and connection_exists(notify.smtp_conn_id):
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        SmtpNotifier(
            from_email=notify.email_from, to=list(notify.email_to), smtp_conn_id=notify.smtp_conn_id,
            subject=f"[pgdr] DR drill {drill_id}: {report['status'].upper()}", html_content=page,
        ).notify(context)
    broken = [r["database"] for r in results if r["failed_phase"] or not (r["negative_control"] or {}).get("rejected")]
    broken += [f"server {p['server']}" for p in pitr if p.get("error")]
    if broken:
        raise AirflowFailException(
            f"The DR drill failed for {', '.join(broken)} (a phase or a point-in-time recovery rehearsal failed, or the "
            f"negative control was not rejected). The report lists the action items: {location}"
        )
    return {"status": report["status"], "report": location, "drill_id": drill_id, "headline": headline(report)}
