"""Least privilege (#29 item 4): the README's IAM policies (docs/iam) for the three credential sets, evaluated as IAM
does, in a gateway in front of moto. Each DAG task runs with only its own set (the workers', the pruner's, the
archiver's: barman-cloud from the server's archive_command) and works; with another set it fails clearly."""

from __future__ import annotations

import pytest
from conftest import BUCKET
from support import IamGateway, iam_allows, iam_policy

pytestmark = pytest.mark.integration

PREFIX = "lp"


def test_the_policies_grant_each_set_its_work_and_nothing_else():
    worker = iam_policy("pgdr-worker", BUCKET, PREFIX)
    pruner = iam_policy("pgdr-pruner", BUCKET, PREFIX)
    archiver = iam_policy("pgdr-archiver", BUCKET, PREFIX, "main")
    obj = f"arn:aws:s3:::{BUCKET}/{PREFIX}/v1/shop/20261205T000000Z-abcdef/manifest.json"
    bucket = f"arn:aws:s3:::{BUCKET}"
    assert iam_allows(worker, "s3:PutObject", obj, {})
    assert iam_allows(worker, "s3:GetObject", obj, {})
    assert iam_allows(worker, "s3:ListBucket", bucket, {"s3:prefix": f"{PREFIX}/v1/shop/"})
    assert not iam_allows(worker, "s3:ListBucket", bucket, {"s3:prefix": "other/"})
    assert not iam_allows(worker, "s3:ListBucket", bucket, {})  # the whole bucket: no
    assert not iam_allows(worker, "s3:DeleteObject", obj, {})
    assert not iam_allows(worker, "s3:DeleteObjectVersion", obj, {})
    assert not iam_allows(worker, "s3:PutObject", f"arn:aws:s3:::{BUCKET}/other/x", {})
    assert iam_allows(pruner, "s3:DeleteObjectVersion", obj, {}) and iam_allows(pruner, "s3:DeleteObject", obj, {})
    assert not iam_allows(pruner, "s3:PutObject", obj, {})
    wal = f"arn:aws:s3:::{BUCKET}/{PREFIX}/pitr-v1/wal/main/wals/0000000100000000/000000010000000000000001.zst"
    assert iam_allows(archiver, "s3:PutObject", wal, {})
    assert iam_allows(archiver, "s3:ListBucket", bucket, {})  # barman-cloud's HeadBucket carries no prefix
    assert not iam_allows(archiver, "s3:PutObject", obj, {})
    assert not iam_allows(archiver, "s3:PutObject", wal.replace("/main/", "/other/"), {})
    assert not iam_allows(archiver, "s3:DeleteObject", wal, {})


@pytest.fixture
def gateway(s3_server, env):
    """moto behind the README's policies for the test's own prefix: ``worker-key`` and ``pruner-key``."""
    policies = {
        "worker-key": iam_policy("pgdr-worker", BUCKET, env["prefix"]),
        "pruner-key": iam_policy("pgdr-pruner", BUCKET, env["prefix"]),
    }
    gateway = IamGateway(s3_server.port, policies)
    yield gateway
    gateway.close()


def _store(gateway, access_key: str):
    import boto3
    from pgdr.storage.backends import S3Store

    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{gateway.port}",
        region_name="us-east-1",
        aws_access_key_id=access_key,
        aws_secret_access_key="secret",
    )
    return S3Store(client, BUCKET)


def test_the_workers_write_and_read_but_cannot_delete_and_the_pruner_deletes_but_cannot_write(gateway, env):
    from pgdr.errors import PermanentFailure

    worker, pruner = _store(gateway, "worker-key"), _store(gateway, "pruner-key")
    key = f"{env['prefix']}/v1/shop/20261205T000000Z-abcdef/manifest.json"
    worker.put_bytes(key, b"{}")
    assert worker.get_bytes(key) == b"{}" and [o.key for o in worker.list(f"{env['prefix']}/v1/shop/")] == [key]
    with pytest.raises(PermanentFailure, match="S3 refused to delete 1 of 1 objects .*AccessDenied"):
        worker.delete([key])
    assert worker.exists(key)
    with pytest.raises(PermanentFailure, match="access denied"):
        worker.put_bytes("elsewhere/x", b"x")
    with pytest.raises(PermanentFailure, match="access denied"):
        pruner.put_bytes(key, b"overwritten")
    pruner.delete([key])
    assert not worker.exists(key)
    assert ("worker-key", "s3:DeleteObject", f"arn:aws:s3:::{BUCKET}/{key}") in gateway.denied


def test_backup_verify_retention_and_restore_each_with_its_own_set(plan, run_dag, env, gateway, monkeypatch, pg_server):
    """The workers' connection may not delete, the pruner's may not write: a backup, its verify-restore, the
    retention that follows the next backup and a restore all work when the plan gives retention the pruner's
    connection (prune_conn_id); without it, retention fails naming the refused object, and loses nothing."""
    from conftest import assert_restores_as_source
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog
    from support import aws_connection

    monkeypatch.setenv("AIRFLOW_CONN_PGDR_S3_WORKER", aws_connection(gateway.port, "worker-key"))
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_S3_PRUNER", aws_connection(gateway.port, "pruner-key"))
    target = {"type": "s3", "bucket": BUCKET, "prefix": env["prefix"], "aws_conn_id": "pgdr_s3_worker"}
    databases = [{"name": "shop", "conn_id": "pgdr_shop", "retention": {"keep_last": 1, "keep_days": 0}}]

    # Without a pruner, the workers' credentials cannot prune: the task fails and says why; both backups stay.
    p = plan(databases=databases, storage={"s3": target})
    catalog = BackupCatalog(*open_store(p.databases[0].storage, p), "shop")
    assert run_dag("pgdr_backup").states["protect_pgdr_shop.back_up[0]"] == "success"
    second = run_dag("pgdr_backup")
    assert second.states["protect_pgdr_shop.back_up[0]"] == "success"
    assert second.states["protect_pgdr_shop.prune_expired[0]"] == "failed"
    assert len(catalog.backups()) == 2
    assert any(d[0] == "worker-key" and d[1] == "s3:DeleteObject" for d in gateway.denied)

    # With the pruner's connection for retention: everything works, each with its own set.
    gateway.denied.clear()
    p = plan(databases=databases, storage={"s3": {**target, "prune_conn_id": "pgdr_s3_pruner"}})
    third = run_dag("pgdr_backup")
    assert third.states["protect_pgdr_shop.prune_expired[0]"] == "success", third.states
    (kept,) = catalog.backups()
    verify = run_dag("pgdr_verify_restore", run_conf={"database": "shop", "backup_id": kept.backup_id})
    assert verify.get_state() == "success", verify.states
    assert catalog.get(kept.backup_id).status == "verified"
    assert_restores_as_source(run_dag, pg_server, kept.backup_id, "shop_lp")
    assert gateway.denied == [], gateway.denied


def test_the_archiver_base_backups_pitr_verification_retention_and_health_each_with_its_own_set(
    plan, run_dag, env, session_dir, s3_server, monkeypatch
):
    """A server whose archive_command (barman-cloud, as the server's OS user) holds only the archiver's set; base
    backups, their PITR verification (a recovery reading the WAL with the workers' set) and health with the workers'
    set; the recovery-window retention, a week later, with the pruner's. Nothing is refused, and each set is refused
    what is not its work: the archiver another server's WAL and any delete, the workers a delete."""
    from datetime import UTC, datetime, timedelta

    import boto3
    import botocore.exceptions
    from pgdr.airflow_glue.connections import open_archive
    from pgdr.local.embedded import create_sample_database
    from pgdr.physical.catalog import BaseBackupCatalog
    from pgdr.physical.heartbeat import switch_and_wait_archived
    from pgdr.postgres.client import PgEndpoint
    from support import archiving_server, aws_connection

    prefix, name = env["prefix"], "lp"
    gateway = IamGateway(
        s3_server.port,
        {
            "worker-key": iam_policy("pgdr-worker", BUCKET, prefix),
            "pruner-key": iam_policy("pgdr-pruner", BUCKET, prefix),
            "archiver-key": iam_policy("pgdr-archiver", BUCKET, prefix, name),
        },
    )
    server = archiving_server(session_dir / f"postgres-{prefix}", gateway.port, BUCKET, prefix, name, "archiver-key")
    try:
        create_sample_database(server, "shop")
        endpoint = PgEndpoint("127.0.0.1", server.port, "postgres", "postgres", server.password)
        switch_and_wait_archived(endpoint, 60)  # barman-cloud shipped a segment with the archiver's set alone
        monkeypatch.setenv("AIRFLOW_CONN_PGDR_LP", server.connection_uri("shop"))
        monkeypatch.setenv("AIRFLOW_CONN_PGDR_RESTORE", server.restore_connection_uri())
        monkeypatch.setenv("AIRFLOW_CONN_PGDR_S3_WORKER", aws_connection(gateway.port, "worker-key"))
        monkeypatch.setenv("AIRFLOW_CONN_PGDR_S3_PRUNER", aws_connection(gateway.port, "pruner-key"))
        target = {"type": "s3", "bucket": BUCKET, "prefix": prefix, "aws_conn_id": "pgdr_s3_worker"}
        p = plan(
            databases=[{"name": "shop", "conn_id": "pgdr_lp", "server": name}],
            storage={"s3": {**target, "prune_conn_id": "pgdr_s3_pruner"}},
            servers={name: {"conn_id": "pgdr_lp", "pitr": {"storage": "s3", "keep_window": "7d"}}},
        )
        store, layout, archive = open_archive(p.servers[0], p)
        catalog = BaseBackupCatalog(store, layout, name)

        for _ in range(2):
            full = run_dag("pgdr_basebackup", run_conf={"kind": "full"})
            assert full.get_state() == "success", full.states
            switch_and_wait_archived(endpoint, 60)
        first, second = (e.backup_id for e in catalog.backups())
        verify = run_dag("pgdr_verify_pitr", run_conf={"server": name})
        assert verify.get_state() == "success", verify.states
        assert catalog.get(second).status == "verified"
        run_dag("pgdr_health")
        assert gateway.denied == [], gateway.denied

        # A week and a day later the first full base backup is out of the window: the pruner deletes it, and the WAL
        # only it needed.
        oldest = archive.segments(store)[0].name

        class ADayPastTheWindow(datetime):
            @classmethod
            def now(cls, tz=None):
                return datetime.now(tz or UTC) + timedelta(days=8)

        monkeypatch.setattr("pgdr.tasks.basebackup.datetime", ADayPastTheWindow)
        third = run_dag("pgdr_basebackup", run_conf={"kind": "full"})
        assert third.get_state() == "success", third.states
        assert first not in {e.backup_id for e in catalog.backups()}
        assert archive.segments(store)[0].name > oldest  # (the new base backup archives more meanwhile)
        assert gateway.denied == [], gateway.denied

        # Each set is refused what is not its work.
        def client(access_key: str):
            return boto3.client(
                "s3",
                endpoint_url=f"http://127.0.0.1:{gateway.port}",
                region_name="us-east-1",
                aws_access_key_id=access_key,
                aws_secret_access_key="secret",
            )

        wal_key = archive.segments(store)[-1].key
        other_servers_wal = wal_key.replace(f"/{name}/", "/other/")
        for access_key, call in (
            ("archiver-key", lambda c: c.delete_object(Bucket=BUCKET, Key=wal_key)),
            ("archiver-key", lambda c: c.put_object(Bucket=BUCKET, Key=other_servers_wal, Body=b"x")),
            ("archiver-key", lambda c: c.get_object(Bucket=BUCKET, Key=f"{layout.server_prefix(name)}x")),
            ("worker-key", lambda c: c.delete_object(Bucket=BUCKET, Key=wal_key)),
            ("pruner-key", lambda c: c.put_object(Bucket=BUCKET, Key=wal_key, Body=b"x")),
        ):
            with pytest.raises(botocore.exceptions.ClientError, match="AccessDenied"):
                call(client(access_key))
        assert store.exists(wal_key)
    finally:
        server.destroy()
        gateway.close()
