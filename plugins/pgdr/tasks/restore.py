"""What the tasks of ``pgdr_restore`` do (the incident restore DAG): each reads its context and calls
:mod:`pgdr.incident`, where the rules live.

The first task resolves and validates the whole request and prints the restore plan; every
later task works from that plan (an XCom of plain values), so a retry does exactly the same
thing. Bad input fails in the first task, before anything is touched.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from typing import Any

from pgdr.airflow_glue.connections import resources
from pgdr.airflow_glue.notify import CONTEXT_BACKUP_ID, CONTEXT_DATABASE
from pgdr.airflow_glue.task_run import _now, fail_fast, task_workdir, timed
from pgdr.runtime import VIA_ENV_VAR

log = logging.getLogger(__name__)


def _label(context, database: str, backup_id: str | None = None) -> None:
    context[CONTEXT_DATABASE] = database
    if backup_id:
        context[CONTEXT_BACKUP_ID] = backup_id


def _objects(plan: dict[str, Any], context):
    """Label the task for alerts; return the plan's :class:`~pgdr.incident.RestoreObjects`."""
    from pgdr.incident import RestoreObjects

    _label(context, plan["database"], plan["backup_id"])
    return RestoreObjects(plan, resources())


def _skip_dry_run(plan: dict[str, Any], why: str) -> None:
    if plan["dry_run"]:
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException(why)


def build_restore_plan(context) -> dict[str, Any]:
    """Body of ``plan_restore``: validate the form, choose the backup, print what will happen."""
    from pgdr.incident import plan_restore, render_plan

    with fail_fast(), task_workdir(context, "restore-plan") as workdir:
        started = context["dag_run"].run_after or datetime.now(UTC)
        restore_plan = plan_restore(
            dict(context["params"]), resources(), started, workdir, lambda **kw: _label(context, **kw)
        )
    log.info("Restore plan:\n%s", render_plan(restore_plan))
    return restore_plan


def run_recover_to_moment(plan: dict[str, Any], context) -> dict[str, Any]:
    """Body of ``recover_to_moment`` (:func:`pgdr.incident.dump_moment`); without PITR the plan passes through."""
    if plan["mode"] == "server":
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException(
            f"Mode server: the whole server is recovered by recover_server_{plan['server']} on the new host's worker."
        )
    if not plan.get("pitr") or plan["dry_run"]:
        return plan
    from pgdr.airflow_glue.task_run import AirflowTaskRun
    from pgdr.incident import dump_moment

    _label(context, plan["database"])
    with fail_fast():
        return dump_moment(plan, resources(), AirflowTaskRun(context), lambda **kw: _label(context, **kw))


def evidence_to_verify(plan: dict[str, Any], context) -> dict[str, str]:
    """Body of ``evidence_to_verify``: after a point-in-time restore succeeded, the conf of the
    ``pgdr_verify_restore`` run that proves its evidence copy restorable (the stored dump of the moment: the daily
    run takes only the backups whose recovery point lies in its interval, and a moment is often days old).
    Skipped when no copy was stored (a restore of a stored backup, a dry run, mode server)."""
    from airflow.sdk.exceptions import AirflowSkipException

    if plan["dry_run"] or not (plan.get("pitr") or {}).get("recovery"):
        raise AirflowSkipException("No moment was dumped by this run: there is no evidence copy to verify.")
    _label(context, plan["database"], plan["backup_id"])
    if os.environ.get(VIA_ENV_VAR):  # the break-glass command: nothing here would ever run the verification
        raise AirflowSkipException(
            f"Restored by {os.environ[VIA_ENV_VAR]}: no Airflow scheduler runs here to verify the evidence copy. Once "
            f"Airflow is back, trigger pgdr_verify_restore with database {plan['database']} and backup_id "
            f"{plan['backup_id']}."
        )
    log.info(
        "Triggering pgdr_verify_restore for backup %s of %s (the evidence copy of %s): it restores it into a scratch "
        "database and records whether it is good, as for every scheduled backup.",
        plan["backup_id"],
        plan["database"],
        plan["recovery_point"],
    )
    return {"database": plan["database"], "backup_id": plan["backup_id"]}


def trigger_evidence_verification(conf: dict[str, str], context) -> None:
    """Body of ``verify_evidence_copy``: trigger ``pgdr_verify_restore`` with ``conf`` under the run id
    ``evidence__<this run's id>`` (a retry finds it and skips). What TriggerDagRunOperator does, without importing
    it (and its provider's operators) into pgdr_restore's parse: the task runner creates the run."""
    import inspect

    from airflow.sdk.exceptions import DagRunTriggerException

    now = datetime.now(UTC)
    wanted = {
        "trigger_dag_id": "pgdr_verify_restore",
        "dag_run_id": f"evidence__{context['run_id']}",
        "conf": dict(conf),
        "logical_date": now,
        "run_after": now,
        "reset_dag_run": False,
        "skip_when_already_exists": True,
        "wait_for_completion": False,
        "allowed_states": ["success"],
        "failed_states": ["failed"],
        "poke_interval": 60,
        "deferrable": False,
    }
    accepted = inspect.signature(DagRunTriggerException.__init__).parameters
    raise DagRunTriggerException(**{k: v for k, v in wanted.items() if k in accepted})


def run_recover_server(plan: dict[str, Any], server_name: str, context) -> dict[str, Any]:
    """Body of ``recover_server_<server>``, run by the worker on the new host (the server's restore queue): recover,
    prove and hand over the whole server (:class:`pgdr.physical.server_recovery.ServerRecovery`)."""
    from airflow.sdk.exceptions import AirflowSkipException

    from pgdr.incident import parse_timestamp
    from pgdr.physical.server_recovery import ServerRecovery

    if plan["mode"] != "server" or plan["server"] != server_name:
        raise AirflowSkipException(f"This run does not recover server {server_name!r}.")
    _skip_dry_run(plan, "Dry run: the recovery plan is in the log of plan_restore; nothing was done.")
    _label(context, plan["database"])
    dag_run = context["dag_run"]
    incident = plan.get("incident") or {}
    res = resources()
    with fail_fast():
        server = res.plan.server(server_name)
        recovery = ServerRecovery(
            server,
            res,
            None if plan["selector"] == "latest" else parse_timestamp(plan["selector"]),
            plan["data_dir"],
            port=plan["port"],
            os_user=plan["os_user"],
            # the incident's declaration from the form; else when the recovery was asked for
            declared_at=parse_timestamp(incident["declared_at"]) if incident.get("declared_at") else dag_run.run_after,
            incident_id=incident.get("id"),
            resume_key=f"{dag_run.dag_id}/{dag_run.run_id}",  # a retry resumes this run's own directory
            triggered_by=f"{getattr(dag_run, 'triggering_user_name', None) or 'unknown'} (pgdr_restore "
            f"{dag_run.run_id})",
            source=server.pitr.storage_named(plan["restore_from"]) if plan.get("restore_from") else None,
        )
        try:
            report = recovery.run()
        except Exception as err:
            _server_recovery_receipt(res.plan, server_name, context, None, str(err))
            raise
    _server_recovery_receipt(res.plan, server_name, context, report)
    return report


def _server_recovery_receipt(plan, server_name: str, context, report, error: str | None = None) -> None:
    """The evidence receipt of the whole-server recovery this task ran (its last act)."""
    from pgdr.airflow_glue.evidence import actor_of, airflow_of, server_recovery_receipt

    server_recovery_receipt(plan, server_name, actor_of(context), report, error, airflow_of(context))


def run_check_checksums(plan: dict[str, Any], context) -> dict[str, Any]:
    """Body of ``check_checksums``: refuse a corrupt backup before creating anything."""
    from pgdr.logical.restore import verify_checksums

    _skip_dry_run(plan, "Dry run: the restore plan is in the log of plan_restore; nothing was done.")
    if plan.get("stored_while_restoring"):  # point in time: restored from the worker's disk, not from the bucket
        _label(context, plan["database"], plan["backup_id"])
        log.info("Nothing to download and check: %s.", plan["stored_while_restoring"]["checked"])
        return plan["stored_while_restoring"]
    with timed() as out, fail_fast():
        objs = _objects(plan, context)
        out.update(
            verify_checksums(
                objs.entry.manifest,
                objs.store,
                workers=max(2, objs.db.dump_jobs),
                data_key=objs.data_key(refuse_unencrypted=True),
            )
        )
    return out


def run_restore(plan: dict[str, Any], context) -> dict[str, Any]:
    """Body of ``restore_backup``: into the new target database; a failed try drops only its own target."""
    from pgdr.incident import restore_into_target

    if plan.get("restored_from_moment"):  # point in time: recover_to_moment restored the dump as it was written
        _label(context, plan["database"], plan["backup_id"])
        done = plan["restored_from_moment"]
        log.info(
            "Already restored into %s by recover_to_moment, straight from the recovered cluster's dump (%.1fs).",
            plan["target"],
            done["restore_seconds"],
        )
        return done
    with timed() as out, fail_fast():
        objs = _objects(plan, context)
        with task_workdir(context, f"incident-{objs.db.name}") as workdir:
            out.update(restore_into_target(objs, context["ti"].run_id, workdir))
    return out


def run_apply_privileges(plan: dict[str, Any], context) -> dict[str, Any]:
    """Body of ``apply_privileges``: owners, grants, default privileges and the database's settings,
    after the checks."""
    from pgdr.incident import check_app_roles
    from pgdr.logical.restore import give_back_privileges

    _skip_dry_run(plan, "Dry run: nothing was restored.")
    with timed() as out, fail_fast():
        objs = _objects(plan, context)
        with task_workdir(context, f"incident-privileges-{objs.db.name}") as workdir:
            report = give_back_privileges(
                objs.entry.manifest,
                objs.store,
                objs.server.with_dbname(plan["target"]),
                workdir,
                objs.data_key(),
                skip=objs.db.skip_objects,
            )
        out.update(report.to_dict())
        out["app_roles"] = check_app_roles(objs.db, objs.res.database(objs.db), objs.server.with_dbname(plan["target"]))
    return out


def _filled(context, plan) -> set[str] | None:
    if not plan["tables"]:
        return None
    return set(context["ti"].xcom_pull(task_ids="restore_backup")["tables_filled"])


def run_check_integrity(plan: dict[str, Any], context) -> dict[str, Any]:
    """Body of ``check_integrity`` on the restored target."""
    from pgdr.checks.integrity import check_integrity

    with timed() as out, fail_fast():
        objs = _objects(plan, context)
        with task_workdir(context, f"incident-check-{objs.db.name}") as workdir:
            out.update(
                check_integrity(
                    objs.restored,
                    objs.entry.manifest,
                    workdir,
                    objs.db.dump_jobs,
                    _filled(context, plan),
                    admin=objs.server,
                ).to_dict()
            )
    return out


def run_validate(plan: dict[str, Any], context) -> dict[str, Any]:
    """Body of ``validate_data``: GX on the restored target; results stored next to the backup."""
    from pgdr.checks.validation import failure_error, render_html, validate_restored

    run_id = context["ti"].run_id
    with timed() as out, fail_fast():
        objs = _objects(plan, context)
        report = validate_restored(objs.restored, objs.entry.manifest, _filled(context, plan))
        html_key = objs.report_key(run_id, "-validation.html")
        objs.store.put_bytes(
            html_key, render_html(report, objs.entry.manifest, {"Restored into": plan["target"], "Airflow run": run_id})
        )
        if not report.ok:
            raise failure_error(report, objs.entry.manifest, objs.store.describe(html_key))
        out.update({"summary": report.summary(), "report": objs.store.describe(html_key)})
    return out


def run_swap(plan: dict[str, Any], context) -> dict[str, Any]:
    """Body of ``swap_into_place`` (replace mode only; never retried blindly)."""
    from airflow.sdk.exceptions import AirflowSkipException

    from pgdr.incident import swap_or_rename

    if plan["mode"] != "replace":
        raise AirflowSkipException("new-database mode: the restored database stays next to the live one.")
    with timed() as out, fail_fast():
        out.update(swap_or_rename(_objects(plan, context).server, plan))
    return out


def run_report(context) -> dict[str, Any]:
    """Body of ``write_report``: markdown and JSON next to the backup, a Slack summary; fails if the restore did."""
    from airflow.sdk.exceptions import AirflowFailException

    from pgdr.airflow_glue.notify import send_slack
    from pgdr.incident import PHASES, write_restore_report
    from pgdr.messages import restore_failed, restore_not_planned, restore_summary

    ti, dag_run = context["ti"], context["dag_run"]
    plan = ti.xcom_pull(task_ids="recover_to_moment") or ti.xcom_pull(task_ids="plan_restore")
    if plan and plan["mode"] == "server":
        return _report_server_recovery(plan, context)
    refusal = restore_not_planned(plan)
    if refusal:
        raise AirflowFailException(refusal)
    if plan.get("pitr") and not plan.get("backup_id"):  # a dry run of a point-in-time restore
        return {"status": "dry-run", "plan": plan}
    objs = _objects(plan, context)
    via = os.environ.get(VIA_ENV_VAR) or "Airflow (the trigger form or the API)"
    run = {
        "triggered_by": getattr(dag_run, "triggering_user_name", None) or "unknown",
        "via": via,
        "run_id": ti.run_id,
        "log_url": ti.log_url,
        "written_at": _now(),
    }
    report, location = write_restore_report(objs, {p: ti.xcom_pull(task_ids=p) for p in PHASES}, run)
    _restore_receipt(objs, report, run, context)
    if report["status"] == "restored":  # a failed restore is alerted once, by the run's failure callback
        send_slack(restore_summary(report, location), objs.db.name, context)
    if report["status"] == "failed":
        raise AirflowFailException(restore_failed(plan, report["failed_phase"], location))
    return {
        "status": report["status"],
        "report": location,
        "achieved_rto_seconds": report["achieved_rto_seconds"],
        "final_state": report["final_state"],
    }


def _restore_receipt(objs, report: dict[str, Any], run: dict[str, Any], context) -> None:
    """The evidence receipt of an incident restore: what was restored from which backup, by whom, how it ended."""
    from pgdr.airflow_glue.evidence import record_evidence

    if objs.res.plan.evidence is None:  # no evidence log
        return
    if report["status"] not in ("restored", "failed"):
        return
    plan = report["plan"]
    details = {
        **{k: report[k] for k in ("failed_phase", "achieved_rto_seconds", "rto_target_seconds", "rto_met")},
        **{k: plan.get(k) for k in ("mode", "target", "recovery_point", "restore_from")},
        "phase_seconds": report["phase_seconds"],
        "checks": {"integrity": report["integrity"], "validation": report["validation"]},
        "triggered_by": run["triggered_by"],
        "incident": report.get("incident"),
    }
    key = objs.report_key(run["run_id"], ".json")
    record_evidence(
        context,
        objs.res.plan,
        "restore_finished" if report["status"] == "restored" else "restore_failed",
        {"database": objs.db.name, "backup_id": objs.entry.backup_id},
        "ok" if report["status"] == "restored" else "failed",
        details,
        (objs.db.storage_named(plan.get("restore_from")).name, key, lambda: objs.store.get_bytes(key)),
    )


def _report_server_recovery(plan: dict[str, Any], context) -> dict[str, Any]:
    """``write_report`` of mode server: the recovery task stored the report; say it on Slack, or fail the run."""
    from airflow.sdk.exceptions import AirflowFailException

    from pgdr.airflow_glue.notify import send_slack
    from pgdr.messages import pitr_target_words, server_recovery_summary

    if plan["dry_run"]:
        return {"status": "dry-run", "plan": plan}
    report = context["ti"].xcom_pull(task_ids=f"recover_server_{plan['server']}")
    if not report:
        raise AirflowFailException(
            f"The recovery of server {plan['server']} to {pitr_target_words(plan['pitr']['target'])} failed in "
            f"recover_server_{plan['server']} (its alert and log say why). The old host was not contacted; run "
            "again (with the data directory emptied) or run python -m pgdr recover-server --delta on the new host."
        )
    send_slack(server_recovery_summary(report), plan["database"], context)
    return {
        "status": report["status"],
        "report": report["report"],
        "achieved_rto_seconds": report["achieved_rto_seconds"],
    }
