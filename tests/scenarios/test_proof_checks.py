"""The checks of a recovered cluster's databases: pg_amcheck on its own thread beside the counts and expectations.

Run many times on a loaded machine, every run gives the same findings and leaves no thread and no pg_amcheck
behind; a failing expectation suite still waits for pg_amcheck before its error is raised.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import subprocess
import threading
import time
from types import SimpleNamespace

import psycopg
import pytest
from psycopg import sql

pytestmark = pytest.mark.integration

DB = "pgdr_proof_checks"
READER = "pgdr_proof_reader"


class _Cluster:
    """The recovered cluster, as the checks see it: the shared server, and a reader role that is no superuser."""

    def __init__(self, server) -> None:
        self.server = server

    def endpoint(self, dbname: str):
        from pgdr.postgres.client import PgEndpoint

        return PgEndpoint("127.0.0.1", self.server.port, "postgres", dbname, self.server.password)

    def reader(self, dbname: str):
        from pgdr.postgres.client import PgEndpoint

        return PgEndpoint("127.0.0.1", self.server.port, READER, dbname, "reader-secret")


@pytest.fixture(scope="module")
def recovered(pg_server):
    with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB}")
        conn.execute(f"CREATE DATABASE {DB}")
        conn.execute(f"DROP ROLE IF EXISTS {READER}")
        conn.execute(f"CREATE ROLE {READER} LOGIN PASSWORD 'reader-secret' IN ROLE pg_read_all_data")
    with psycopg.connect(**pg_server.dsn(DB), autocommit=True) as conn:
        conn.execute('CREATE TABLE "Orders" (id bigserial PRIMARY KEY, "Total" numeric NOT NULL)')
        conn.execute('INSERT INTO "Orders" ("Total") SELECT i FROM generate_series(1, 20000) AS i')
        conn.execute('CREATE INDEX "orders by total" ON "Orders" ("Total")')
    yield _Cluster(pg_server)
    with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(READER)))


def _check(cluster, tmp_path, jobs=None):
    from pgdr.physical.proof import check_recovered_databases

    plan = SimpleNamespace(database=lambda name: SimpleNamespace(dbname=DB, dump_jobs=2))
    server = SimpleNamespace(name="main", databases=["orders"])

    @contextlib.contextmanager
    def workdir(label):
        folder = tmp_path / label
        folder.mkdir(parents=True, exist_ok=True)
        yield folder

    return check_recovered_databases(
        plan, server, cluster, "B1", "2026-12-05T10:00:00+00:00", workdir, amcheck_jobs=jobs
    )


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def _amcheck_left(cluster) -> list[str]:
    """The pg_amcheck processes still running against this test's server: under xdist, the other worker's server has
    a database of the same name, and its checks may be running right now."""
    found = subprocess.run(["pgrep", "-af", "pg_amcheck"], capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if DB in line and f"port='{cluster.server.port}'" in line]


def test_many_runs_under_load_give_the_same_findings_and_leave_nothing_running(recovered, tmp_path):
    stop = multiprocessing.Event()
    load = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(2)]
    for process in load:
        process.start()
    try:
        # the dump_jobs of the plan (2), or as many as a recovery on a new host gives (its cores)
        runs = [_check(recovered, tmp_path / f"run{i}", jobs=[None, 1, 4][i % 3])["orders"] for i in range(8)]
    finally:
        stop.set()
        for process in load:
            process.join()
    for found in runs:
        assert found["rows"] == 20000 and found["tables"] == 1 and found["checked_as_superuser"] is False
        assert found["integrity"]["amcheck_ok"] is True, found["integrity"]["amcheck_output"]
        assert found["validation"]["failed"] == 0 and found["validation"]["expectations"] >= 3, found["validation"]
        assert set(found["integrity"]["seconds"]) == {"row_counts_and_sequences", "expectations", "amcheck"}
    assert not [t for t in threading.enumerate() if t.name.startswith("pgdr-amcheck")]
    assert _amcheck_left(recovered) == []


def test_a_failing_suite_waits_for_pg_amcheck_and_leaves_nothing_running(recovered, tmp_path, monkeypatch):
    import pgdr.checks.integrity
    import pgdr.checks.validation
    from pgdr.checks.validation import SuiteError

    real_amcheck, real_validate = pgdr.checks.integrity.run_amcheck, pgdr.checks.validation.validate_restored
    suite_failed, finished = threading.Event(), threading.Event()

    def failing_validate(*args, **kwargs):
        try:
            return real_validate(*args, **kwargs)
        except SuiteError:
            suite_failed.set()
            raise

    def slow_amcheck(*args, **kwargs):  # still running when the suite fails, and a while after
        real_amcheck(*args, **kwargs)
        suite_failed.wait(120)
        time.sleep(1)
        finished.set()

    monkeypatch.setattr(pgdr.checks.integrity, "run_amcheck", slow_amcheck)
    monkeypatch.setattr(pgdr.checks.validation, "validate_restored", failing_validate)
    suites = tmp_path / "suites"
    (suites / "orders").mkdir(parents=True)
    (suites / "orders" / "broken.yaml").write_text('table: public."Orders"\nexpectations: [{type: no_such_check}]\n')
    monkeypatch.setenv("PGDR_GX_SUITES", str(suites))
    with pytest.raises(SuiteError, match="no_such_check"):
        _check(recovered, tmp_path / "failing")
    assert finished.is_set(), "the suite's error was raised while pg_amcheck was still running"
    assert not [t for t in threading.enumerate() if t.name.startswith("pgdr-amcheck")]
    assert _amcheck_left(recovered) == []
