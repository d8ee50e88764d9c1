"""S3 Object Lock on a storage target (#29 item 3), against moto's server, which keeps per-object retention and
refuses to delete a locked version: every object pgdr writes is locked as the plan says, the workers' own credentials
cannot delete a locked backup, and a day of backups, verifications, key rotation and retention runs without one
refused delete or overwrite (retention schedules what is still locked and deletes it once the lock has passed)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from botocore.exceptions import ClientError
from conftest import BUCKET, assert_restores_as_source

pytestmark = pytest.mark.integration

LOCKED_BUCKET = "pgdr-locked"
SLACK = timedelta(minutes=10)


@pytest.fixture
def locked_bucket(s3_server):
    """A bucket created with Object Lock enabled (and so versioning), as ``aws s3api create-bucket
    --object-lock-enabled-for-bucket`` makes it."""
    try:
        s3_server.client.create_bucket(Bucket=LOCKED_BUCKET, ObjectLockEnabledForBucket=True)
    except s3_server.client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return LOCKED_BUCKET


def _locked_storage(env, bucket: str = LOCKED_BUCKET, mode: str = "compliance", days: int = 1) -> dict:
    return {
        "s3": {
            "type": "s3",
            "bucket": bucket,
            "prefix": env["prefix"],
            "aws_conn_id": "pgdr_s3",
            "object_lock": {"mode": mode, "days": days},
        }
    }


def _versions(client, prefix: str) -> tuple[list[dict], list[dict]]:
    """Every version and delete marker under ``prefix`` of the locked bucket."""
    return _versions_in(client, LOCKED_BUCKET, prefix)


def _versions_in(client, bucket: str, prefix: str) -> tuple[list[dict], list[dict]]:
    """Every version and delete marker under ``prefix`` of ``bucket``."""
    versions, markers = [], []
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        versions += page.get("Versions", [])
        markers += page.get("DeleteMarkers", [])
    return versions, markers


def _failed(dag_run) -> dict:
    return {task: state for task, state in dag_run.states.items() if state not in ("success", "skipped")}


def test_a_locked_target_backs_up_verifies_rotates_and_prunes_with_no_refused_delete(
    plan, run_dag, env, s3_server, locked_bucket, monkeypatch
):
    """Compliance mode, one day: two backups (keep_last 1), a verify-restore, a key rotation and the health checks
    all succeed; the backup retention no longer keeps is scheduled, not tried; rotation wrote new manifest versions
    beside the locked old ones; every object is locked a day from its write; the workers' credentials cannot delete
    one (S3 answers AccessDenied), and pgdr's own delete says it was refused instead of reporting success."""
    from pgdr.airflow_glue.connections import AirflowResources, open_store
    from pgdr.errors import PermanentFailure
    from pgdr.health import check_object_lock
    from pgdr.logical.catalog import BackupCatalog
    from test_encryption import ENCRYPTED, _rotation_report, key_connection

    monkeypatch.setenv("AIRFLOW_CONN_PGDR_KEY", key_connection("k1"))
    databases = [{"name": "shop", "conn_id": "pgdr_shop", "retention": {"keep_last": 1, "keep_days": 0}}]
    p = plan(databases=databases, storage=_locked_storage(env), defaults=ENCRYPTED)
    db = p.databases[0]
    store, layout = open_store(db.storage, p)
    catalog = BackupCatalog(store, layout, "shop")
    client = s3_server.client

    first = run_dag("pgdr_backup")
    assert not _failed(first), first.states
    oldest = catalog.latest().backup_id
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_KEY", key_connection("k2", "k1"))
    second = run_dag("pgdr_backup")
    assert not _failed(second), second.states
    # keep_last 1 wants the first backup gone, but it is locked for a day: kept, scheduled, nothing refused
    assert [e.backup_id for e in catalog.backups()][0] == oldest and len(catalog.backups()) == 2

    newest = catalog.latest().backup_id
    verify = run_dag("pgdr_verify_restore", run_conf={"database": "shop", "backup_id": newest})
    assert not _failed(verify), verify.states
    assert catalog.get(newest).status == "verified"  # its record written on the locked target
    rotation = run_dag("pgdr_rotate_keys")
    assert not _failed(rotation), rotation.states
    assert _rotation_report(rotation)["pgdr_key"]["rewrapped"] == 1
    assert [e.manifest.encryption.key_id for e in catalog.backups()] == ["k2", "k2"]
    manifest_key = layout.manifest_key("shop", oldest)
    versions, _ = _versions(client, manifest_key)
    assert len(versions) == 2, "rotation writes a new version of the manifest; the locked one written first stays"

    objects, _ = _versions(client, f"{env['prefix']}/")
    assert objects
    for version in objects:
        head = client.head_object(Bucket=LOCKED_BUCKET, Key=version["Key"], VersionId=version["VersionId"])
        assert head["ObjectLockMode"] == "COMPLIANCE", version["Key"]
        assert head["ObjectLockRetainUntilDate"] >= version["LastModified"] + timedelta(days=1) - SLACK, version

    # The workers' credentials cannot delete a locked version; pgdr's delete of it fails loudly, and loses nothing.
    with pytest.raises(ClientError) as refused:
        client.delete_object(Bucket=LOCKED_BUCKET, Key=manifest_key, VersionId=versions[-1]["VersionId"])
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(PermanentFailure, match="S3 refused to delete 2 of 2 objects .* Object Lock"):
        store.delete([manifest_key])
    assert len(_versions(client, manifest_key)[0]) == 2 and catalog.backups()[0].backup_id == oldest

    result = check_object_lock(db, AirflowResources(p))
    assert result.ok, result.detail
    assert "compliance mode, 1 day" in result.detail


def test_retention_over_a_simulated_day_schedules_what_is_locked_and_deletes_it_once_the_lock_passed(
    plan, run_dag, env, s3_server, locked_bucket, monkeypatch
):
    """One simulated clock for pgdr and for the S3 server (moto runs in this process): a backup every two hours for a
    day, each verified, its manifest rewritten once, and retention after each (keep_last 3, keep_days 0) on a target
    locked for a day. No delete is refused; what the policy drops while locked is scheduled with its lock's end; a
    day later the same retention deletes every version of them, delete markers included."""
    import moto.s3.models
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.logical.retention import apply_retention
    from pgdr.plan import RetentionPolicy
    from pgdr.records import VerificationRecord
    from pgdr.storage.backends import ObjectLock, S3Store
    from pgdr.storage.layout import BackupLayout, new_backup_id
    from support import copy_backup_as

    plan(storage=_locked_storage(env))
    assert not _failed(run_dag("pgdr_backup"))
    real = BackupCatalog(S3Store(s3_server.client, LOCKED_BUCKET), BackupLayout(env["prefix"]), "shop")
    template = real.latest().manifest

    clock = {"now": datetime.now(UTC) + timedelta(days=3)}  # ahead of every real lock written above
    monkeypatch.setattr(moto.s3.models, "utcnow", lambda: clock["now"].replace(tzinfo=None))
    store = S3Store(
        s3_server.client, LOCKED_BUCKET, object_lock=ObjectLock("compliance", 1), clock=lambda: clock["now"]
    )
    layout = BackupLayout(f"{env['prefix']}-day")
    catalog = BackupCatalog(store, layout, "shop")
    policy = RetentionPolicy(keep_last=3, keep_days=0)
    start = clock["now"]
    made, results = [], []
    for step in range(13):  # 00:00 .. 24:00
        clock["now"] = start + timedelta(hours=2 * step)
        backup_id = new_backup_id(clock["now"])
        copy_backup_as(store, layout, template, backup_id, clock["now"])
        made.append(backup_id)
        entry = catalog.get(backup_id)
        verified = VerificationRecord("verified", backup_id, clock["now"].isoformat(), database="shop")
        catalog.record_verification(verified)
        catalog.write_manifest(entry.manifest)  # a key rotation's new manifest version
        results.append(apply_retention(catalog, policy, clock["now"]))

    # At 24:00 every backup older than the newest 3 is dropped by the policy, but all are locked until a day after
    # their writing: the first (00:00) until 24:00, which is now: it was deleted; the rest are scheduled.
    last = results[-1]
    assert last["kept"] == made[-3:]
    assert last["deleted"] == [made[0]] and sorted(last["scheduled"]) == made[1:-3]
    # (S3 keeps dates to the second)
    assert last["scheduled"][made[1]] == (start + timedelta(hours=26)).replace(microsecond=0).isoformat()
    assert sum(len(r["deleted"]) for r in results) == 1
    assert _versions(s3_server.client, layout.backup_prefix("shop", made[0])) == ([], [])

    clock["now"] = start + timedelta(days=2)  # every lock written above has passed
    done = apply_retention(catalog, policy, clock["now"])
    assert done["deleted"] == made[1:-3] and done["scheduled"] == {}
    assert [e.backup_id for e in catalog.backups()] == made[-3:]
    for backup_id in made[:-3]:
        assert _versions(s3_server.client, layout.backup_prefix("shop", backup_id)) == ([], []), backup_id


def test_object_lock_on_a_bucket_without_it_fails_before_writing_and_health_says_how_to_fix(
    plan, env, s3_server, monkeypatch
):
    """The plan asks for a lock the bucket cannot keep: the first write fails at once (no retry can help), naming
    the bucket and the two ways out, and nothing is written; the health check fails with the same words."""
    from pgdr.airflow_glue.connections import AirflowResources, open_store
    from pgdr.errors import PermanentFailure
    from pgdr.health import check_object_lock

    p = plan(storage=_locked_storage(env, bucket=BUCKET, mode="governance", days=7))
    store, layout = open_store(p.databases[0].storage, p)
    with pytest.raises(PermanentFailure, match=f"s3://{BUCKET}, but the bucket has Object Lock disabled") as err:
        store.put_bytes(layout.probe_key("x"), b"x")
    assert "--object-lock-enabled-for-bucket" in str(err.value) and "remove object_lock" in str(err.value)
    assert not list(store.list(f"{env['prefix']}/"))
    result = check_object_lock(p.databases[0], AirflowResources(p))
    assert not result.ok and "Object Lock disabled" in result.detail


def test_health_names_objects_written_without_the_plans_lock(plan, env, s3_server, locked_bucket):
    """Something wrote into a locked target without pgdr's lock (another tool, an older plan): health names it."""
    from pgdr.airflow_glue.connections import AirflowResources
    from pgdr.health import check_object_lock
    from pgdr.storage.layout import BackupLayout

    p = plan(storage=_locked_storage(env))
    key = BackupLayout(env["prefix"]).manifest_key("shop", "20260101T000000Z")
    s3_server.client.put_object(Bucket=LOCKED_BUCKET, Key=key, Body=json.dumps({}).encode())
    result = check_object_lock(p.databases[0], AirflowResources(p))
    assert not result.ok and result.value == 1.0, result.detail
    assert f"s3://{LOCKED_BUCKET}/{key} has no lock, not compliance" in result.detail


def test_a_copy_into_a_locked_bucket_is_locked_there(plan, run_dag, env, s3_server, locked_bucket):
    """pgdr_copy into a locked copy target through the same connection (CopyObject inside S3): the copy's objects
    carry the copy target's lock, and the copy's own retention schedules instead of deleting."""
    storage = {
        "main": {"type": "s3", "bucket": BUCKET, "prefix": env["prefix"], "aws_conn_id": "pgdr_s3"},
        "vault": {**_locked_storage(env)["s3"], "prefix": f"{env['prefix']}-vault"},
    }
    plan(storage=storage, defaults={"copies": ["vault"]})
    assert not _failed(run_dag("pgdr_backup"))
    copied = run_dag("pgdr_copy")
    assert not _failed(copied), copied.states
    objects, _ = _versions(s3_server.client, f"{env['prefix']}-vault/")
    assert any(o["Key"].endswith("/manifest.json") for o in objects), objects
    for version in objects:
        head = s3_server.client.head_object(Bucket=LOCKED_BUCKET, Key=version["Key"], VersionId=version["VersionId"])
        assert head["ObjectLockMode"] == "COMPLIANCE", version["Key"]
        assert head["ObjectLockRetainUntilDate"] >= version["LastModified"] + timedelta(days=1) - SLACK


def test_what_the_bucket_locks_by_default_is_held_too(s3_server):
    """The archiver (barman-cloud) writes WAL with no lock of its own; a bucket default retention locks it. pgdr's
    held() asks S3 once the plan's own lock would have ended, so such a segment is held, not tried."""
    from pgdr.storage.backends import ObjectLock, S3Store

    bucket = "pgdr-locked-by-default"
    client = s3_server.client
    try:
        client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    client.put_object_lock_configuration(
        Bucket=bucket,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 30}},
        },
    )
    key = "wal/000000010000000000000001.zst"
    client.put_object(Bucket=bucket, Key=key, Body=b"segment")
    store = S3Store(client, bucket, object_lock=ObjectLock("compliance", 1))
    now = datetime.now(UTC)
    assert store.held([key], now + timedelta(days=2))[key] > now + timedelta(days=29)
    assert store.held([key], now + timedelta(days=31)) == {}
    assert store.held(["wal/absent"], now) == {}


def test_an_object_uploaded_or_copied_in_parts_is_locked_too(s3_server, locked_bucket, env):
    """A base backup's tar, a large dump file: uploaded in parts (and copied in parts to a copy). S3 applies the lock
    asked for on the upload's creation; moto and some S3-compatible stores drop it. pgdr reads each object's lock
    back after writing it and sets it when missing, so the lock holds whatever the store does with parts."""
    import io

    from pgdr.storage.backends import ObjectLock, S3Store

    store = S3Store(s3_server.client, locked_bucket, object_lock=ObjectLock("governance", 2))
    big = f"{env['prefix']}/parts/base.tar.gz"
    store.put_stream(big, io.BytesIO(b"\0" * (9 << 20)))  # above boto3's 8 MB multipart threshold
    store.copy_from(store, f"{env['prefix']}/parts/copy.tar.gz", big)
    now = datetime.now(UTC)
    for key in (big, f"{env['prefix']}/parts/copy.tar.gz"):
        mode, until = store.retention_of(key)
        assert mode == "GOVERNANCE" and until >= now + timedelta(days=2) - SLACK, (key, mode, until)


def test_backups_deleted_with_the_workers_credentials_are_named_by_health_and_undeleted(
    plan, run_dag, env, s3_server, locked_bucket, capsys
):
    """With the workers' credentials an attacker can only hide a locked backup behind delete markers. pgdr's catalog
    no longer sees it, health says who to suspect and the command that brings it back, and ``python -m pgdr
    undelete`` does: the backup is listed again, whole (its checksums verify)."""
    from pgdr.airflow_glue.connections import AirflowResources, open_store
    from pgdr.health import check_object_lock
    from pgdr.local.cli import main
    from pgdr.logical.catalog import BackupCatalog

    p = plan(storage=_locked_storage(env))
    assert not _failed(run_dag("pgdr_backup"))
    store, layout = open_store(p.databases[0].storage, p)
    catalog = BackupCatalog(store, layout, "shop")
    (entry,) = catalog.backups()
    keys = [o.key for o in store.list(layout.backup_prefix("shop", entry.backup_id))]
    s3_server.client.delete_objects(Bucket=LOCKED_BUCKET, Delete={"Objects": [{"Key": k} for k in keys]})
    assert catalog.backups() == []

    result = check_object_lock(p.databases[0], AirflowResources(p))
    assert not result.ok and result.value == 1.0, result.detail
    assert "someone deleted backups of shop" in result.detail
    assert "python -m pgdr undelete --database shop --from s3" in result.detail

    assert main(["undelete", "--database", "shop", "--dry-run"]) == 0
    assert f"{len(keys)} objects of 'shop'" in capsys.readouterr().out and catalog.backups() == []
    assert main(["undelete", "--database", "shop"]) == 0
    assert "'shop' has 1 backups there again" in capsys.readouterr().out
    (back,) = catalog.backups()
    assert back.backup_id == entry.backup_id
    for file in back.manifest.files:
        assert hashlib.sha256(store.get_bytes(file.key)).hexdigest() == file.sha256, file.key
    assert check_object_lock(p.databases[0], AirflowResources(p)).ok
    assert main(["undelete", "--database", "shop"]) == 0
    assert "nothing of 'shop' is hidden" in capsys.readouterr().out


def test_undelete_refuses_a_target_without_object_lock(plan, s3_storage, capsys):
    """Without Object Lock pgdr's own retention may have made the markers: undoing them would resurrect pruned
    backups, so the command refuses and says why."""
    from pgdr.local.cli import main

    plan(storage=s3_storage)
    assert main(["undelete", "--database", "shop"]) == 1
    assert "'s3' has no object_lock in the plan" in capsys.readouterr().out
    assert main(["undelete", "--server", "main"]) == 1  # no such PITR server: named
    assert "Server 'main' has no point-in-time recovery" in capsys.readouterr().out
    assert main(["undelete"]) == 2 and "give --database or --server" in capsys.readouterr().out


def test_a_garbage_newer_manifest_version_does_not_hide_the_backup(
    plan, run_dag, env, s3_server, locked_bucket, pg_server
):
    """Written with the workers' credentials over a locked manifest, a garbage version becomes the current one: pgdr
    reads the newest valid earlier version, the backup still restores from it (its files verify), and the catalog
    names the invalid one for health."""
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog

    p = plan(storage=_locked_storage(env))
    assert not _failed(run_dag("pgdr_backup"))
    store, layout = open_store(p.databases[0].storage, p)
    catalog = BackupCatalog(store, layout, "shop")
    (entry,) = catalog.backups()
    key = layout.manifest_key("shop", entry.backup_id)
    s3_server.client.put_object(Bucket=LOCKED_BUCKET, Key=key, Body=b'{"format": "ransom note"}')

    (read,) = catalog.backups()
    assert read.manifest.to_json() == entry.manifest.to_json()
    (note,) = catalog.damaged
    assert note.backup_id == entry.backup_id and "earlier version of its manifest" in note.problem
    assert "Find out what wrote it" in note.problem
    assert_restores_as_source(run_dag, pg_server, entry.backup_id, "shop_from_locked")


def _locked_archive_bucket(client, name: str, default_days: int | None) -> str:
    """A bucket with Object Lock enabled and, when ``default_days`` is given, a default retention (compliance) that
    locks what is written without a lock of its own: the archiver's WAL."""
    try:
        client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    if default_days is not None:
        rule = {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": default_days}}
        client.put_object_lock_configuration(
            Bucket=name, ObjectLockConfiguration={"ObjectLockEnabled": "Enabled", "Rule": rule}
        )
    return name


def _server_plan(plan, env, bucket: str, server: str, days: int):
    storage = {
        "s3": {
            "type": "s3",
            "bucket": bucket,
            "prefix": env["prefix"],
            "aws_conn_id": "pgdr_s3",
            "object_lock": {"mode": "compliance", "days": days},
        }
    }
    return plan(
        databases=[{"name": "shop", "conn_id": f"pgdr_{server}", "server": server}],
        storage=storage,
        servers={server: {"conn_id": f"pgdr_{server}", "pitr": {"storage": "s3", "keep_window": "7d"}}},
    )


def test_a_locked_pitr_archive_is_backed_up_verified_checked_undeleted_and_pruned_once_its_locks_pass(
    plan, run_dag, env, s3_server, session_dir, monkeypatch, capsys
):
    """A server's WAL archive and base backups on a bucket under compliance Object Lock for 10 days (a week's
    recovery window): barman-cloud's WAL locked by the bucket's default retention, pgdr's base backups by their own.
    Base backups and a PITR verification succeed; health finds every object locked; segments and a base backup
    deleted with the workers' credentials are only hidden, named by health and brought back by ``undelete --server``;
    a day past the window, retention schedules the first base backup and its WAL (still locked) and tries nothing;
    once the locks pass, it deletes them."""
    import moto.s3.models
    from pgdr.airflow_glue.connections import AirflowResources, open_archive
    from pgdr.health import check_server_object_lock
    from pgdr.local.cli import main
    from pgdr.local.embedded import create_sample_database
    from pgdr.physical.catalog import BaseBackupCatalog
    from pgdr.physical.heartbeat import switch_and_wait_archived
    from pgdr.postgres.client import PgEndpoint
    from support import archiving_server, xcom_of

    client, name, prefix = s3_server.client, "vault", env["prefix"]
    bucket = _locked_archive_bucket(client, "pgdr-locked-archive", default_days=10)
    server = archiving_server(session_dir / f"postgres-{prefix}", s3_server.port, bucket, prefix, name)
    try:
        create_sample_database(server, "shop")
        endpoint = PgEndpoint("127.0.0.1", server.port, "postgres", "postgres", server.password)
        monkeypatch.setenv("AIRFLOW_CONN_PGDR_VAULT", server.connection_uri("shop"))
        monkeypatch.setenv("AIRFLOW_CONN_PGDR_RESTORE", server.restore_connection_uri())
        p = _server_plan(plan, env, bucket, name, days=10)
        store, layout, archive = open_archive(p.servers[0], p)
        catalog = BaseBackupCatalog(store, layout, name)
        for _ in range(2):
            switch_and_wait_archived(endpoint, 60)
            full = run_dag("pgdr_basebackup", run_conf={"kind": "full"})
            assert not _failed(full), full.states
        switch_and_wait_archived(endpoint, 60)
        first, second = (e.backup_id for e in catalog.backups())
        verify = run_dag("pgdr_verify_pitr", run_conf={"server": name})
        assert not _failed(verify), verify.states

        objects, _ = _versions_in(client, bucket, f"{prefix}/")
        assert any("/wals/" in v["Key"] for v in objects) and any(v["Key"].endswith("backup.json") for v in objects)
        for version in objects:
            head = client.head_object(Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"])
            assert head["ObjectLockMode"] == "COMPLIANCE", version["Key"]
            assert head["ObjectLockRetainUntilDate"] >= version["LastModified"] + timedelta(days=10) - SLACK
        check = check_server_object_lock(p.servers[0], AirflowResources(p))
        assert check.ok and "locked as planned on s3 (compliance mode, 10 days)" in check.detail, check.detail

        # The workers' credentials cannot delete a locked WAL segment; a plain delete only hides it and a base backup.
        segment = archive.segments(store)[0]
        with pytest.raises(ClientError, match="AccessDenied"):
            client.delete_object(
                Bucket=bucket, Key=segment.key, VersionId=_versions_in(client, bucket, segment.key)[0][0]["VersionId"]
            )
        client.delete_object(Bucket=bucket, Key=segment.key)
        client.delete_object(Bucket=bucket, Key=layout.record_key(name, first))
        assert first not in {e.backup_id for e in catalog.backups()}
        check = check_server_object_lock(p.servers[0], AirflowResources(p))
        assert not check.ok and "someone deleted base backups or WAL of server vault" in check.detail, check.detail
        assert "python -m pgdr undelete --server vault --from s3" in check.detail
        assert main(["undelete", "--server", name]) == 0
        assert "server 'vault' has 2 base backups there again" in capsys.readouterr().out
        assert (
            archive.segments(store)[0].key == segment.key
            and check_server_object_lock(p.servers[0], AirflowResources(p)).ok
        )

        # A day past the window: the first base backup and the WAL only it needs are due, but locked for 10 days.
        segments = len(archive.segments(store))
        clock = {"days": 8}

        class Simulated(datetime):
            @classmethod
            def now(cls, tz=None):
                return datetime.now(tz or UTC) + timedelta(days=clock["days"])

        monkeypatch.setattr("pgdr.tasks.basebackup.datetime", Simulated)
        monkeypatch.setattr(moto.s3.models, "utcnow", lambda: Simulated.now(UTC).replace(tzinfo=None))
        later = run_dag("pgdr_basebackup", run_conf={"kind": "full"})
        assert not _failed(later), later.states
        pruned = xcom_of(later, "prune_expired")
        assert pruned["deleted"] == [] and list(pruned["scheduled"]) == [first], pruned
        assert pruned["wal_segments_deleted"] == 0 and pruned["wal_segments_held"] > 0, pruned
        assert first in {e.backup_id for e in catalog.backups()} and len(archive.segments(store)) > segments

        clock["days"] = 11  # every lock written at the real time has passed
        final = run_dag("pgdr_basebackup", run_conf={"kind": "full"})
        assert not _failed(final), final.states
        pruned = xcom_of(final, "prune_expired")
        assert first in pruned["deleted"] and first not in pruned["scheduled"] and pruned["wal_segments_deleted"] > 0
        # (what is still scheduled was written in the simulated week, under a lock that has not passed)
        assert all(datetime.fromisoformat(u) > Simulated.now(UTC) for u in pruned["scheduled"].values()), pruned
        assert first not in {e.backup_id for e in catalog.backups()} and second in {
            e.backup_id for e in catalog.backups()
        }
        assert _versions_in(client, bucket, layout.base_backup_prefix(name, first)) == ([], [])
    finally:
        server.destroy()


def test_health_says_the_archive_needs_the_buckets_default_retention(plan, env, s3_server):
    """barman-cloud cannot ask for a lock: on a locked target without a default retention (or a shorter one than the
    plan's) the server's WAL is not immutable. Health says so and gives the command that sets it."""
    from pgdr.airflow_glue.connections import AirflowResources, open_archive
    from pgdr.health import check_server_object_lock

    client = s3_server.client

    def check_bucket(bucket: str):
        p = _server_plan(plan, env, bucket, "bare", days=3)
        store, layout, _archive = open_archive(p.servers[0], p)
        segment = f"{layout.wal_segments_prefix('bare')}0000000100000000/000000010000000000000001.zst"
        client.put_object(Bucket=bucket, Key=segment, Body=b"x")
        return check_server_object_lock(p.servers[0], AirflowResources(p))

    check = check_bucket(_locked_archive_bucket(client, "pgdr-locked-no-default", default_days=None))
    assert not check.ok, check.detail
    assert "s3://pgdr-locked-no-default has no default retention" in check.detail
    assert "aws s3api put-object-lock-configuration --bucket pgdr-locked-no-default" in check.detail
    assert '"Mode": "COMPLIANCE", "Days": 3' in check.detail
    assert "000000010000000000000001.zst has no lock, not compliance" in check.detail

    # (moto sets a default retention on an empty bucket only)
    check = check_bucket(_locked_archive_bucket(client, "pgdr-locked-short-default", default_days=1))
    assert not check.ok and "has a default retention of compliance mode, 1 day," in check.detail, check.detail
    assert "locked only until" in check.detail  # a day, not the plan's three
