"""Shared, expensive fixtures: one embedded PostgreSQL, one S3 server, one Airflow home per session.

Airflow reads its configuration when first imported, so the private Airflow home is set up
here, before any test module imports Airflow.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from pgdr.local.runner import local_airflow_env

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="pgdr-tests-"))
_SESSION_DIR.chmod(0o755)  # the embedded server runs as an unprivileged user when tests run as root
# Every pytest process makes one: xdist's controller never runs the session_dir fixture that removes it, so each
# process removes its own at exit (its own only: a child forked from it may run these handlers too).
atexit.register(lambda pid=os.getpid(): os.getpid() == pid and shutil.rmtree(_SESSION_DIR, ignore_errors=True))
os.environ.update(local_airflow_env(_SESSION_DIR / "airflow"))
os.environ["PGDR_WORK_DIR"] = str(_SESSION_DIR / "work")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing-key")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

# Airflow's metrics go to a StatsD listener the tests read (it must exist before Airflow loads).
import socket as _socket  # noqa: E402

STATSD = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
STATSD.bind(("127.0.0.1", 0))
STATSD.settimeout(0.2)
os.environ["AIRFLOW__METRICS__STATSD_ON"] = "True"
os.environ["AIRFLOW__METRICS__STATSD_HOST"] = "127.0.0.1"
os.environ["AIRFLOW__METRICS__STATSD_PORT"] = str(STATSD.getsockname()[1])
os.environ["AIRFLOW__METRICS__STATSD_PREFIX"] = "airflow"

from support import FaultProxy, MailInbox, SlackReceiver, aws_connection, write_plan  # noqa: E402


def statsd_packets() -> list[str]:
    """Drain and return the StatsD lines received so far."""
    lines = []
    while True:
        try:
            data = STATSD.recv(65536)
        except TimeoutError:
            return lines
        lines += data.decode(errors="replace").splitlines()


BUCKET = "pgdr-test-backups"


@pytest.fixture(scope="session")
def session_dir() -> Path:
    yield _SESSION_DIR
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def airflow_db(session_dir):
    """Airflow's metadata database (SQLite), migrated once."""
    from pgdr.local.runner import migrate_metadata_db

    migrate_metadata_db(dict(os.environ))


@pytest.fixture(scope="session")
def pg_server(session_dir):
    """One embedded PostgreSQL 18 server with the sample database ``shop``."""
    from pgdr.local.embedded import EmbeddedServer, create_sample_database

    server = EmbeddedServer(session_dir / "postgres").start()
    create_sample_database(server, "shop")
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def pg_server_b(session_dir, pg_server):
    """A second, empty embedded PostgreSQL 18 server: "another server of the plan", without the first one's roles."""
    from pgdr.local.embedded import EmbeddedServer

    # The restore role has the same login and password on every server pgdr restores to.
    server = EmbeddedServer(session_dir / "postgres-b", restore_password=pg_server.restore_password).start()
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def pg_replica(session_dir, pg_server):
    """A hot standby of ``pg_server``: a second embedded server made with ``pg_basebackup -R``, streaming from it."""
    from pgdr.local.embedded import EmbeddedServer

    replica = EmbeddedServer.replica_of(pg_server, session_dir / "postgres-replica")
    yield replica
    replica.destroy()


@pytest.fixture(scope="session")
def pitr_replica(session_dir, pitr_server):
    """A hot standby of ``pitr_server`` (WAL summaries on, for incremental base backups; it archives nothing)."""
    from pgdr.local.embedded import EmbeddedServer

    replica = EmbeddedServer.replica_of(pitr_server, session_dir / "postgres-pitr-replica", {"summarize_wal": "on"})
    yield replica
    replica.destroy()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1, spoken to over real HTTP."""
    from moto.server import ThreadedMotoServer
    from pgdr.postgres.binaries import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    server.port = port
    server.client = client
    yield server
    server.stop()


@pytest.fixture(scope="session")
def slack():
    receiver = SlackReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def env(monkeypatch, pg_server, s3_server, slack, airflow_db, tmp_path):
    """Connections for the shared servers, a fresh Slack inbox and a per-test storage prefix."""
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_SHOP", pg_server.connection_uri("shop"))
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_RESTORE", pg_server.restore_connection_uri())
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_S3", aws_connection(s3_server.port))
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_SLACK", slack.connection())
    slack.clear()
    return {"tmp": tmp_path, "prefix": f"t-{tmp_path.name}"}


@pytest.fixture
def plan(env, monkeypatch):
    """Return a function that writes a test plan, makes it the plan in force, and returns it."""

    def make(databases=None, storage=None, **sections):
        from pgdr.plan import load_plan

        databases = databases or [{"name": "shop", "conn_id": "pgdr_shop"}]
        storage = storage or {"local": {"type": "local", "path": str(env["tmp"] / "backups")}}
        path = write_plan(env["tmp"] / "pgdr.yaml", databases, storage, **sections)
        monkeypatch.setenv("PGDR_PLAN", str(path))
        return load_plan(path)

    return make


@pytest.fixture
def s3_storage(env):
    """A plan storage section for the moto S3 server, under a prefix private to the test."""
    return {"s3": {"type": "s3", "bucket": BUCKET, "prefix": env["prefix"], "aws_conn_id": "pgdr_s3"}}


@pytest.fixture
def fault_proxy(s3_server, monkeypatch):
    """A TCP path to the S3 server that a test can cut; the AWS connection goes through it."""
    proxy = FaultProxy(s3_server.port)
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_S3", aws_connection(proxy.port))
    yield proxy
    proxy.close()


@pytest.fixture
def run_dag():
    """Run a pgdr DAG with dag.test(); return the DagRun with a ``states`` map of task states."""
    from pgdr.local.runner import dag_test, load_dag

    def run(dag_id: str, **kwargs):
        dag_run = dag_test(load_dag(dag_id), **kwargs)
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session

        with create_session() as session:
            tis = session.query(TaskInstance).filter_by(dag_id=dag_id, run_id=dag_run.run_id).all()
            dag_run.states = {
                (ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"): str(ti.state) for ti in tis
            }
            dag_run.tries = {ti.task_id: ti.try_number for ti in tis}
        return dag_run

    return run


def local_backup_setup(root, pg_server, database: str = "shop", store_root=None, **options):
    """A database of a one-database plan with a local store (at ``store_root``, else ``root``) and its endpoint on
    ``pg_server``: ``(db, endpoint, store)``. ``options`` are the database's plan keys (``dump_jobs=2``)."""
    from pgdr.postgres.client import PgEndpoint
    from pgdr.storage.backends import LocalFolderStore

    endpoint = PgEndpoint("127.0.0.1", pg_server.port, "postgres", database, pg_server.password)
    return planned_database(root, database, **options), endpoint, LocalFolderStore(store_root or root)


def planned_database(root, database: str = "shop", **options):
    """The database of a one-database plan (local storage at ``root``) with ``options`` as its plan keys, parsed and
    validated as pgdr does (:class:`pgdr.plan.PlanError` for a bad value)."""
    import json

    from pgdr.plan import parse_plan

    keys = "".join(f", {key}: {json.dumps(value)}" for key, value in options.items())
    text = f"storage: {{l: {{type: local, path: {root}}}}}\ndatabases: [{{name: {database}, conn_id: x{keys}}}]\n"
    return parse_plan(text, root / "p.yaml").databases[0]


def backup_into_local_store(root, pg_server, database: str = "shop", compression: str = "gzip:1") -> str:
    """Take a real backup of ``database`` into a local store at ``root``; return its id."""
    from pgdr.logical.backup import take_backup
    from pgdr.storage.layout import BackupLayout

    db, endpoint, store = local_backup_setup(root, pg_server, database, compression=compression)
    return take_backup(db, endpoint, store, BackupLayout(), root / "work").manifest.backup_id


def source_row_counts(server, dbname: str) -> dict[str, int]:
    """Count every user table of ``dbname`` directly (the test's own ground truth)."""
    import psycopg
    from psycopg import sql

    def key(schema: str, table: str) -> str:  # written out here, not taken from pgdr: ground truth
        def part(name: str) -> str:
            import re

            plain = re.fullmatch(r"[a-z_][a-z0-9_]*", name) and name not in (
                "order",
                "select",
                "user",
                "group",
                "from",
                "where",
            )
            return name if plain else '"' + name.replace('"', '""') + '"'

        return f"{part(schema)}.{part(table)}"

    with psycopg.connect(**server.dsn(dbname)) as conn:
        tables = conn.execute(
            "SELECT schemaname, tablename FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
        counts = {}
        for schema, table in tables:
            query = sql.SQL("SELECT count(*) FROM ONLY {}").format(sql.Identifier(schema, table))
            counts[key(schema, table)] = conn.execute(query).fetchone()[0]
        parents = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE "
            "c.relkind = 'p'"
        ).fetchall()
        for schema, table in parents:
            counts[key(schema, table)] = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))
            ).fetchone()[0]
        return counts


def assert_restores_as_source(run_dag, server, backup_id: str, target_name: str) -> None:
    """Restore ``backup_id`` of 'shop' as the new database ``target_name`` with pgdr_restore, assert it succeeded with
    every row of the source, and drop it whatever happened."""
    import psycopg

    restore = run_dag("pgdr_restore", run_conf={"database": "shop", "backup": backup_id, "target_name": target_name})
    try:
        assert restore.states["write_report"] == "success", restore.states
        assert source_row_counts(server, target_name) == source_row_counts(server, "shop")
    finally:
        with psycopg.connect(**server.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{target_name}" WITH (FORCE)')


def pretty(obj) -> str:
    return json.dumps(obj, indent=2, default=str)


# -- end to end: a real airflow standalone ----------------------------------------------------------


@pytest.fixture(scope="session")
def mail():
    inbox = MailInbox()
    yield inbox
    inbox.close()


# The standalone Airflow keeps running (and triggering asset-scheduled runs) after its tests:
# it gets a Slack receiver and an inbox of its own, so it never posts into another test's.
@pytest.fixture(scope="session")
def e2e_slack():
    receiver = SlackReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def e2e_mail():
    inbox = MailInbox()
    yield inbox
    inbox.close()


# Tests that share one long-lived Airflow deployment run on one xdist worker, as one unit of work
# (`make test` runs `pytest -n auto --dist loadgroup`): started once, not once per worker. The unit is
# chosen by file (xdist's own xdist_group marks do not reach its scheduler under pytest 9: they rewrite
# a node id that pytest 9 no longer reads); a test using one of these fixtures elsewhere is an error.
SHARED_DEPLOYMENTS = {"standalone": "standalone-airflow", "celery_cluster": "celery-airflow"}
SHARED_DEPLOYMENT_FILES = {
    "tests/on_celery/": "celery-airflow",
    "tests/e2e/test_e2e.py": "standalone-airflow",
    "tests/e2e/test_alerting_e2e.py": "standalone-airflow",
    "tests/e2e/test_fleet_e2e.py": "standalone-airflow",
}


def shared_deployment_of(nodeid: str) -> str | None:
    """Return the shared Airflow deployment the test ``nodeid`` runs on, if any."""
    return next((group for prefix, group in SHARED_DEPLOYMENT_FILES.items() if nodeid.startswith(prefix)), None)


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # optional: `pytest -p no:xdist` still runs
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup``: xdist's load-scope scheduling with the shared deployments as the scopes (the
    largest units, so they start first, one per worker) and every other test a unit of its own."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedDeploymentScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return shared_deployment_of(nodeid) or nodeid

    return SharedDeploymentScheduling(config, log)


_SECONDS_PER_FOLDER: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Add up each test's setup, call and teardown by its folder (on the xdist controller too)."""
    folder = "/".join(report.nodeid.split("::")[0].split("/")[:2])
    _SECONDS_PER_FOLDER[folder] = _SECONDS_PER_FOLDER.get(folder, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """Print the test time per folder (the sum over every worker; CI's before/after of a change to the suite)."""
    if not _SECONDS_PER_FOLDER:
        return
    terminalreporter.section("test seconds per folder (all workers)")
    for folder, seconds in sorted(_SECONDS_PER_FOLDER.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{seconds:9.1f}  {folder}")
    terminalreporter.write_line(f"{sum(_SECONDS_PER_FOLDER.values()):9.1f}  total")


def pytest_collection_modifyitems(items):
    """Run the end-to-end tests last when the suite runs in one process (each kind shares one long-lived
    Airflow: Celery, then standalone); refuse a test of a shared deployment outside its files."""
    for item in items:
        for fixture, group in SHARED_DEPLOYMENTS.items():
            if fixture in getattr(item, "fixturenames", ()) and shared_deployment_of(item.nodeid) != group:
                raise pytest.UsageError(
                    f"{item.nodeid} uses the {fixture!r} fixture: add its file to SHARED_DEPLOYMENT_FILES in "
                    "tests/conftest.py, so that it runs on the worker that already runs that deployment."
                )
    items.sort(
        key=lambda item: (item.get_closest_marker("e2e") is not None, item.get_closest_marker("celery") is not None)
    )


E2E_RTO_SECONDS = 4  # tight on purpose: a verification takes longer, so its deadline is missed


FLEET = [f"fleet_{i:02d}" for i in range(20)]
# The master key the fleet's backups are encrypted under in the standalone Airflow (client-side encryption).
E2E_MASTER_KEY = base64.b64encode(os.urandom(32)).decode()


@pytest.fixture(scope="session")
def fleet_databases(pg_server):
    """Twenty small databases on the embedded server: a fleet for the pool test."""
    import psycopg

    with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
        for name in FLEET:
            conn.execute(f"DROP DATABASE IF EXISTS {name}")
            conn.execute(f"CREATE DATABASE {name}")
    for index, name in enumerate(FLEET):
        with psycopg.connect(**pg_server.dsn(name), autocommit=True) as conn:
            conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance numeric NOT NULL)")
            conn.execute("INSERT INTO accounts SELECT g, g * 1.5 FROM generate_series(1, %s) g", (100 + index,))
    return FLEET


@pytest.fixture(scope="session")
def e2e_plan(session_dir, fleet_databases):
    """The DR plan the standalone Airflow runs with.

    ``shop`` is the sample database; ``flaky`` points at a database that does not exist until a
    test creates it (a backup that fails, then recovers); twenty ``fleet_*`` databases live on a
    second "server" whose pool allows two dumps at once. The RTO is tight so that a verification
    run misses its deadline. Backups have no schedule: only the tests trigger them.
    """
    fleet = [
        {
            "name": n,
            "conn_id": "pgdr_fleet",
            "dbname": n,
            "server": "fleet",
            "encryption": {"key_conn_id": "pgdr_e2e_key"},
        }
        for n in fleet_databases
    ]
    path = write_plan(
        session_dir / "e2e-plan.yaml",
        [
            {"name": "shop", "conn_id": "pgdr_shop"},
            {"name": "flaky", "conn_id": "pgdr_shop", "dbname": "flaky"},
            *fleet,
        ],
        {"local": {"type": "local", "path": str(session_dir / "e2e-backups")}},
        backup={"retries": 0, "schedule": None, "max_dumps_per_server": 2},
        defaults={
            "rto": f"{E2E_RTO_SECONDS}s",
            "rpo": "1h",
            "notify": {"slack_conn_id": "pgdr_slack", "smtp_conn_id": "pgdr_smtp", "email_to": ["oncall@example.com"]},
        },
    )
    return path


@pytest.fixture(scope="session")
def standalone(session_dir, pg_server, e2e_slack, e2e_mail, e2e_plan):
    """A real `airflow standalone` on this checkout's DAGs (started once, about 30 s)."""
    from standalone import Standalone

    server = Standalone(
        session_dir / "standalone",
        {
            "PGDR_PLAN": str(e2e_plan),
            "PGDR_WORK_DIR": str(session_dir / "e2e-work"),
            "AIRFLOW_CONN_PGDR_SHOP": pg_server.connection_uri("shop"),
            "AIRFLOW_CONN_PGDR_RESTORE": pg_server.restore_connection_uri(),
            "AIRFLOW_CONN_PGDR_FLEET": pg_server.connection_uri("postgres"),
            "AIRFLOW_CONN_PGDR_SLACK": e2e_slack.connection(),
            "AIRFLOW_CONN_PGDR_SMTP": e2e_mail.connection(),
            "AIRFLOW_CONN_PGDR_E2E_KEY": json.dumps(
                {"conn_type": "generic", "login": "e2e-key-1", "password": E2E_MASTER_KEY}
            ),
        },
    )
    server.start()
    from pgdr.airflow_glue.pools import required_pools
    from pgdr.plan import load_plan

    for name, pool in required_pools(load_plan(e2e_plan)).items():  # as airflow-init does in compose
        server.api("POST", "/api/v2/pools", {"name": name, **pool})
    yield server
    server.stop()


# -- point-in-time recovery: a server whose archive_command is the real archiver ------------------

PITR_PREFIX = "pitr-tests"
PITR_SERVER = "main"


@pytest.fixture(scope="session")
def pitr_server(session_dir, s3_server):
    """An embedded PostgreSQL 18 server archiving its WAL to the S3 server with barman-cloud.

    Its ``archive` attribute is the :class:`~pgdr.physical.archive.WalArchive` it writes to.
    """
    from pgdr.local.embedded import create_sample_database
    from support import archiving_server

    # full_page_writes on, as in production (the embedded default is off): its standby (pitr_replica) can be backed up
    server = archiving_server(
        session_dir / "postgres-pitr",
        s3_server.port,
        BUCKET,
        PITR_PREFIX,
        PITR_SERVER,
        settings={"full_page_writes": "on"},
    )
    create_sample_database(server, "shop")
    yield server
    server.destroy()
