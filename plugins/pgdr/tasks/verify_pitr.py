"""What the tasks of ``pgdr_verify_pitr`` do: recover a server's newest chain to a moment on the worker, prove it."""

from __future__ import annotations

import logging
import socket
import time
from datetime import datetime
from typing import Any

from pgdr.airflow_glue.notify import CONTEXT_BACKUP_ID
from pgdr.airflow_glue.task_run import CONTEXT_SERVER, _now, fail_fast, pitr_server_context, task_workdir
from pgdr.errors import PermanentFailure
from pgdr.records import PITR_KIND, VerificationRecord

log = logging.getLogger(__name__)


def run_find_servers(context) -> list[str]:
    """Body of ``find_servers``: the servers this run verifies (the param, the asset events, or all)."""
    from pgdr.plan import load_plan

    with fail_fast():
        plan = load_plan()
        if context["params"].get("server"):
            return [plan.server(context["params"]["server"]).name]
        named = []
        for events in (context.get("triggering_asset_events") or {}).values():
            for event in events:
                name = (event.extra or {}).get("server")
                if name in plan.server_names and name not in named:
                    named.append(name)
        return named or plan.server_names


def run_plan_recovery(server_name: str, context) -> dict[str, Any]:
    """Body of ``plan_recovery``: write heartbeats, have their WAL archived, choose the target and the chain.

    The target lies between two heartbeats written a second apart, after the newest base backup:
    the recovery replays the whole chain and all WAL up to it, and must hold the first heartbeat
    and not the second.
    """
    from pgdr.airflow_glue.connections import server_endpoint
    from pgdr.physical.heartbeat import switch_and_wait_archived, write_heartbeat
    from pgdr.physical.recovery import choose_backup, recoverable_window

    with fail_fast():
        plan, server, store, archive, catalog = pitr_server_context(server_name, context)
        endpoint = server_endpoint(server, plan)
        source = f"pgdr_verify_pitr {context['ti'].run_id}"
        before = write_heartbeat(endpoint, source + " (before target)")
        time.sleep(1.0)
        after = write_heartbeat(endpoint, source + " (after target)")
        switch_and_wait_archived(endpoint, server.pitr.archive_timeout.total_seconds() + 120)
        target = before + (after - before) / 2
        with task_workdir(context, f"pitr-plan-{server.name}") as workdir:
            window = recoverable_window(catalog, archive, store, workdir)
        entry = choose_backup(window, target)
        context[CONTEXT_BACKUP_ID] = entry.backup_id
        chain = catalog.chain(entry, list(window.backups))
    return {
        "server": server.name,
        "backup_id": entry.backup_id,
        "chain": [e.backup_id for e in chain],
        "target": target.isoformat(),
        "heartbeat_before": before.isoformat(),
        "heartbeat_after": after.isoformat(),
        "window": {"oldest": window.oldest.isoformat(), "newest": window.newest.isoformat()},
        "pg_version": entry.record.pg_version,
        "login": endpoint.user,
    }


def _cluster_for(recovery: dict[str, Any], context):
    """Return this run's scratch cluster of ``recovery["server"]`` (the same directory on every retry)."""
    import json

    from pgdr.physical.cluster import MARKER, ScratchCluster, cluster_dir_name
    from pgdr.workdir import work_dir_root

    ti = context["ti"]
    root = work_dir_root() / cluster_dir_name(ti.dag_id, ti.run_id, recovery["server"])
    marker = {}
    if (root / MARKER).exists():
        marker = json.loads((root / MARKER).read_text())
    return ScratchCluster(
        root,
        recovery.get("pg_version") or marker.get("pg_version") or 180000,
        login=recovery.get("login", "postgres"),
        port=recovery.get("port") or marker.get("port") or 0,
    )


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
    """Body of ``record_verification``: verified or failed, with the achieved recovery point, next
    to the base backup."""
    from airflow.sdk.exceptions import AirflowFailException

    ti = context["ti"]
    context[CONTEXT_SERVER] = server_name

    def pulled(task_id: str):
        return ti.xcom_pull(task_ids=f"verify.{task_id}", map_indexes=ti.map_index)

    recovery = pulled("plan_recovery")
    if not recovery:
        raise AirflowFailException(
            f"Nothing to record for server {server_name!r}: plan_recovery failed before a base backup was chosen "
            "(its error is above)."
        )
    cluster_info, target_check, databases = (
        pulled("recover_cluster"),
        pulled("check_recovery_target"),
        pulled("check_databases"),
    )
    ok = bool(cluster_info and target_check and databases is not None)
    with fail_fast():
        _, server, store, _, catalog = pitr_server_context(recovery["server"], context)
        context[CONTEXT_BACKUP_ID] = recovery["backup_id"]
        record = VerificationRecord(
            status="verified" if ok else "failed",
            kind=PITR_KIND,
            verified_at=_now(),
            server=server.name,
            backup_id=recovery["backup_id"],
            chain=recovery["chain"],
            target=recovery["target"],
            window=recovery["window"],
            recovery=(cluster_info or {}).get("recovery"),
            timings=(cluster_info or {}).get("timings"),
            target_check=target_check,
            databases=databases,
            airflow={"dag_id": ti.dag_id, "run_id": ti.run_id},
        )
        key = catalog.record_verification(record)
    log.info("Recorded %s for base backup %s: %s", record.status, recovery["backup_id"], store.describe(key))
    if not ok:
        raise AirflowFailException(
            f"Point-in-time recovery of server {server.name!r} from base backup {recovery['backup_id']} was not "
            "verified (the failed task above says why). Recorded as failed next to the base backup."
        )
    return record.to_dict()
