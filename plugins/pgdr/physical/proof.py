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
    plan, server, cluster, backup_id: str, target: str, workdir: Callable[[str], AbstractContextManager[Path]]
) -> dict[str, Any]:
    """Check every plan database of ``server`` in the recovered ``cluster``; return each one's findings.

    :param workdir: makes a private work directory for a label (the task's).
    :raises PermanentFailure: naming the first problems, when a database fails a check.
    """
    from types import SimpleNamespace

    from pgdr.checks.integrity import IntegrityReport, check_sequences, run_amcheck
    from pgdr.checks.validation import validate_restored
    from pgdr.postgres.client import connect, count_rows, prepare_amcheck

    results, problems = {}, []
    for name in server.databases:
        db = plan.database(name)
        endpoint = cluster.reader(db.dbname)  # never a superuser: the checks read code-bearing objects
        prepare_amcheck(cluster.endpoint(db.dbname), endpoint)
        report = IntegrityReport()
        with connect(endpoint, application_name="pgdr-integrity") as conn:
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
            superuser = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
        with workdir(f"pitr-amcheck-{name}") as folder:
            run_amcheck(endpoint, folder, report, jobs=db.dump_jobs)
        validation = validate_restored(endpoint, reference)
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
