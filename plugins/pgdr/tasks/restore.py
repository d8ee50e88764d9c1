"""What the tasks of ``pgdr_restore`` do (the incident restore DAG); see :mod:`pgdr.incident`.

The first task resolves and validates the whole request and prints the restore plan; every
later task works from that plan (an XCom of plain values), so a retry does exactly the same
thing. Bad input fails in the first task, before anything is touched.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from typing import Any

from pgdr.airflow_glue.notify import CONTEXT_BACKUP_ID, CONTEXT_DATABASE
from pgdr.errors import PgdrError
from pgdr.identifiers import printable
from pgdr.messages import SUPERUSER_RESTORE_WARNING
from pgdr.runtime import VIA_ENV_VAR
from pgdr.tasks.common import _airflow_info, _now, fail_fast, task_workdir

log = logging.getLogger(__name__)

PHASES = ("check_checksums", "restore_backup", "check_integrity", "validate_data", "apply_privileges", "swap_into_place")


def _label(plan: dict, context) -> None:
    context[CONTEXT_DATABASE] = plan["database"]
    context[CONTEXT_BACKUP_ID] = plan["backup_id"]


def build_restore_plan(params: dict[str, Any], context) -> dict[str, Any]:
    """Body of ``plan_restore``: validate the form, choose the backup, print what will happen."""
    from pgdr.airflow_glue.connections import database_endpoint, open_store, restore_endpoint
    from pgdr.incident import (
        MODES,
        InvalidRestoreRequest,
        check_target_name,
        database_exists,
        database_oid,
        default_target_name,
        expected_duration,
        parse_timestamp,
        render_plan,
        select_backup,
    )
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.logical.privileges import missing_roles
    from pgdr.plan import load_plan
    from pgdr.postgres.client import check_restore_role

    with fail_fast():
        plan = load_plan()
        db = plan.database(params.get("database") or "")
        context[CONTEXT_DATABASE] = db.name
        mode = params.get("mode") or "new-database"
        if mode not in MODES:
            raise InvalidRestoreRequest(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
        tables = parse_tables(params.get("tables"))
        known_conns = sorted({d.conn_id for d in plan.databases} | {d.verify_conn_id for d in plan.databases})
        target_conn_id = params.get("target_conn_id") or db.conn_id
        if target_conn_id not in known_conns:
            raise InvalidRestoreRequest(
                f"target_conn_id {target_conn_id!r} is not a server of the DR plan; choose one of {', '.join(known_conns)}."
            )
        if mode == "replace":
            confirm = params.get("confirm")
            if confirm != db.dbname:
                typed = ""
                if confirm and confirm.strip() == db.dbname:
                    typed = f" (you typed {confirm!r}, with spaces around the name: type it exactly)."
                elif confirm:
                    typed = f" (you typed {printable(str(confirm))!r})."
                raise InvalidRestoreRequest(
                    f"Replace mode renames the live database {printable(db.dbname)!r} and puts the restored copy in its place. "
                    f"To confirm, type the database name {printable(db.dbname)!r} in the 'confirm' field"
                    + (typed or ".") + " Nothing was touched."
                )
            if target_conn_id != db.conn_id:
                raise InvalidRestoreRequest(
                    "Replace mode works on the live server only; leave target_conn_id empty, or use new-database mode "
                    "to restore onto another server."
                )
            if tables:
                raise InvalidRestoreRequest(
                    "A table-level restore goes into a new database next to the live one (mode new-database); "
                    "copy the rows you need from there. pgdr never overwrites live tables."
                )

        store, layout = open_store(db.storage, plan)
        catalog = BackupCatalog(store, layout, db.name)
        selector = params.get("backup") or "latest-verified"
        pitr_server = plan.pitr_server_of(db.name)
        moment = parse_timestamp(selector) if pitr_server is not None else None
        if moment is not None:
            # The server has a WAL archive: recover it to that very moment instead of taking an older dump.
            pitr = plan_point_in_time(pitr_server, plan, moment, context)
            entry = None
        else:
            pitr = None
            entry = select_backup(catalog, selector)
            context[CONTEXT_BACKUP_ID] = entry.backup_id
            check_tables_in_backup(tables, entry)

        server = database_endpoint(db, plan, conn_id=target_conn_id)
        check_restore_role(restore_endpoint(db, plan, server), db.restore_as_superuser)
        started = context["dag_run"].run_after or datetime.now(UTC)
        live_oid = database_oid(server, db.dbname)
        live_exists = live_oid is not None
        if mode == "new-database":
            target = check_target_name(params.get("target_name") or default_target_name(db.dbname, started), db.dbname)
            if database_exists(server, target):
                raise InvalidRestoreRequest(
                    f"The target database {target!r} already exists on {server.host}:{server.port}. pgdr never "
                    "overwrites a database: choose another target_name, or drop that one yourself if it is garbage."
                )
            fate = (
                f"The live database {db.dbname!r} is not touched; the backup is restored as {target!r} next to it."
            )
            keep_as = None
        else:
            target = default_target_name(db.dbname, started, "restoring")
            keep_as = default_target_name(db.dbname, started, "pre_restore")
            for name in (target, keep_as):
                if database_exists(server, name):
                    raise InvalidRestoreRequest(f"Database {name!r} already exists; wait a second and trigger again.")
            fate = (
                f"The backup is restored as {target!r} and checked. Only if it passes: sessions on {db.dbname!r} are "
                f"ended, {db.dbname!r} is renamed to {keep_as!r} (kept, never dropped, connections disabled) and the "
                f"restored copy takes the name {db.dbname!r}."
                if live_exists
                else f"The live database {db.dbname!r} does not exist; the checked restored copy will take its name."
            )
        needs, unread = None, None
        if entry is not None:
            try:
                needs = backup_needs_of(db, entry.manifest, store, context)
            except PgdrError as err:  # a damaged backup is check_checksums' to refuse, with every bad file named
                unread = str(err)
        missing = missing_roles(needs, server) if needs else []
        restore_roles = bool(params.get("restore_roles"))
        if missing and not restore_roles:
            raise InvalidRestoreRequest(
                f"Backup {entry.backup_id} names {len(missing)} role(s) that server {server.host}:{server.port} does not have "
                f"(owners or grantees of its objects): {', '.join(printable(r) for r in missing)}. Create them there first "
                "(from your roles' source of truth, or pg_dumpall --globals-only of the source server), or trigger again with "
                "restore_roles on: pgdr then creates them as they were on the source server (from the backup's copy of its "
                "roles; without passwords unless restore_role_passwords is on). Nothing was touched."
            )
        expected = expected_duration(catalog)
        if pitr is not None:
            expected = (pitr["expected_recovery_seconds"] or 0) + (expected or 0) or None

    restore_plan = {
        "database": db.name,
        "dbname": db.dbname,
        "backup_id": entry.backup_id if entry else None,  # PITR: the dump of the recovered moment, made by recover_to_moment
        "recovery_point": entry.manifest.recovery_point.isoformat() if entry else pitr["target"],
        "backup_status": entry.status if entry else f"point-in-time recovery from base backup {pitr['base_backup']}",
        "backup_size_bytes": entry.manifest.size if entry else pitr["base_backup_bytes"],
        "stored_size_bytes": entry.manifest.stored_size if entry else pitr["base_backup_bytes"],
        "size": entry.manifest.size_summary() if entry else pitr["size"],
        "pitr": pitr,
        "selector": selector,
        "mode": mode,
        "target_conn_id": target_conn_id,
        "target_server": f"{server.host}:{server.port}",
        "target": target,
        "keep_live_as": keep_as,
        "live_exists": live_exists,
        "live_oid": live_oid,
        "tables": tables,
        "dry_run": bool(params.get("dry_run")),
        "expected_seconds": expected,
        "rto_target_seconds": db.rto.total_seconds(),
        "what_happens": fate + (f" {SUPERUSER_RESTORE_WARNING}" if db.restore_as_superuser else ""),
        "restore_as_superuser": db.restore_as_superuser,
        "restore_roles": restore_roles,
        "restore_role_passwords": restore_roles and bool(params.get("restore_role_passwords")),
        "roles_to_create": missing,
        "needs": needs.to_dict() if needs else None,  # PITR: known once the moment is dumped
        "needs_unread": unread,
    }
    log.info("Restore plan:\n%s", render_plan(restore_plan))
    return restore_plan


def backup_needs_of(db, manifest, store, context):
    """Read what a backup needs of its target (roles, encoding and locale) from its table of contents alone."""
    from pgdr.airflow_glue.connections import backup_data_key
    from pgdr.logical.privileges import backup_needs, read_toc
    from pgdr.logical.restore import fetch_toc

    with task_workdir(context, f"toc-{db.name}") as workdir:
        fetch_toc(manifest, store, workdir / "dump", backup_data_key(db, manifest))
        return backup_needs(read_toc(workdir / "dump"), workdir)


def plan_point_in_time(server, plan, moment: datetime, context) -> dict[str, Any]:
    """The PITR part of ``plan_restore``: the window, the chain, the WAL to replay, the expected time.

    :raises TargetOutsideWindow: naming the recoverable window, when ``moment`` lies outside it.
    """
    import statistics

    from pgdr.airflow_glue.connections import open_archive
    from pgdr.messages import format_duration
    from pgdr.physical.catalog import BaseBackupCatalog
    from pgdr.physical.recovery import choose_backup, recoverable_window

    store, layout, archive = open_archive(server, plan)
    catalog = BaseBackupCatalog(store, layout, server.name)
    with task_workdir(context, f"pitr-plan-{server.name}") as workdir:
        window = recoverable_window(catalog, archive, store, workdir)
    entry = choose_backup(window, moment)
    chain = catalog.chain(entry, list(window.backups))
    size = entry.record.wal_segment_size
    start = entry.record.start_wal
    needed = []
    for segment in (s for s in archive.segments(store) if s.name >= start):
        needed.append(segment)  # up to the first segment archived after the moment: it holds the moment
        if segment.stored_at > moment:
            break
    past = [e.verification for e in window.backups if e.verification and e.verification.get("recovery")]
    seconds = [sum((v.get("timings") or {}).values()) + (v["recovery"].get("replay_seconds") or 0) for v in past]
    expected = statistics.median(seconds) if seconds else None
    return {
        "server": server.name, "target": moment.isoformat(), "base_backup": entry.backup_id,
        "chain": [e.backup_id for e in chain], "base_backup_bytes": sum(e.record.size for e in chain),
        "base_backup_ended": entry.record.finished_at.isoformat(),
        "wal_segments": len(needed), "wal_bytes": len(needed) * size,
        "window": {"oldest": window.oldest.isoformat(), "newest": window.newest.isoformat()},
        "size": f"base backup chain {', '.join(e.backup_id for e in chain)} ({sum(e.record.size for e in chain) / 1e6:.1f} MB "
                f"stored), then up to {len(needed)} WAL segments ({len(needed) * size / 1e6:.0f} MB) replayed to the moment",
        "expected_recovery_seconds": expected,
        "expected_recovery": format_duration(expected) if expected else "unknown (no PITR verification yet)",
    }


def run_recover_to_moment(plan: dict[str, Any], context) -> dict[str, Any]:
    """Body of ``recover_to_moment``: for a point-in-time restore, recover the server in a scratch cluster
    to the moment, and store a dump of the database as it was then (a regular backup, which the later
    phases restore and check exactly like any other). Without PITR the plan passes through unchanged."""
    if not plan.get("pitr") or plan["dry_run"]:
        return plan
    from pgdr.airflow_glue.connections import encryption_keys, open_archive, open_store, server_endpoint
    from pgdr.logical.backup import take_backup
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.physical.catalog import BaseBackupCatalog
    from pgdr.plan import load_plan
    from pgdr.tasks.common import recover_scratch_cluster

    context[CONTEXT_DATABASE] = plan["database"]
    pitr = plan["pitr"]
    started = _now()
    with fail_fast():
        dr_plan = load_plan()
        db = dr_plan.database(plan["database"])
        server = dr_plan.server(pitr["server"])
        store, layout, archive = open_archive(server, dr_plan)
        catalog = BaseBackupCatalog(store, layout, server.name)
        login = server_endpoint(server, dr_plan).user
        entry = catalog.get(pitr["base_backup"])
        cluster, prepared, result = recover_scratch_cluster(
            context, plan["database"], f"point-in-time restore of {db.name} to {pitr['target']}", catalog, entry, store,
            archive, datetime.fromisoformat(pitr["target"]), login,
        )
        try:
            with task_workdir(context, f"pitr-dump-{db.name}") as workdir:
                db_store, db_layout = open_store(db.storage, dr_plan)
                achieved = result.achieved_point or datetime.fromisoformat(pitr["target"])
                info = {**_airflow_info(context), "pitr_server": server.name, "pitr_target": pitr["target"],
                        "base_backup": entry.backup_id}
                dumped = take_backup(db, cluster.endpoint(db.dbname), db_store, db_layout, workdir, info, recovery_point=achieved,
                                     keys=encryption_keys(db, dr_plan))
        finally:
            cluster.destroy()
        manifest = dumped.manifest
        context[CONTEXT_BACKUP_ID] = manifest.backup_id
        check_tables_in_backup(plan["tables"], BackupCatalog(db_store, db_layout, db.name).get(manifest.backup_id))
    log.info(
        "Server %s recovered to %s (achieved %s: the last transaction replayed); database %s dumped from it as backup %s.",
        server.name, pitr["target"], achieved.isoformat(), db.name, manifest.backup_id,
    )
    return {
        **plan, "backup_id": manifest.backup_id, "recovery_point": achieved.isoformat(),
        "backup_status": f"dumped from the recovered moment (base backup {entry.backup_id})",
        "size": manifest.size_summary(), "backup_size_bytes": manifest.size, "stored_size_bytes": manifest.stored_size,
        "pitr": {**pitr, "recovery": result.to_dict(), "timings": {k: round(v, 2) for k, v in prepared.timings.items()},
                 "started_at": started, "finished_at": _now()},
    }


def parse_tables(value: Any) -> list[str]:
    """Read the form's ``tables`` list: each entry ``schema.table`` as SQL writes it; return their keys."""
    from pgdr.identifiers import InvalidIdentifier, parse_qualified_name
    from pgdr.incident import InvalidRestoreRequest

    if value in (None, "", []):
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise InvalidRestoreRequest(f"'tables' must be a list of schema.table names; got {printable(repr(value))}.")
    keys = []
    for item in value:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            keys.append(str(parse_qualified_name(item, "tables entry")))
        except InvalidIdentifier as err:
            raise InvalidRestoreRequest(f"{err} Nothing was touched.") from None
    return list(dict.fromkeys(keys))


def check_tables_in_backup(tables: list[str], entry) -> None:
    """Refuse ``tables`` entries that are not tables of the backup, suggesting the near ones."""
    from pgdr.identifiers import legacy_table_key, parse_qualified_name
    from pgdr.incident import InvalidRestoreRequest

    known = entry.manifest.row_counts
    unknown = [t for t in tables if t not in known]
    if not unknown:
        return
    hints = []
    for key in unknown:
        wanted = parse_qualified_name(key)
        near = [k for k in known if parse_qualified_name(k).name.lower() == wanted.name.lower()
                or legacy_table_key(k) == key]
        if near:
            hints.append(f"for {printable(key)} did you mean {', '.join(printable(n) for n in sorted(near))}?")
    listing = ", ".join(printable(k) for k in sorted(known)[:30]) + (" ..." if len(known) > 30 else "")
    raise InvalidRestoreRequest(
        f"Not a table of backup {entry.backup_id}: {', '.join(printable(t) for t in unknown)}. "
        + (" ".join(hints) + " " if hints else "")
        + "Name tables as schema.table, double-quoting names with upper case, spaces or dots "
        '(e.g. "Sales Dept"."Customer Accounts"). Views, materialized views and sequences are not '
        "tables: they come back with the schema of every table-level restore. "
        f"The backup's tables: {listing}. Nothing was touched."
    )


def _objects(plan: dict[str, Any]):
    from pgdr.airflow_glue.connections import database_endpoint, open_store
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.plan import load_plan

    dr_plan = load_plan()
    db = dr_plan.database(plan["database"])
    store, layout = open_store(db.storage, dr_plan)
    entry = BackupCatalog(store, layout, db.name).get(plan["backup_id"])
    server = database_endpoint(db, dr_plan, conn_id=plan["target_conn_id"])
    return db, store, layout, entry, server


def _restored(db, server, plan: dict[str, Any]):
    """Return the restored copy as the restore role sees it (see pgdr.airflow_glue.connections.restore_endpoint)."""
    from pgdr.airflow_glue.connections import restore_endpoint

    return restore_endpoint(db, None, server).with_dbname(plan["target"])


def run_check_checksums(plan: dict[str, Any], context) -> dict[str, Any]:
    """Body of ``check_checksums``: refuse a corrupt backup before creating anything."""
    from airflow.sdk.exceptions import AirflowSkipException

    from pgdr.airflow_glue.connections import backup_data_key
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.logical.restore import verify_checksums

    _label(plan, context)
    if plan["dry_run"]:
        raise AirflowSkipException("Dry run: the restore plan is in the log of plan_restore; nothing was done.")
    started = _now()
    with fail_fast():
        db, store, layout, entry, _server = _objects(plan)
        data_key = backup_data_key(db, entry.manifest, catalog=BackupCatalog(store, layout, db.name))
        result = verify_checksums(entry.manifest, store, workers=max(2, db.dump_jobs), data_key=data_key)
    return {"started_at": started, "finished_at": _now(), **result}


def run_restore(plan: dict[str, Any], context) -> dict[str, Any]:
    """Body of ``restore_backup``: into the new target database; a failed try drops only its own target.

    The target is created with the source's encoding and locale; roles the backup names that the
    server lacks are created first (as on the source server, from the backup's ``globals.sql``) when
    the form allows it (``restore_roles``), or the restore stops.
    """
    from pgdr.airflow_glue.connections import backup_data_key
    from pgdr.incident import create_target, drop_own_target, restore_tables
    from pgdr.logical.privileges import MissingRoles, backup_needs, create_roles, globals_of, missing_roles, read_toc
    from pgdr.logical.restore import download_backup, restore_dump
    from pgdr.postgres.client import check_restore_role

    _label(plan, context)
    started = _now()
    run_id = context["ti"].run_id
    with fail_fast():
        db, store, _layout, entry, server = _objects(plan)
        target = _restored(db, server, plan)
        check_restore_role(target, db.restore_as_superuser)
        data_key = backup_data_key(db, entry.manifest)  # a missing key fails here, before the target is created
        with task_workdir(context, f"incident-{db.name}") as workdir:
            download = download_backup(entry.manifest, store, workdir / "dump", workers=max(2, db.dump_jobs), data_key=data_key)
            needs = backup_needs(read_toc(workdir / "dump"), workdir)
            missing = missing_roles(needs, server)
            if missing and not plan.get("restore_roles"):
                raise MissingRoles(
                    f"Backup {entry.backup_id} names role(s) that server {plan['target_server']} does not have: "
                    f"{', '.join(printable(r) for r in missing)}. Create them, or trigger again with restore_roles on. "
                    "Nothing was created; the live database was not touched."
                )
            created = create_roles(server, missing, f"restore {run_id} of {db.name}", globals_of(workdir / "dump"),
                                   with_passwords=bool(plan.get("restore_role_passwords")))
            create_target(server, plan["target"], run_id, owner=target, options=needs.database_options)
            try:
                t0 = datetime.now(UTC)
                if plan["tables"]:
                    filled = sorted(restore_tables(target, workdir / "dump", plan["tables"], db.dump_jobs, workdir))
                else:
                    restore_dump(target, workdir / "dump", db.dump_jobs, workdir)
                    filled = None
                restore_s = (datetime.now(UTC) - t0).total_seconds()
            except BaseException:
                # A half-restored database is garbage; only a database this run created is dropped.
                drop_own_target(server, plan["target"], run_id)
                raise
    log.info("Backup %s restored into %s in %.1fs (download %.1fs).", entry.backup_id, plan["target"], restore_s, download["seconds"])
    return {"started_at": started, "finished_at": _now(), "download_seconds": download["seconds"],
            "restore_seconds": restore_s, "tables_filled": filled, "roles_created": created,
            "database_options": needs.database_options}


def run_apply_privileges(plan: dict[str, Any], context) -> dict[str, Any]:
    """Body of ``apply_privileges``: owners, grants, default privileges and the database's settings, after the checks."""
    from airflow.sdk.exceptions import AirflowSkipException

    from pgdr.airflow_glue.connections import backup_data_key
    from pgdr.logical.restore import give_back_privileges

    _label(plan, context)
    if plan["dry_run"]:
        raise AirflowSkipException("Dry run: nothing was restored.")
    started = _now()
    with fail_fast():
        db, store, _layout, entry, server = _objects(plan)
        with task_workdir(context, f"incident-privileges-{db.name}") as workdir:
            report = give_back_privileges(entry.manifest, store, server.with_dbname(plan["target"]), workdir,
                                          backup_data_key(db, entry.manifest), skip=db.skip_objects)
        app_roles = check_app_roles(db, plan)
    return {"started_at": started, "finished_at": _now(), **report.to_dict(), "app_roles": app_roles}


def check_app_roles(db, plan: dict[str, Any]) -> dict[str, Any] | None:
    """The plan's ``app_roles``: each may do on the restored copy what it may do on the live database, or the restore stops."""
    from pgdr.airflow_glue.connections import database_endpoint
    from pgdr.incident import database_exists
    from pgdr.logical.privileges import PrivilegesFailed, app_roles_problem, compare_app_roles

    if not db.app_roles:
        return None
    live = database_endpoint(db)  # the live database, on its own server, before any swap
    if not database_exists(live, db.dbname):
        log.warning("app_roles not compared: the live database %s does not exist.", db.dbname)
        return {"skipped": f"the live database {db.dbname!r} does not exist"}
    restored = database_endpoint(db, conn_id=plan["target_conn_id"]).with_dbname(plan["target"])
    compared = compare_app_roles(live, restored, db.app_roles)
    problem = app_roles_problem(compared)
    if problem:
        raise PrivilegesFailed(problem)
    for role, found in compared.items():
        log.info("Application login %s: the same %d privileges on the restored copy as on the live database.", role, found["checked"])
    return compared


def _filled(context, plan) -> set[str] | None:
    if not plan["tables"]:
        return None
    restored = context["ti"].xcom_pull(task_ids="restore_backup")
    return set(restored["tables_filled"])


def run_check_integrity(plan: dict[str, Any], context) -> dict[str, Any]:
    """Body of ``check_integrity`` on the restored target."""
    from pgdr.checks.integrity import check_integrity

    _label(plan, context)
    started = _now()
    with fail_fast():
        db, _store, _layout, entry, server = _objects(plan)
        with task_workdir(context, f"incident-check-{db.name}") as workdir:
            report = check_integrity(
                _restored(db, server, plan), entry.manifest, workdir, db.dump_jobs, _filled(context, plan), admin=server
            )
    return {"started_at": started, "finished_at": _now(), **report.to_dict()}


def run_validate(plan: dict[str, Any], context) -> dict[str, Any]:
    """Body of ``validate_data``: GX on the restored target; results stored next to the backup."""
    from pgdr.checks.validation import failure_error, render_html, validate_restored

    _label(plan, context)
    started = _now()
    run_id = context["ti"].run_id
    with fail_fast():
        db, store, layout, entry, server = _objects(plan)
        report = validate_restored(_restored(db, server, plan), entry.manifest, _filled(context, plan))
        stamp = _run_stamp(run_id)
        html_key = layout.restore_report_key(db.name, entry.backup_id, f"{stamp}-validation.html")
        store.put_bytes(html_key, render_html(report, entry.manifest, {"Restored into": plan["target"], "Airflow run": run_id}))
        if not report.ok:
            raise failure_error(report, entry.manifest, store.describe(html_key))
    return {"started_at": started, "finished_at": _now(), "summary": report.summary(), "report": store.describe(html_key)}


def run_swap(plan: dict[str, Any], context) -> dict[str, Any]:
    """Body of ``swap_into_place`` (replace mode only; never retried blindly)."""
    from airflow.sdk.exceptions import AirflowSkipException

    from pgdr.incident import clear_marker, swap_into_place
    from pgdr.postgres.client import connect, identifier

    _label(plan, context)
    if plan["mode"] != "replace":
        raise AirflowSkipException("new-database mode: the restored database stays next to the live one.")
    started = _now()
    with fail_fast():
        _db, _store, _layout, _entry, server = _objects(plan)
        if plan["live_exists"]:
            result = swap_into_place(
                server, plan["dbname"], plan["target"], plan["keep_live_as"], expected_live_oid=plan.get("live_oid")
            )
        else:
            with connect(server.with_dbname("postgres")) as conn:
                conn.execute(f"ALTER DATABASE {identifier(plan['target'])} RENAME TO {identifier(plan['dbname'])}")
                clear_marker(conn, plan["dbname"])
            result = {"steps": [f"{plan['target']} renamed to {plan['dbname']} (there was no live database)"]}
    for step in result["steps"]:
        log.info("swap: %s", step)
    return {"started_at": started, "finished_at": _now(), **result}


def _run_stamp(run_id: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id)


def run_report(plan: dict[str, Any] | None, context) -> dict[str, Any]:
    """Body of ``write_report``: markdown and JSON next to the backup, a Slack summary; fails if the restore did."""
    from airflow.sdk.exceptions import AirflowFailException

    from pgdr.airflow_glue.notify import send_slack
    from pgdr.incident import database_facts, release_target

    ti, dag_run = context["ti"], context["dag_run"]
    if not plan:
        raise AirflowFailException("The restore was not planned (plan_restore failed; its alert and log say why). Nothing was touched.")
    if plan.get("pitr") and not plan.get("backup_id"):
        if plan["dry_run"]:
            return {"status": "dry-run", "plan": plan}
        raise AirflowFailException(
            f"The point-in-time recovery of {plan['database']} to {plan['pitr']['target']} UTC failed in recover_to_moment "
            f"(its alert and log say why); the live database {plan['dbname']!r} was not changed."
        )
    _label(plan, context)
    phases = {p: ti.xcom_pull(task_ids=p) for p in PHASES}
    needed = [p for p in PHASES if p != "swap_into_place" or plan["mode"] == "replace"]
    failed_phase = next((p for p in needed if not phases[p]), None)
    status = "dry-run" if plan["dry_run"] else ("failed" if failed_phase else "restored")
    db, store, layout, entry, server = _objects(plan)
    durations = {}
    for phase, value in phases.items():
        if value:
            durations[phase] = (datetime.fromisoformat(value["finished_at"]) - datetime.fromisoformat(value["started_at"])).total_seconds()
    achieved = None
    if status == "restored":
        last = phases["swap_into_place"] or phases["apply_privileges"]
        began = (plan.get("pitr") or {}).get("started_at") or phases["check_checksums"]["started_at"]
        achieved = (datetime.fromisoformat(last["finished_at"]) - datetime.fromisoformat(began)).total_seconds()
    if status == "restored" and plan["mode"] == "new-database":
        release_target(server, plan["target"], ti.run_id)  # the copy is the user's now
    final_state = {"live": database_facts(server, plan["dbname"]), "restored": database_facts(server, plan["target"])}
    if plan["keep_live_as"]:
        final_state["previous_live"] = database_facts(server, plan["keep_live_as"])
    report = {
        "status": status,
        "failed_phase": failed_phase if status == "failed" else None,
        "triggered_by": getattr(dag_run, "triggering_user_name", None) or "unknown",
        "via": os.environ.get(VIA_ENV_VAR) or "Airflow (the trigger form or the API)",
        "run_id": ti.run_id,
        "log_url": ti.log_url,
        "plan": plan,
        "phase_seconds": durations,
        "achieved_rto_seconds": achieved,
        "rto_target_seconds": plan["rto_target_seconds"],
        "rto_met": None if achieved is None else achieved <= plan["rto_target_seconds"],
        "validation": (phases["validate_data"] or {}).get("summary"),
        "validation_report": (phases["validate_data"] or {}).get("report"),
        "integrity": {k: (phases["check_integrity"] or {}).get(k) for k in ("tables_checked", "rows_checked", "amcheck_ok")},
        "privileges": phases["apply_privileges"],
        "roles_created": (phases["restore_backup"] or {}).get("roles_created", []),
        "swap_steps": (phases["swap_into_place"] or {}).get("steps", []),
        "final_state": final_state,
        "written_at": _now(),
    }
    stamp = _run_stamp(ti.run_id)
    json_key = layout.restore_report_key(db.name, entry.backup_id, f"{stamp}.json")
    md_key = layout.restore_report_key(db.name, entry.backup_id, f"{stamp}.md")
    store.put_bytes(json_key, json.dumps(report, indent=2, default=str).encode())
    store.put_bytes(md_key, render_report_markdown(report).encode())
    log.info("Restore report: %s", store.describe(md_key))
    if status == "restored":  # a failed restore is alerted once, by the run's failure callback
        send_slack(restore_summary(report, store.describe(md_key)), db.name, context)
    if status == "failed":
        raise AirflowFailException(
            f"The restore of {plan['database']} from backup {plan['backup_id']} failed in phase {failed_phase}; "
            f"the live database {plan['dbname']!r} was not changed. Report: {store.describe(md_key)}"
        )
    return {"status": status, "report": store.describe(md_key), "achieved_rto_seconds": achieved, "final_state": final_state}


def _fmt(seconds) -> str:
    from pgdr.messages import format_duration

    return format_duration(seconds) if seconds is not None else "n/a"


def render_report_markdown(report: dict[str, Any]) -> str:
    """Return the restore report as markdown."""
    plan = report["plan"]
    lines = [
        f"# Restore of `{plan['database']}`: {report['status'].upper()}",
        "",
        f"- Triggered by: {report['triggered_by']} (run `{report['run_id']}`), through {report.get('via', 'Airflow')}",
        f"- Backup: `{plan['backup_id']}` ({plan['backup_status']}), recovery point {plan['recovery_point']}",
        f"- Mode: {plan['mode']}" + (f", tables {', '.join(plan['tables'])}" if plan["tables"] else ""),
        *([f"- **{SUPERUSER_RESTORE_WARNING}**"] if plan.get("restore_as_superuser") else []),
        f"- Target: `{plan['target']}` on {plan['target_server']}",
        f"- Achieved RTO: {_fmt(report['achieved_rto_seconds'])} against a target of {_fmt(report['rto_target_seconds'])}"
        + ("" if report["rto_met"] is None else (" (met)" if report["rto_met"] else " (**BREACHED**)")),
    ]
    if report["failed_phase"]:
        lines.append(f"- **Failed in phase `{report['failed_phase']}`**; the live database was not changed.")
    lines += ["", "## Plan", "", plan["what_happens"], "", "## Phases", "", "| phase | seconds |", "| --- | --- |"]
    lines += [f"| {phase} | {seconds:.1f} |" for phase, seconds in report["phase_seconds"].items()]
    if report["validation"]:
        v = report["validation"]
        lines += ["", "## Validation", "", f"{v['expectations'] - v['failed']} of {v['expectations']} expectations passed on {v['tables']} tables."]
        lines += [f"- FAILED: {line}" for line in v.get("failures", [])]
        lines.append(f"Report: {report['validation_report']}")
    lines += ["", "## Owners, grants and settings", ""] + privileges_lines(report)
    if report["swap_steps"]:
        lines += ["", "## Swap", ""] + [f"1. {step}" for step in report["swap_steps"]]
    lines += ["", "## Final state", ""]
    for role, facts in report["final_state"].items():
        state = f"{facts['size_bytes'] / 1e6:.1f} MB" + ("" if facts.get("allows_connections", True) else ", connections disabled") if facts["exists"] else "does not exist"
        lines.append(f"- {role}: `{facts['name']}`: {state}")
    return "\n".join(lines) + "\n"


def privileges_lines(report: dict[str, Any]) -> list[str]:
    """Return what the restore gave back besides the rows, for the report."""
    done = report.get("privileges")
    lines = []
    if report.get("roles_created"):
        passwords = "with their passwords" if report["plan"].get("restore_role_passwords") else (
            "without passwords: set the application's login password yourself")
        lines.append(f"- Roles created on the target as the backup's copy of the source server's roles says ({passwords}; "
                     f"SUPERUSER, CREATEROLE, REPLICATION and BYPASSRLS never given): {', '.join(report['roles_created'])}")
    if not done:
        return lines + ["- Not completed (this phase failed or did not run; its alert says why): unless the phase's log says "
                        "they were applied, the copy is owned by the restore role, without the backup's grants."]
    lines += [
        f"- Applied as the server's connection, after the checks: {done['owners']} owners, {done['grants']} grants, "
        f"{done['default_privileges']} default privileges, {done['database_properties']} database properties "
        "(settings, grants, comment, connection limit)",
    ]
    for role, found in (done.get("app_roles") or {}).items():
        if isinstance(found, dict):
            lines.append(f"- Application login `{role}`: the same {found['checked']} privileges as on the live database")
    if done["superuser_objects"]:
        lines.append(f"- Created (only a superuser can): {', '.join(done['superuser_objects'])}")
    if done["skipped_objects"]:
        lines.append(f"- **Not restored** (on a copy they would start replicating; create them by hand if this copy is the "
                     f"new primary): {', '.join(done['skipped_objects'])}")
    return lines


def restore_summary(report: dict[str, Any], location: str) -> str:
    """Return the Slack text that sums up a restore."""
    plan = report["plan"]
    icon = ":white_check_mark:" if report["status"] == "restored" else ":red_circle:"
    head = f"{icon} [pgdr] Restore of *{plan['database']}* {report['status']}: backup `{plan['backup_id']}` "
    head += f"(recovery point {plan['recovery_point']}) into `{plan['target']}` ({plan['mode']})"
    lines = [head, f"Triggered by {report['triggered_by']}. Achieved RTO {_fmt(report['achieved_rto_seconds'])}, target {_fmt(report['rto_target_seconds'])}."]
    if plan["mode"] == "replace" and report["status"] == "restored":
        lines.append(f"`{plan['dbname']}` now holds the restored data; the previous database is kept as `{plan['keep_live_as']}`.")
    if report["failed_phase"]:
        lines.append(f"Failed in phase {report['failed_phase']}; the live database was not changed.")
    lines.append(f"Report: {location}")
    return "\n".join(lines)
