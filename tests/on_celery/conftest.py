"""The Celery deployment of the tests in this folder: started once for the folder, stopped after it.

Fifty small databases on two source servers (the session's two embedded PostgreSQL servers), a
larger one (``ledger``) whose restore lasts long enough to kill a worker during it, and the
sample database ``shop`` with a deliberately tight RTO for the deadline alerts.
"""

from __future__ import annotations

import secrets

import psycopg
import pytest
import yaml
from conftest import BUCKET
from support import MailInbox, SlackReceiver, aws_connection

FLEET_A = [f"celery_a_{i:02d}" for i in range(25)]
FLEET_B = [f"celery_b_{i:02d}" for i in range(25)]
# Two databases of the fleet have names that need quoting, in the plan and on the server.
ODD_DBNAMES = {"celery_a_07": "Kunden Ä-07", "celery_b_13": 'Orders "B" 13'}
RTO_SECONDS = 4  # shop's RTO: a verification takes longer, so its run misses the deadline
# The server a whole-server recovery from the form brings back on a new host (#28): its restore runs on the queue
# the plan names, which only the third worker (started by the test, "on the new host") serves.
DBHOST = "dbhost"
NEW_HOST_QUEUE = NEW_HOST_WORKER = "pgdr-new-host"


def fleet_rows(name: str) -> int:
    return 50 + int(name[-2:])


def _dbname(name: str) -> str:
    return ODD_DBNAMES.get(name, name)


def _create_fleet(server, names: list[str]) -> None:
    from psycopg import sql

    with psycopg.connect(**server.dsn("postgres"), autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(_dbname(name))))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(_dbname(name))))
    for name in names:
        with psycopg.connect(**server.dsn(_dbname(name)), autocommit=True) as conn:
            conn.execute('CREATE TABLE "Konten" (id int PRIMARY KEY, "Saldo €" numeric NOT NULL)')
            conn.execute('INSERT INTO "Konten" SELECT g, g * 1.5 FROM generate_series(1, %s) g', (fleet_rows(name),))


@pytest.fixture(scope="package")
def redis_binary():
    from celery_cluster import redis_server

    binary = redis_server()
    if not binary:
        pytest.skip(
            "redis-server is not installed: the Celery tests need Debian's redis-server (apt-get install "
            "redis-server; .ci/run installs it)"
        )
    return binary


@pytest.fixture(scope="package")
def celery_databases(pg_server, pg_server_b):
    """The fleet, and ``ledger``: 3,000,000 rows, a restore of several seconds."""
    _create_fleet(pg_server, FLEET_A)
    _create_fleet(pg_server_b, FLEET_B)
    with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS ledger WITH (FORCE)")
        conn.execute("CREATE DATABASE ledger")
    with psycopg.connect(**pg_server.dsn("ledger"), autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE entries (id bigint PRIMARY KEY, account int NOT NULL, amount numeric NOT NULL, memo text)"
        )
        conn.execute(
            "INSERT INTO entries SELECT g, g % 1000, g * 0.01, md5(g::text) FROM generate_series(1, 3000000) g"
        )
        conn.execute("CREATE INDEX ON entries (account)")
    return FLEET_A + FLEET_B


@pytest.fixture(scope="package")
def celery_slack():
    receiver = SlackReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="package")
def celery_mail():
    inbox = MailInbox()
    yield inbox
    inbox.close()


@pytest.fixture(scope="package")
def celery_prefix() -> str:
    """The deployment's key prefix in the S3 server: its backups, and the WAL archive and base backups of DBHOST."""
    return f"celery-{secrets.token_hex(3)}"


@pytest.fixture(scope="package")
def dbhost(session_dir, s3_server, celery_prefix, tmp_path_factory):
    """DBHOST: a server archiving its WAL to the deployment's storage with barman-cloud, an application role owning
    its table, a full base backup, then rows written after it, before and after a target second between two
    heartbeats (all archived), and where the form's recovery is to bring it back: a data directory and a
    port on the "new host" (this machine, writable by the account the recovered server runs as)."""
    import os
    import shutil
    import time
    from datetime import UTC, datetime

    from pgdr.local.embedded import create_sample_database
    from pgdr.physical.basebackup import take_base_backup
    from pgdr.physical.heartbeat import switch_and_wait_archived, write_heartbeat
    from pgdr.postgres.binaries import free_port
    from pgdr.postgres.client import PgEndpoint
    from pgdr.storage.backends import S3Store
    from pgdr.workdir import work_dir_root
    from support import archiving_server

    server = archiving_server(session_dir / "postgres-celery-dbhost", s3_server.port, BUCKET, celery_prefix, DBHOST)
    create_sample_database(server, "app")
    with psycopg.connect(**server.dsn("app"), autocommit=True) as conn:
        conn.execute("CREATE ROLE app_owner LOGIN PASSWORD 'owner-secret'")
        conn.execute("CREATE TABLE events (id serial PRIMARY KEY, label text NOT NULL)")
        conn.execute("ALTER TABLE events OWNER TO app_owner")
        conn.execute("INSERT INTO events (label) VALUES ('before the base backup')")
    endpoint = PgEndpoint("127.0.0.1", server.port, "postgres", "postgres", server.password)
    work = tmp_path_factory.mktemp("dbhost-base-backup")
    take_base_backup(
        DBHOST, endpoint, S3Store(s3_server.client, BUCKET), server.archive.layout, work, server.archive.url
    )
    with psycopg.connect(**server.dsn("app"), autocommit=True) as conn:
        conn.execute("INSERT INTO events (label) VALUES ('after the base backup')")
        write_heartbeat(endpoint, "test: before the target")
        time.sleep(1.25 - (time.time() % 1))
        target = datetime.now(UTC).replace(microsecond=0)
        time.sleep(1.25 - (time.time() % 1))
        conn.execute("INSERT INTO events (label) VALUES ('after the target')")
        write_heartbeat(endpoint, "test: after the target")
    switch_and_wait_archived(endpoint, 90)
    new_host = work_dir_root() / f"pgdr-celery-new-host-{secrets.token_hex(3)}"
    new_host.mkdir(parents=True)
    new_host.chmod(0o755)
    restore = {"queue": NEW_HOST_QUEUE, "data_dir": str(new_host / "data"), "port": free_port()}
    if os.geteuid() == 0:
        restore["os_user"] = "nobody"
    yield {"server": server, "restore": restore, "target": target}
    server.destroy()
    shutil.rmtree(new_host, ignore_errors=True)


@pytest.fixture(scope="package")
def celery_plan(session_dir, celery_databases, celery_prefix, dbhost):
    """``include/pgdr.compose.yaml``, with the moto S3 server for MinIO and this machine's databases."""
    from celery_cluster import compose_shaped_plan

    def fleet(name: str, conn_id: str) -> dict:
        entry = {"name": name, "conn_id": conn_id, "server": conn_id.removeprefix("pgdr_")}
        if name in ODD_DBNAMES:
            entry["dbname"] = ODD_DBNAMES[name]
        return entry

    databases = [
        {"name": "shop", "conn_id": "pgdr_shop", "rto": f"{RTO_SECONDS}s"},
        {"name": "ledger", "conn_id": "pgdr_shop", "dbname": "ledger"},
        *[fleet(n, "pgdr_fleet_a") for n in FLEET_A],
        *[fleet(n, "pgdr_fleet_b") for n in FLEET_B],
        {"name": "dbhost_app", "conn_id": "pgdr_dbhost", "dbname": "app", "server": DBHOST},
    ]
    storage = {"minio": {"type": "s3", "bucket": BUCKET, "prefix": celery_prefix, "aws_conn_id": "pgdr_s3"}}
    pitr = {"storage": "minio", "keep_window": "7d", "full_schedule": "@daily", "archive_timeout": "10s"}
    # Timings only: the tests trigger backups themselves, and a retry comes after seconds.
    plan = compose_shaped_plan(storage, databases, backup={"schedule": None, "retry_delay": "5s"})
    plan["servers"] = {DBHOST: {"conn_id": "pgdr_dbhost", "pitr": pitr, "restore": dbhost["restore"]}}
    path = session_dir / "celery-plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False, allow_unicode=True))
    return path


@pytest.fixture(scope="package")
def metadata_server(session_dir):
    """Airflow's metadata database: ``airflow`` on an embedded PostgreSQL 18 server of its own."""
    from celery_cluster import start_metadata_server

    server = start_metadata_server(session_dir / "postgres-airflow")
    yield server
    server.destroy()


@pytest.fixture(scope="package")
def celery_cluster(
    redis_binary,
    session_dir,
    metadata_server,
    celery_plan,
    pg_server,
    pg_server_b,
    s3_server,
    celery_slack,
    celery_mail,
    dbhost,
):
    """Redis, api-server, scheduler, dag-processor, triggerer and two Celery workers (about 30 s to start)."""
    from celery_cluster import CeleryCluster, processes_left_after

    root = session_dir / "celery"
    connections = {
        "AIRFLOW_CONN_PGDR_SHOP": pg_server.connection_uri("shop"),
        "AIRFLOW_CONN_PGDR_FLEET_A": pg_server.connection_uri("postgres"),
        "AIRFLOW_CONN_PGDR_FLEET_B": pg_server_b.connection_uri("postgres"),
        "AIRFLOW_CONN_PGDR_DBHOST": dbhost["server"].connection_uri("app"),
        "AIRFLOW_CONN_PGDR_RESTORE": pg_server.restore_connection_uri(),
        "AIRFLOW_CONN_PGDR_S3": aws_connection(s3_server.port),
        "AIRFLOW_CONN_PGDR_SLACK": celery_slack.connection(),
        "AIRFLOW_CONN_PGDR_SMTP": celery_mail.connection(),
    }
    cluster = CeleryCluster(root, metadata_server, connections, celery_plan).start()
    yield cluster
    cluster.stop()
    left = processes_left_after(root, cluster.sessions())
    assert not left, f"processes of the Celery deployment still running 60 s after it stopped: {left}"
