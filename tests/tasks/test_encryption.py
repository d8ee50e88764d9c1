"""Encryption at rest with dag.test(): S3 server-side encryption behind a policy that requires it, client-side
AES-256-GCM with master keys from an Airflow connection, key rotation, and what a missing key or a changed
object does to a verification, a restore and a drill."""

from __future__ import annotations

import hashlib
import json

import psycopg
import pytest
from conftest import BUCKET, source_row_counts
from pgdr.records import VerificationRecord
from pgdr.storage.encryption import new_master_key
from support import SseRequiredGateway, aws_connection

pytestmark = pytest.mark.integration

KEYS = {"k1": new_master_key(), "k2": new_master_key(), "k3": new_master_key()}
KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/0f3c9b1e-pgdr-test"
ENCRYPTED = {"encryption": {"key_conn_id": "pgdr_key"}}


def key_connection(current: str, *previous: str, key: str | None = None) -> str:
    """The AIRFLOW_CONN_ JSON of a master-key connection: login = current key id, password = its key."""
    return json.dumps(
        {
            "conn_type": "generic",
            "login": current,
            "password": key or KEYS[current],
            "extra": {"previous_keys": {k: KEYS[k] for k in previous}},
        }
    )


def _databases(pg_server, pattern: str) -> list[str]:
    with psycopg.connect(**pg_server.dsn("postgres")) as conn:
        return [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (pattern,))]


def _objects(s3_server, prefix: str) -> list[str]:
    pages = s3_server.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_encrypted_backup_on_sse_kms_storage_verifies_and_drills(
    plan, run_dag, s3_server, s3_storage, env, monkeypatch, pg_server, slack
):
    """Client-side encryption on top of SSE-KMS, in a bucket whose policy denies any write without
    aws:kms: nothing pgdr writes is refused, every object is stored under the KMS key, nothing of the
    dump is readable in the bucket, and the backup verifies and drills, negative control included."""
    gateway = SseRequiredGateway(s3_server.port, "aws:kms")
    try:
        monkeypatch.setenv("AIRFLOW_CONN_PGDR_S3", aws_connection(gateway.port))
        monkeypatch.setenv("AIRFLOW_CONN_PGDR_KEY", key_connection("k1"))
        storage = {"s3": {**s3_storage["s3"], "sse": "aws:kms", "kms_key_id": KMS_KEY}}
        p = plan(storage=storage, defaults=ENCRYPTED)

        from pgdr.airflow_glue.connections import open_store
        from pgdr.errors import PermanentFailure
        from pgdr.logical.catalog import BackupCatalog
        from pgdr.storage.backends import S3Store

        store, layout = open_store(p.databases[0].storage)
        with pytest.raises(PermanentFailure, match="access denied"):  # the policy holds: a write without SSE is refused
            S3Store(store.client, BUCKET).put_bytes(f"{env['prefix']}/probe", b"x")
        gateway.denied.clear()

        assert run_dag("pgdr_backup").states["protect_pgdr_shop.back_up[0]"] == "success"
        catalog = BackupCatalog(store, layout, "shop")
        entry = catalog.latest()
        assert entry.manifest.encryption.key_id == "k1" and entry.manifest.encryption.key_conn_id == "pgdr_key"
        manifest_text = store.get_bytes(layout.manifest_key("shop", entry.backup_id)).decode()
        assert KEYS["k1"] not in manifest_text
        toc = next(f for f in entry.manifest.files if f.name == "toc.dat")
        assert b"PGDMP" not in store.get_bytes(toc.key)  # pg_dump's table of contents, sealed

        verified = run_dag("pgdr_verify_restore", run_conf={"database": "shop", "backup_id": entry.backup_id})
        assert verified.states["verify.record_verification[0]"] == "success", verified.states
        record = catalog.get(entry.backup_id).verification
        assert record.status == "verified"
        assert record.integrity["rows_checked"] == sum(source_row_counts(pg_server, "shop").values())

        drill = run_dag("pgdr_drill", run_conf={"databases": ["shop"], "scenario": "latest-verified"})
        assert str(drill.state) == "success", drill.states
        report_key = next(k for k in _objects(s3_server, env["prefix"]) if k.endswith("drill.json"))
        (result,) = json.loads(store.get_bytes(report_key))["databases"]
        control = result["negative_control"]
        assert control["rejected"] is True and control["encrypted"] is True
        assert "checksum forged" in control["message"] and "fails AES-GCM authentication" in control["message"]

        keys = _objects(s3_server, env["prefix"])
        assert len(keys) > len(entry.manifest.files) + 3  # data, manifest, verification, GX results, drill reports
        for key in keys:
            head = s3_server.client.head_object(Bucket=BUCKET, Key=key)
            assert (head.get("ServerSideEncryption"), head.get("SSEKMSKeyId")) == ("aws:kms", KMS_KEY), key
        assert gateway.denied == [] and gateway.writes >= len(keys)
        assert len(slack.texts()) == 1 and "shop: PASS" in slack.texts()[0]  # the drill's report, and no alert
        slack.clear()

        health = run_dag("pgdr_health")
        assert health.states["check_database[0]"] == "success"
        # An object written under the prefix without SSE (by hand, past the policy) is a finding.
        planted = layout.data_key("shop", entry.backup_id, "9999.dat.gz")
        s3_server.client.put_object(Bucket=BUCKET, Key=planted, Body=b"not encrypted")
        run_dag("pgdr_health")
        finding = next(t for t in slack.texts() if "encryption" in t)
        assert planted in finding and "no server-side encryption" in finding
    finally:
        gateway.close()


def test_a_missing_or_wrong_key_fails_first_naming_the_key_and_creates_nothing(
    plan, run_dag, monkeypatch, pg_server, slack
):
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_KEY", key_connection("k1"))
    p = plan(defaults=ENCRYPTED)
    assert run_dag("pgdr_backup").states["protect_pgdr_shop.back_up[0]"] == "success"
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog

    store, layout = open_store(p.databases[0].storage)
    backup_id = BackupCatalog(store, layout, "shop").latest().backup_id
    before = set(_databases(pg_server, "%"))

    cases = [
        (
            key_connection("k2"),
            "master key id 'k1', which the Airflow connection 'pgdr_key' does not hold (it holds: k2)",
        ),
        (
            key_connection("k1", key=KEYS["k3"]),
            "the key the Airflow connection 'pgdr_key' holds under that id does not open it",
        ),
        (None, "master key id 'k1', and the connection that should hold it is not defined"),
    ]
    for connection, message in cases:
        slack.clear()
        if connection:
            monkeypatch.setenv("AIRFLOW_CONN_PGDR_KEY", connection)
        else:
            monkeypatch.delenv("AIRFLOW_CONN_PGDR_KEY")
        run = run_dag("pgdr_verify_restore", run_conf={"database": "shop", "backup_id": backup_id})
        assert run.states["verify.restore_and_check[0]"] == "failed" and run.tries["verify.restore_and_check"] == 1
        assert run.states["verify.validate_and_apply_privileges[0]"] == "upstream_failed"
        assert any(message in t for t in slack.texts()), slack.texts()
        restore = run_dag(
            "pgdr_restore", run_conf={"database": "shop", "backup": backup_id, "target_name": "shop_keyless"}
        )
        assert restore.states["check_checksums"] == "failed" and restore.states["restore_backup"] == "upstream_failed"
        assert set(_databases(pg_server, "%")) == before  # no scratch, no target: nothing was created
    # Backups need the key too, and fail before pg_dump runs.
    backup = run_dag("pgdr_backup")
    assert backup.states["protect_pgdr_shop.back_up[0]"] == "failed"
    assert len(BackupCatalog(store, layout, "shop").backups()) == 1


def test_rotating_the_key_twice_keeps_the_oldest_backup_restorable(plan, run_dag, monkeypatch, pg_server):
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_KEY", key_connection("k1"))
    p = plan(defaults=ENCRYPTED)
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog

    store, layout = open_store(p.databases[0].storage)
    catalog = BackupCatalog(store, layout, "shop")

    def key_ids() -> list[str]:
        return [e.manifest.encryption.key_id for e in catalog.backups()]

    def data() -> dict[str, str]:
        return {
            f.key: hashlib.sha256(store.get_bytes(f.key)).hexdigest()
            for e in catalog.backups()
            for f in e.manifest.files
        }

    assert run_dag("pgdr_backup").states["protect_pgdr_shop.back_up[0]"] == "success"
    oldest = catalog.latest().backup_id

    # First rotation: k2 becomes current, k1 moves to previous_keys.
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_KEY", key_connection("k2", "k1"))
    assert run_dag("pgdr_backup").states["protect_pgdr_shop.back_up[0]"] == "success"
    assert key_ids() == ["k1", "k2"]
    stored = data()
    rotation = run_dag("pgdr_rotate_keys")
    assert rotation.states["report"] == "success", rotation.states
    report = _rotation_report(rotation)
    assert report["pgdr_key"]["rewrapped"] == 1 and report["pgdr_key"]["key_ids_no_longer_needed"] == ["k1"]
    assert key_ids() == ["k2", "k2"] and data() == stored  # manifests rewritten, data untouched

    # Second rotation: k3 current; k1 already gone from the connection.
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_KEY", key_connection("k3", "k2"))
    assert run_dag("pgdr_backup").states["protect_pgdr_shop.back_up[0]"] == "success"
    report = _rotation_report(run_dag("pgdr_rotate_keys"))
    assert report["pgdr_key"]["rewrapped"] == 2 and report["pgdr_key"]["key_ids_no_longer_needed"] == ["k2"]
    assert key_ids() == ["k3", "k3", "k3"]

    # Only k3 left: the oldest backup still restores, row for row.
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_KEY", key_connection("k3"))
    try:
        restore = run_dag("pgdr_restore", run_conf={"database": "shop", "backup": oldest, "target_name": "shop_oldest"})
        assert restore.states["write_report"] == "success", restore.states
        assert source_row_counts(pg_server, "shop_oldest") == source_row_counts(pg_server, "shop")
    finally:
        with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS shop_oldest WITH (FORCE)")


def _rotation_report(dag_run) -> dict:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        value = (
            session.query(XComModel.value)
            .filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id, task_id="report", key="return_value")
            .scalar()
        )
    return json.loads(value) if isinstance(value, str) else value


def test_wal_segments_are_archived_under_the_targets_sse_through_the_policy(
    plan, s3_server, s3_storage, env, monkeypatch, tmp_path
):
    """The server's archive_command, as pgdr builds it from the plan, makes barman-cloud ask for SSE-KMS:
    the bucket policy lets the segment in and S3 stores it under the plan's KMS key."""
    import os
    import shlex
    import subprocess

    from pgdr.errors import PgdrError
    from pgdr.physical.archive import archiver_bin_dir

    try:
        archiver_bin_dir()
    except PgdrError as err:
        pytest.skip(f"{err} (make archiver installs it)")
    gateway = SseRequiredGateway(s3_server.port, "aws:kms")
    try:
        monkeypatch.setenv("AIRFLOW_CONN_PGDR_S3", aws_connection(gateway.port))
        storage = {"s3": {**s3_storage["s3"], "sse": "aws:kms", "kms_key_id": KMS_KEY}}
        p = plan(storage=storage, servers={"pgdr_shop": {"conn_id": "pgdr_shop", "pitr": {"storage": "s3"}}})
        from pgdr.airflow_glue.connections import open_archive

        _store, _layout, archive = open_archive(p.servers[0], p)
        segment = tmp_path / "000000010000000000000001"
        segment.write_bytes(os.urandom(1 << 20))
        command = archive.archive_command().replace("%p", shlex.quote(str(segment)))
        result = subprocess.run(
            command, shell=True, env={**os.environ, **archive.access.environment()}, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-2000:]
        (key,) = [k for k in _objects(s3_server, env["prefix"]) if "/wals/" in k]
        head = s3_server.client.head_object(Bucket=BUCKET, Key=key)
        assert (head["ServerSideEncryption"], head["SSEKMSKeyId"]) == ("aws:kms", KMS_KEY)
        assert gateway.denied == []
    finally:
        gateway.close()


def test_an_unencrypted_backup_newer_than_the_encrypted_ones_is_refused(plan, run_dag, monkeypatch, slack):
    """Backups from before the plan encrypted a database still verify; an unencrypted one that appears
    after encryption began (someone with write access but no key) is refused at the checksum gate."""
    from datetime import timedelta

    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.storage.layout import new_backup_id
    from support import copy_backup_as

    p = plan()
    assert run_dag("pgdr_backup").states["protect_pgdr_shop.back_up[0]"] == "success"
    store, layout = open_store(p.databases[0].storage)
    catalog = BackupCatalog(store, layout, "shop")
    before = catalog.latest()
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_KEY", key_connection("k1"))
    plan(defaults=ENCRYPTED)
    assert run_dag("pgdr_backup").states["protect_pgdr_shop.back_up[0]"] == "success"
    sealed = catalog.latest()
    assert sealed.manifest.encryption is not None

    old = run_dag("pgdr_verify_restore", run_conf={"database": "shop", "backup_id": before.backup_id})
    assert old.states["verify.record_verification[0]"] == "success", old.states

    later = sealed.recovery_point + timedelta(minutes=5)
    planted = new_backup_id(later)
    copy_backup_as(store, layout, before.manifest, planted, later)
    run = run_dag("pgdr_verify_restore", run_conf={"database": "shop", "backup_id": planted})
    assert (
        run.states["verify.restore_and_check[0]"] == "failed"
        and run.states["verify.validate_and_apply_privileges[0]"] == "upstream_failed"
    )
    assert any("is not encrypted, but the plan encrypts this database" in t for t in slack.texts()), slack.texts()


def test_a_drill_without_the_key_fails_before_its_scratch_database(plan, run_dag, monkeypatch, pg_server):
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_KEY", key_connection("k1"))
    p = plan(defaults=ENCRYPTED)
    assert run_dag("pgdr_backup").states["protect_pgdr_shop.back_up[0]"] == "success"
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog

    store, layout = open_store(p.databases[0].storage)
    catalog = BackupCatalog(store, layout, "shop")
    catalog.record_verification(
        VerificationRecord.from_dict({"backup_id": catalog.latest().backup_id, "status": "verified"})
    )
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_KEY", key_connection("k2"))
    drill = run_dag("pgdr_drill", run_conf={"databases": ["shop"], "scenario": "latest-verified"})
    assert drill.states["rehearse.rehearse_backup[0]"] == "failed", drill.states
    assert drill.states["rehearse.create_scratch[0]"] == "upstream_failed"
    assert _databases(pg_server, "pgdr\\_drill\\_%") == []
