"""How a recovered cluster is proven: the recovery target hit exactly, and every database good.

``pgdr_verify_pitr`` writes two heartbeats on the live server a second apart and recovers the
newest chain to the moment between them. The recovery is exact when every heartbeat committed
at or before the target is in the recovered cluster and none after it (:func:`check_target_hit`).
Then every database of the plan on that server gets the checks a restored logical backup gets
(:func:`check_recovered_databases`): sequences, ``pg_amcheck`` and the Great Expectations suites,
as a role that may read everything and is never a superuser. The recovered state is its own
reference: the heartbeats proved the moment, these prove the pages and the data.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Any

from pgdr.errors import PermanentFailure

# What each depth of proof checks in a recovered cluster (a plan's servers.<name>.recovery_proof, recover-server's
# --proof). pgdr_verify_pitr always proves thoroughly; a recovery during an incident may prove quickly, its chain having
# been proven thoroughly by those verifications. On a 2 GB pgbench database, measured: pg_amcheck 8 s with
# --heapallindexed, 1 s without; the baseline's primary key uniqueness 2 s per query (GX runs it twice).
RECOVERY_PROOFS = {
    "quick": "pg_amcheck of every table and B-tree index page, unique indexes checked for duplicate keys "
    "(--checkunique), exact row counts, sequences, the plan's expectation suites",
    "thorough": "pg_amcheck of every page with every row looked up in every index (--heapallindexed) and unique "
    "indexes checked for duplicate keys (--checkunique), exact row counts, sequences, pgdr's baseline expectations "
    "(primary keys unique and not null, no orphan rows) and the plan's expectation suites",
}


def check_target_hit(server: str, target: datetime, live: list[datetime], recovered: list[datetime]) -> dict[str, Any]:
    """Refuse a recovery that is not exact: a heartbeat of the target's past missing, or one of its future present."""
    expected = [at for at in live if at <= target]
    missing = [at for at in expected if at not in recovered]
    extra = [at for at in recovered if at > target]
    if missing or extra or not expected:
        raise PermanentFailure(
            f"The recovery of server {server!r} to {target:%Y-%m-%d %H:%M:%S.%f} UTC missed its target: "
            f"{len(missing)} heartbeats committed before it are absent (first: {missing[:1]}), {len(extra)} written "
            f"after it are present (first: {extra[:1]}). WAL replay is not exact for this chain; do not rely on it "
            "for point-in-time recovery until this is understood."
        )
    return {"heartbeats_before_target": len(expected), "newest_recovered_heartbeat": expected[-1].isoformat()}


def check_recovered_databases(
    plan,
    server,
    cluster,
    backup_id: str,
    target: str,
    workdir: Callable[[str], AbstractContextManager[Path]],
    amcheck_jobs: int | None = None,
    proof: str = "thorough",
) -> dict[str, Any]:
    """Check every plan database of ``server`` in the recovered ``cluster``; return each one's findings.

    ``pg_amcheck`` (a server process reading every page) runs beside the row counts and the expectations (queries
    of other server processes): on a 2 GB pgbench database 9 s and 9 s, together about the longer of the two.

    :param workdir: makes a private work directory for a label (the task's).
    :param amcheck_jobs: ``pg_amcheck --jobs`` (relations checked at once); default each database's ``dump_jobs``.
    :param proof: a key of :data:`RECOVERY_PROOFS`. ``quick`` leaves out ``--heapallindexed`` and the baseline
        expectations: in a physical copy the row counts would be compared with themselves, and a primary key's
        uniqueness is what ``--checkunique`` checks through its index.
    :raises PermanentFailure: naming the first problems, when a database fails a check.
    """
    if proof not in RECOVERY_PROOFS:
        raise ValueError(f"unknown proof {proof!r}; expected one of {', '.join(RECOVERY_PROOFS)}")
    thorough = proof == "thorough"
    import time
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    import psycopg

    from pgdr.checks.integrity import IntegrityReport, check_sequences, run_amcheck
    from pgdr.checks.validation import ValidationReport, validate_restored
    from pgdr.postgres.client import connect, count_rows, prepare_amcheck

    def amcheck(endpoint, folder, jobs: int) -> tuple[IntegrityReport, float]:
        started = time.monotonic()
        checked = IntegrityReport()
        run_amcheck(endpoint, folder, checked, jobs=jobs, heapallindexed=thorough, checkunique=True)
        return checked, time.monotonic() - started

    results, problems = {}, []
    for name in server.databases:
        db = plan.database(name)
        endpoint = cluster.reader(db.dbname)  # never a superuser: the checks read code-bearing objects
        prepare_amcheck(cluster.endpoint(db.dbname), endpoint)
        report = IntegrityReport()
        with workdir(f"pitr-amcheck-{name}") as folder, ThreadPoolExecutor(1, "pgdr-amcheck") as pool:
            # waited for on leaving the pool, whatever happens
            pages = pool.submit(amcheck, endpoint, folder, amcheck_jobs or db.dump_jobs)
            started = time.monotonic()
            counts, superuser, validation, unreadable = {}, None, ValidationReport(), None
            try:
                with connect(endpoint, application_name="pgdr-integrity") as conn:
                    superuser = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
                    counts, large_objects = count_rows(conn)
                    reference = SimpleNamespace(
                        backup_id=backup_id,
                        database=name,
                        row_counts=counts,
                        large_objects=large_objects,
                        sequences={},
                        recovery_point=datetime.fromisoformat(target),
                    )
                    check_sequences(conn, reference, report)
            except (psycopg.errors.DataCorrupted, psycopg.errors.IndexCorrupted) as err:
                # a damaged page stops the count where it lies: pg_amcheck, still running, says what else is damaged
                unreadable = f"database {name}: its rows could not be read: {str(err).strip()}"
            report.seconds["row_counts_and_sequences"] = time.monotonic() - started
            if unreadable is None:
                started = time.monotonic()
                validation = validate_restored(endpoint, reference, baseline=thorough)
                report.seconds["expectations"] = time.monotonic() - started
            checked, report.seconds["amcheck"] = pages.result()
        report.amcheck_ok, report.amcheck_output = checked.amcheck_ok, checked.amcheck_output
        problems += [unreadable] if unreadable else []
        problems += [f"database {name}: {p}" for p in report.problems()]
        problems += [f"database {name}: failed expectation: {o.line()}" for o in validation.failed]
        results[name] = {
            "checked_as": endpoint.user,
            "checked_as_superuser": superuser,
            "tables": len(counts),
            "rows": sum(counts.values()),
            "integrity": report.to_dict(),
            "validation": validation.summary(),
        }
    if problems:
        raise PermanentFailure(
            f"The databases of server {server.name!r} recovered to {target} failed their checks: "
            + "; ".join(problems[:10])
            + ". The chain recovers, but not to good data: investigate before relying on it."
        )
    return results


def find_servers(plan, server: str | None, events: dict) -> list[str]:
    """Return the servers a run of ``pgdr_verify_pitr`` verifies: the form's, those its asset events name, or all."""
    if server:
        return [plan.server(server).name]
    named = []
    for batch in (events or {}).values():
        for event in batch:
            name = (event.extra or {}).get("server")
            if name in plan.server_names and name not in named:
                named.append(name)
    return named or plan.server_names


def plan_target(server, endpoint, catalog, store, archive, run_id: str, workdir: Path) -> dict[str, Any]:
    """Write two heartbeats a second apart, have their WAL archived, and choose the target between them and the chain.

    The target lies after the newest base backup: the recovery replays the whole chain and all WAL up
    to it, and must hold the first heartbeat and not the second.
    """
    import time

    from pgdr.physical.heartbeat import switch_and_wait_archived, write_heartbeat
    from pgdr.physical.recovery import choose_backup, recoverable_window

    source = f"pgdr_verify_pitr {run_id}"
    before = write_heartbeat(endpoint, source + " (before target)")
    time.sleep(1.0)
    after = write_heartbeat(endpoint, source + " (after target)")
    switch_and_wait_archived(endpoint, server.pitr.archive_timeout.total_seconds() + 120)
    target = before + (after - before) / 2
    window = recoverable_window(catalog, archive, store, workdir)
    entry = choose_backup(window, target)
    return {
        "server": server.name,
        "backup_id": entry.backup_id,
        "chain": [e.backup_id for e in catalog.chain(entry, list(window.backups))],
        "target": target.isoformat(),
        "heartbeat_before": before.isoformat(),
        "heartbeat_after": after.isoformat(),
        "window": {"oldest": window.oldest.isoformat(), "newest": window.newest.isoformat()},
        "pg_version": entry.record.pg_version,
        "login": endpoint.user,
    }


def pitr_record(
    server: str,
    recovery: dict,
    cluster_info: dict | None,
    target_check: dict | None,
    databases: dict | None,
    airflow: dict,
    verified_at: str,
):
    """Return the verification record of one PITR verification: verified when every step returned its proof."""
    from pgdr.records import PITR_KIND, VerificationRecord

    ok = bool(cluster_info and target_check and databases is not None)
    return VerificationRecord(
        status="verified" if ok else "failed",
        kind=PITR_KIND,
        verified_at=verified_at,
        server=server,
        backup_id=recovery["backup_id"],
        chain=recovery["chain"],
        target=recovery["target"],
        window=recovery["window"],
        recovery=(cluster_info or {}).get("recovery"),
        timings=(cluster_info or {}).get("timings"),
        target_check=target_check,
        databases=databases,
        airflow=airflow,
    )
