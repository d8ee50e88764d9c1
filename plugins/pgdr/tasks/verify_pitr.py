"""What the tasks of ``pgdr_verify_pitr`` do: recover a server's newest chain to a moment on the worker, prove it."""

from __future__ import annotations

import logging
import socket
from datetime import datetime
from typing import Any

from pgdr.airflow_glue.notify import CONTEXT_BACKUP_ID
from pgdr.airflow_glue.task_run import CONTEXT_SERVER, _now, fail_fast, pitr_server_context, task_workdir
from pgdr.errors import PermanentFailure

log = logging.getLogger(__name__)


def run_find_servers(context) -> list[str]:
    """Body of ``find_servers``: the servers this run verifies (the param, the asset events, or all)."""
    from pgdr.physical.proof import find_servers
    from pgdr.plan import load_plan

    with fail_fast():
        return find_servers(load_plan(), context["params"].get("server"), context.get("triggering_asset_events"))


def run_plan_recovery(server_name: str, context) -> dict[str, Any]:
    """Body of ``plan_recovery``: heartbeats, their WAL archived, the target between them and the chain
    (:func:`pgdr.physical.proof.plan_target`)."""
    from pgdr.airflow_glue.connections import server_endpoint
    from pgdr.physical.proof import plan_target

    with fail_fast():
        plan, server, store, archive, catalog = pitr_server_context(server_name, context)
        with task_workdir(context, f"pitr-plan-{server.name}") as workdir:
            endpoint = server_endpoint(server, plan)
            recovery = plan_target(server, endpoint, catalog, store, archive, context["ti"].run_id, workdir)
    context[CONTEXT_BACKUP_ID] = recovery["backup_id"]
    return recovery


def _cluster_for(recovery: dict[str, Any], context):
    """Return this run's scratch cluster of ``recovery["server"]`` (the same directory on every retry)."""
    from pgdr.physical.cluster import cluster_dir_name, run_cluster
    from pgdr.workdir import work_dir_root

    ti = context["ti"]
    return run_cluster(work_dir_root() / cluster_dir_name(ti.dag_id, ti.run_id, recovery["server"]), recovery)


def run_recover_cluster(recovery: dict[str, Any], context) -> dict[str, Any]:
    """Body of the ``recover_cluster`` setup task: build the chain into a scratch cluster and recover it."""
    from pgdr.airflow_glue.task_run import recover_scratch_cluster

    started = _now()
    with fail_fast():
        _, server, store, archive, catalog = pitr_server_context(recovery["server"], context)
        context[CONTEXT_BACKUP_ID] = recovery["backup_id"]
        cluster, prepared, result = recover_scratch_cluster(
            context,
            server.name,
            f"recovery of server {server.name} to {recovery['target']}",
            catalog,
            catalog.get(recovery["backup_id"]),
            store,
            archive,
            datetime.fromisoformat(recovery["target"]),
            recovery["login"],
        )
    return {
        **recovery,
        "host": socket.gethostname(),
        "port": cluster.port,
        "root": str(cluster.root),
        "started_at": started,
        "finished_at": _now(),
        "timings": {k: round(v, 2) for k, v in prepared.timings.items()},
        "recovery": result.to_dict(),
    }


def _same_host(cluster_info: dict[str, Any]) -> None:
    if cluster_info["host"] != socket.gethostname():
        raise PermanentFailure(
            f"The scratch cluster runs on worker {cluster_info['host']}, but this task runs on "
            f"{socket.gethostname()}. The tasks of one pgdr_verify_pitr run must run on one worker: route them to "
            "one queue or host."
        )


def run_check_target(cluster_info: dict[str, Any], context) -> dict[str, Any]:
    """Body of ``check_recovery_target``: every heartbeat at or before the target is there, none after."""
    from pgdr.airflow_glue.connections import server_endpoint
    from pgdr.physical.heartbeat import heartbeats
    from pgdr.physical.proof import check_target_hit

    with fail_fast():
        plan, server, *_ = pitr_server_context(cluster_info["server"], context)
        _same_host(cluster_info)
        hit = check_target_hit(
            server.name,
            datetime.fromisoformat(cluster_info["target"]),
            heartbeats(server_endpoint(server, plan)),
            heartbeats(_cluster_for(cluster_info, context).endpoint()),
        )
    log.info(
        "Recovery target hit exactly: %d heartbeats up to the target are present, none after it.",
        hit["heartbeats_before_target"],
    )
    return hit


def run_check_databases(cluster_info: dict[str, Any], context) -> dict[str, Any]:
    """Body of ``check_databases``: pg_amcheck, sequences and GX suites of every plan database on the server."""
    from pgdr.physical.proof import check_recovered_databases

    with fail_fast():
        plan, server, *_ = pitr_server_context(cluster_info["server"], context)
        _same_host(cluster_info)
        return check_recovered_databases(
            plan,
            server,
            _cluster_for(cluster_info, context),
            cluster_info["backup_id"],
            cluster_info["target"],
            lambda label: task_workdir(context, label),
        )


def run_stop_cluster(server_name: str, context) -> bool:
    """Body of the ``stop_cluster`` teardown: stop and remove this run's scratch cluster, wherever it got."""
    context[CONTEXT_SERVER] = server_name
    with fail_fast():
        cluster = _cluster_for({"server": server_name}, context)
        existed = cluster.root.exists()
        cluster.destroy()
    return existed


def run_record_pitr_verification(server_name: str, context) -> dict[str, Any]:
    """Body of ``record_verification``: verified or failed, with the achieved recovery point, next to the base
    backup."""
    from airflow.sdk.exceptions import AirflowFailException

    from pgdr.airflow_glue.evidence import record_evidence
    from pgdr.physical.proof import pitr_record

    ti = context["ti"]
    context[CONTEXT_SERVER] = server_name
    pulled = {
        task: ti.xcom_pull(task_ids=f"verify.{task}", map_indexes=ti.map_index)
        for task in ("plan_recovery", "recover_cluster", "check_recovery_target", "check_databases")
    }
    recovery = pulled["plan_recovery"]
    if not recovery:
        raise AirflowFailException(
            f"Nothing to record for server {server_name!r}: plan_recovery failed before a base backup was chosen "
            "(its error is above)."
        )
    with fail_fast():
        plan, server, store, _, catalog = pitr_server_context(recovery["server"], context)
        context[CONTEXT_BACKUP_ID] = recovery["backup_id"]
        record = pitr_record(
            server.name,
            recovery,
            pulled["recover_cluster"],
            pulled["check_recovery_target"],
            pulled["check_databases"],
            {"dag_id": ti.dag_id, "run_id": ti.run_id},
            _now(),
        )
        key = catalog.record_verification(record)
    log.info("Recorded %s for base backup %s: %s", record.status, recovery["backup_id"], store.describe(key))
    if plan.evidence is not None:  # the receipt of an evidence log
        details = {
            "target": record.target,
            "chain": record.chain,
            "failed_phase": record.failed_phase,
            "achieved_recovery_point": (record.recovery or {}).get("achieved_recovery_point"),
            "replay_seconds": (record.recovery or {}).get("replay_seconds"),
            "databases": {
                name: {"amcheck_ok": (facts.get("integrity") or {}).get("amcheck_ok")}
                for name, facts in (record.databases or {}).items()
            },
        }
        record_evidence(
            context,
            plan,
            "pitr_verified" if record.verified else "pitr_verification_failed",
            {"server": server.name, "backup_id": recovery["backup_id"]},
            "ok" if record.verified else "failed",
            details,
            (server.pitr.storage.name, key, lambda: store.get_bytes(key)),
        )
    if not record.verified:
        raise AirflowFailException(
            f"Point-in-time recovery of server {server.name!r} from base backup {recovery['backup_id']} was not "
            "verified (the failed task above says why). Recorded as failed next to the base backup."
        )
    return record.to_dict()
