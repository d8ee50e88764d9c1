"""Second copies (#29 item 1, logical backups): pgdr_copy copies every backup to another bucket or folder, proves it
there by SHA-256 before the manifest, never follows a deletion at the source, and a restore from the copy works."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from conftest import BUCKET, source_row_counts

pytestmark = pytest.mark.integration

DR_BUCKET = "pgdr-dr-copy"


@pytest.fixture
def dr_bucket(s3_server):
    try:
        s3_server.client.create_bucket(Bucket=DR_BUCKET)
    except s3_server.client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return DR_BUCKET


@pytest.fixture(scope="module")
def second_region():
    """A second S3 endpoint in a process of its own (its own state, as another region or account would have): the port
    and a client; it has the DR bucket."""
    import boto3
    from pgdr.postgres.binaries import free_port
    from support import wait_for

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="testing-key",
        aws_secret_access_key="testing-secret",
    )

    def up() -> bool:
        assert server.poll() is None, f"moto_server on port {port} exited with {server.returncode}"
        try:
            client.list_buckets()
            return True
        except Exception:  # noqa: BLE001 - not listening yet
            return False

    try:
        wait_for(up, timeout=60, interval=0.2)
        client.create_bucket(Bucket=DR_BUCKET)
        yield port, client
    finally:
        server.terminate()
        server.wait(timeout=30)


def _catalog(p, target):
    from pgdr.airflow_glue.connections import open_store
    from pgdr.logical.catalog import BackupCatalog

    store, layout = open_store(p.storages[target], p)
    return BackupCatalog(store, layout, "shop")


def _stored(catalog, backup_id) -> dict[str, str]:
    """name -> SHA-256 of the bytes stored for each file of a backup, read from the store itself."""
    manifest = catalog.get(backup_id).manifest
    return {f.name: hashlib.sha256(catalog.store.get_bytes(f.key)).hexdigest() for f in manifest.files}


def _back_up(run_dag) -> None:
    dag_run = run_dag("pgdr_backup")
    assert dag_run.states["protect_pgdr_shop.back_up[0]"] == "success", dag_run.states


def _restore_from_copy(run_dag, pg_server, copy: str, backup: str) -> None:
    """Restore shop from ``copy`` through the form into a new database: every table's rows as the source's."""
    target = f"shop_from_{copy}"
    try:
        conf = {"database": "shop", "restore_from": copy, "backup": backup, "target_name": target}
        dag_run = run_dag("pgdr_restore", run_conf=conf)
        assert dag_run.states["write_report"] == "success", dag_run.states
        assert source_row_counts(pg_server, target) == source_row_counts(pg_server, "shop")
    finally:
        _drop(pg_server, target)


def _drop(pg_server, name: str) -> None:
    with psycopg.connect(**pg_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_backup_is_copied_inside_s3_checked_there_restorable_from_there_and_kept_when_the_source_loses_it(
    plan, run_dag, env, dr_bucket, pg_server, monkeypatch
):
    """Both buckets through one AWS connection: copied inside S3. The copy holds the same bytes (read from the copy
    bucket), its manifest names the copy's keys, the verification record follows, a restore with the copy as the
    database's storage gives the source's rows back, and deleting the backup at the source leaves the copy's."""
    from pgdr.logical.copies import copies_inside_s3
    from pgdr.records import VerificationRecord
    from pgdr.storage.backends import S3Store

    storage = {
        "main": {"type": "s3", "bucket": BUCKET, "prefix": env["prefix"], "aws_conn_id": "pgdr_s3"},
        "dr": {"type": "s3", "bucket": dr_bucket, "prefix": env["prefix"], "aws_conn_id": "pgdr_s3"},
    }
    p = plan(storage=storage, defaults={"copies": ["dr"]})
    assert copies_inside_s3(p.storages["main"], p.storages["dr"])
    _back_up(run_dag)
    source, copy = _catalog(p, "main"), _catalog(p, "dr")
    (entry,) = source.backups()
    assert copy.backups() == []

    def no_streaming(*_args):
        raise AssertionError("streamed through the worker, not copied inside S3")

    monkeypatch.setattr(S3Store, "put_stream", no_streaming)
    dag_run = run_dag("pgdr_copy")
    assert dag_run.states["copy_backups[0]"] == "success", dag_run.states
    (copied,) = copy.backups()
    assert copied.backup_id == entry.backup_id and copied.status == "unverified"
    assert _stored(copy, entry.backup_id) == _stored(source, entry.backup_id)
    assert {f.sha256 for f in copied.manifest.files} == {f.sha256 for f in entry.manifest.files}
    assert all(f.key.startswith(f"{env['prefix']}/v1/shop/") for f in copied.manifest.files)
    assert copied.manifest == entry.manifest  # the same keys in another bucket: the manifest as written
    assert copied.manifest.row_counts == entry.manifest.row_counts

    # Verified after it was copied: the next run brings the record over (the bytes are the same).
    source.record_verification(
        VerificationRecord.from_dict({"backup_id": entry.backup_id, "status": "verified", "restore_seconds": 3.0})
    )
    assert run_dag("pgdr_copy").states["copy_backups[0]"] == "success"
    assert copy.get(entry.backup_id).status == "verified"

    # The source bucket loses the backup (retention, an attacker, a deleted bucket): the copy keeps it.
    source.delete_backup(entry.backup_id)
    assert run_dag("pgdr_copy").states["copy_backups[0]"] == "success"
    assert [e.backup_id for e in copy.backups()] == [entry.backup_id]

    # Restored from the copy ('Restore from' on the form): the source's rows; the report says where it came from.
    try:
        conf = {"database": "shop", "restore_from": "dr", "target_name": "shop_from_copy"}
        dag_run = run_dag("pgdr_restore", run_conf=conf)
        assert dag_run.states["write_report"] == "success", dag_run.states
        assert source_row_counts(pg_server, "shop_from_copy") == source_row_counts(pg_server, "shop")
        (report,) = [k for k in copy.store.list(copy.layout.backup_prefix("shop", entry.backup_id)) if ".md" in k.key]
        assert f"Restored from copy `dr` (s3://{dr_bucket}/" in copy.store.get_bytes(report.key).decode()
    finally:
        _drop(pg_server, "shop_from_copy")


def test_an_encrypted_backup_copied_under_another_prefix_restores_from_the_copy(
    plan, run_dag, env, pg_server, monkeypatch
):
    """The copy (a local folder, no prefix) names other keys than the source (an S3 prefix): the manifest of an
    encrypted backup is authenticated anew there, so a restore from the copy unlocks it; the copy's files are the
    source's ciphertext, byte for byte. A key rotation re-wraps the copy too: with the old key gone from the
    connection, the copy still restores."""
    from test_encryption import ENCRYPTED, _rotation_report, key_connection

    monkeypatch.setenv("AIRFLOW_CONN_PGDR_KEY", key_connection("k1"))
    storage = {
        "main": {"type": "s3", "bucket": BUCKET, "prefix": env["prefix"], "aws_conn_id": "pgdr_s3"},
        "vault": {"type": "local", "path": str(env["tmp"] / "vault")},
    }
    p = plan(storage=storage, defaults={"copies": ["vault"], **ENCRYPTED})
    _back_up(run_dag)
    assert run_dag("pgdr_copy").states["copy_backups[0]"] == "success"
    source, copy = _catalog(p, "main"), _catalog(p, "vault")
    (entry,), (copied,) = source.backups(), copy.backups()
    assert copied.manifest.encryption.key_id == "k1" and _stored(copy, entry.backup_id) == _stored(
        source, entry.backup_id
    )
    assert copied.manifest.files[0].key != entry.manifest.files[0].key
    assert copied.manifest.encryption.manifest_mac != entry.manifest.encryption.manifest_mac

    # Key rotation re-wraps the copy's data keys too, and only then calls the old key unneeded: it can go.
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_KEY", key_connection("k2", "k1"))
    rotation = run_dag("pgdr_rotate_keys")
    assert rotation.states["report"] == "success", rotation.states
    report = _rotation_report(rotation)["pgdr_key"]
    assert report["rewrapped"] == 2 and report["key_ids_no_longer_needed"] == ["k1"], report
    assert [e.manifest.encryption.key_id for e in copy.backups()] == ["k2"]
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_KEY", key_connection("k2"))

    plan(storage=storage, databases=[{"name": "shop", "conn_id": "pgdr_shop", "storage": "vault"}], defaults=ENCRYPTED)
    try:
        dag_run = run_dag(
            "pgdr_restore", run_conf={"database": "shop", "backup": entry.backup_id, "target_name": "shop_from_vault"}
        )
        assert dag_run.states["write_report"] == "success", dag_run.states
        assert source_row_counts(pg_server, "shop_from_vault") == source_row_counts(pg_server, "shop")
    finally:
        _drop(pg_server, "shop_from_vault")


@pytest.fixture
def main_and_local_copy(plan, env, dr_bucket):
    """shop backed up to S3, copied to a local folder (another kind of target: streamed through the worker)."""
    storage = {
        "main": {"type": "s3", "bucket": BUCKET, "prefix": env["prefix"], "aws_conn_id": "pgdr_s3"},
        "vault": {"type": "local", "path": str(env["tmp"] / "vault")},
    }
    return plan(storage=storage, defaults={"copies": ["vault"], "copy_rpo": "10m"})


def test_a_backup_damaged_at_the_source_is_not_copied_and_the_others_are(main_and_local_copy, run_dag, slack):
    """One of two backups has a flipped byte in the source bucket: the copy run fails naming that file, the other
    backup is copied whole, and nothing of the damaged one is left in the copy (no manifest, no data file)."""
    p = main_and_local_copy
    _back_up(run_dag)
    _back_up(run_dag)
    source, copy = _catalog(p, "main"), _catalog(p, "vault")
    damaged, good = source.backups()
    victim = max(damaged.manifest.files, key=lambda f: f.stored_size)
    data = bytearray(source.store.get_bytes(victim.key))
    data[len(data) // 2] ^= 0x01
    source.store.put_bytes(victim.key, bytes(data))

    dag_run = run_dag("pgdr_copy")
    assert dag_run.states["copy_backups[0]"] == "failed", dag_run.states
    assert [e.backup_id for e in copy.backups()] == [good.backup_id]
    assert _stored(copy, good.backup_id) == _stored(source, good.backup_id)
    assert not list(copy.store.list(copy.layout.backup_prefix("shop", damaged.backup_id)))
    alert = "\n".join(slack.texts())
    assert victim.key in alert and "damaged at the source" in alert and damaged.backup_id in alert, alert


def test_bytes_that_read_back_wrong_from_the_copy_are_removed_and_the_next_run_copies_them(
    main_and_local_copy, run_dag, monkeypatch
):
    """The copy's storage keeps different bytes than it was sent (a faulty disk, a proxy): the read-back finds it,
    what was written is removed, no manifest is written; the next run, with the storage mended, copies it whole."""
    from pgdr.storage.backends import LocalFolderStore

    p = main_and_local_copy
    _back_up(run_dag)
    source, copy = _catalog(p, "main"), _catalog(p, "vault")
    (entry,) = source.backups()
    honest = LocalFolderStore.put_stream

    def faulty(self, key, stream):
        honest(self, key, stream)
        if key.endswith(".dat.gz"):
            path = self._path(key)
            path.write_bytes(path.read_bytes()[:-1])  # the last byte lost

    monkeypatch.setattr(LocalFolderStore, "put_stream", faulty)
    assert run_dag("pgdr_copy").states["copy_backups[0]"] == "failed"
    assert copy.backups() == [] and not list(copy.store.list(copy.layout.database_prefix("shop")))

    monkeypatch.setattr(LocalFolderStore, "put_stream", honest)
    assert run_dag("pgdr_copy").states["copy_backups[0]"] == "success"
    assert _stored(copy, entry.backup_id) == _stored(source, entry.backup_id)


def test_health_fails_when_a_copy_misses_a_backup_longer_than_copy_rpo(main_and_local_copy, run_dag, monkeypatch):
    """copy_lag.<target>: within copy_rpo a missing backup is fine; past it the check fails naming the backup and
    pgdr_copy; once copied it passes at 0 s; an unreadable copy target fails the check, not the run."""
    from pgdr.airflow_glue.connections import resources
    from pgdr.health import check_copies, read_source

    p = main_and_local_copy
    _back_up(run_dag)
    (entry,) = _catalog(p, "main").backups()
    db, res = p.databases[0], resources(p)
    now = datetime.now(UTC)
    source = read_source(db, res)
    (soon,) = check_copies(db, res, now, source)
    assert soon.check == "copy_lag.vault" and soon.ok and "lacks the newest 1" in soon.detail
    (late,) = check_copies(db, res, now + timedelta(hours=1), source)
    assert (
        not late.ok
        and "1 backup is not in copy" in late.detail
        and entry.backup_id in late.detail
        and "pgdr_copy" in late.detail
    )
    assert "copy_rpo 10m" in late.detail and late.value >= 3600

    assert run_dag("pgdr_copy").states["copy_backups[0]"] == "success"
    (done,) = check_copies(db, res, now + timedelta(hours=1), source)
    assert done.ok and done.value == 0.0 and "holds every backup" in done.detail

    shutil.rmtree(p.storages["vault"].path)
    (p.storages["vault"].path).write_text("not a folder")  # the copy target cannot be listed
    (broken,) = check_copies(db, res, now, source)
    assert not broken.ok and "cannot be compared" in broken.detail and "not a folder" in broken.detail


def test_with_its_storage_unreachable_the_restore_names_the_copy_and_restores_from_it(
    main_and_local_copy, run_dag, pg_server, monkeypatch, slack, capsys
):
    """The S3 endpoint of the database's storage is gone: the restore fails at once in plan_restore, nothing touched,
    and its alert names the copy and the field to set; with 'Restore from' = the copy the database comes back."""
    from airflow.sdk.exceptions import ParamValidationError
    from pgdr.postgres.binaries import free_port
    from support import aws_connection

    _back_up(run_dag)
    assert run_dag("pgdr_copy").states["copy_backups[0]"] == "success"
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_S3", aws_connection(free_port()))  # nothing listens there
    slack.clear()
    failed = run_dag("pgdr_restore", run_conf={"database": "shop", "target_name": "shop_from_vault"})
    assert failed.states["plan_restore"] == "failed", failed.states
    alert = "\n".join(slack.texts())
    assert "could not be reached" in alert and "'vault'" in alert and "Restore from" in alert, alert

    with pytest.raises(ParamValidationError, match="restore_from: 'nowhere' is not one of"):  # the form refuses it
        run_dag("pgdr_restore", run_conf={"database": "shop", "restore_from": "nowhere"})
    from pgdr.local.cli import main

    (entry,) = _catalog(main_and_local_copy, "vault").backups()
    capsys.readouterr()
    assert main(["list", "--database", "shop", "--from", "vault"]) == 0  # the break-glass command's --from
    listing = capsys.readouterr().out
    assert entry.backup_id in listing and str(main_and_local_copy.storages["vault"].path) in listing, listing
    assert main(["list", "--database", "shop", "--from", "nowhere"]) == 1
    assert "is not stored in 'nowhere'; it is in: main (its storage), vault (a copy)" in capsys.readouterr().out
    _restore_from_copy(run_dag, pg_server, "vault", "latest-dump")


def test_a_restore_from_a_target_the_database_is_not_copied_to_is_refused_naming_where_it_is(tmp_path):
    """The form's list holds every copy of the plan; a database copied elsewhere (or not at all) gets told where."""
    from pgdr.incident import InvalidRestoreRequest, read_request
    from pgdr.plan import parse_plan

    text = f"""
storage:
  main: {{type: local, path: {tmp_path / "a"}}}
  vault: {{type: local, path: {tmp_path / "b"}}}
databases:
  - {{name: shop, conn_id: pgdr_shop, copies: [vault]}}
  - {{name: crm, conn_id: pgdr_shop}}
"""
    p = parse_plan(text, tmp_path / "p.yaml")
    assert read_request({"restore_from": "vault"}, p, p.database("shop"))["restore_from"] == "vault"
    assert read_request({}, p, p.database("shop"))["restore_from"] == "main"
    with pytest.raises(InvalidRestoreRequest, match="database 'crm' is not stored in 'vault'; it is in: main"):
        read_request({"restore_from": "vault"}, p, p.database("crm"))


def _verify_tasks(dag_run, state: str) -> list[str]:
    return sorted(k for k, v in dag_run.states.items() if k.startswith("verify.record_verification") and v == state)


def test_the_daily_verification_proves_each_copy_by_a_restore_from_it_every_verify_copies_every(
    main_and_local_copy, run_dag, pg_server, slack
):
    """The scheduled run restores the copy's newest backup from the copy (besides the source's new backup) and
    records it there, marked verified_from; pgdr_copy does not overwrite that record with the source's; the next
    daily run leaves the copy alone until verify_copies_every has passed; the drill shows the copy's proof, and an
    old, missing or failed one is an action item. A byte flipped in the copy fails a verification from the copy,
    recorded in the copy only, and the alert says it was the copy."""
    from pgdr.airflow_glue.connections import resources
    from pgdr.drill import copy_proofs, evaluate, render_markdown
    from pgdr.verification import copy_targets

    p = main_and_local_copy
    db, res = p.databases[0], resources(p)
    _back_up(run_dag)
    assert copy_targets(res, datetime.now(UTC)) == []  # nothing in the copy yet: nothing to prove there
    assert run_dag("pgdr_copy").states["copy_backups[0]"] == "success"
    (entry,) = _catalog(p, "main").backups()

    daily = run_dag("pgdr_verify_restore")  # a scheduled run: the copy is due (never proven)
    assert _verify_tasks(daily, "success") == ["verify.record_verification[0]"], daily.states
    (copied,) = _catalog(p, "vault").backups()
    assert copied.status == "verified" and copied.verification.verified_from == "vault"
    assert copied.verification.integrity["rows_checked"] == sum(source_row_counts(pg_server, "shop").values())
    assert _catalog(p, "main").get(entry.backup_id).status == "unverified"  # recorded in the copy only
    assert run_dag("pgdr_verify_restore", run_conf={"database": "shop"}).states["verify.record_verification[0]"] == (
        "success"
    )
    assert _catalog(p, "main").get(entry.backup_id).verification.verified_from is None
    assert run_dag("pgdr_copy").states["copy_backups[0]"] == "success"
    assert _catalog(p, "vault").get(entry.backup_id).verification.verified_from == "vault"  # kept, not the source's

    now = datetime.now(UTC)
    assert copy_targets(res, now) == []  # proven minutes ago
    assert run_dag("pgdr_verify_restore").states["find_backups"] == "skipped"  # nothing new, the copy is not due
    due = copy_targets(res, now + db.verify_copies_every)
    assert due == [{"database": "shop", "backup_id": entry.backup_id, "from": "vault"}]

    def drill_row(at):
        proofs = copy_proofs(db, res, at)
        result = evaluate(
            "shop", 60, 3600, [], {"newest_verified_age_s": 1, "worst_gap_s": 1}, None, None, None, "x", proofs
        )
        return (
            proofs["vault"],
            result["action_items"],
            render_markdown(
                {
                    "drill_id": "d",
                    "status": "fail",
                    "started_at": "",
                    "scenario": "s",
                    "run_id": "r",
                    "databases": [{**result, "phases": []}],
                    "pitr": [],
                }
            ),
        )

    proof, actions, markdown = drill_row(now)
    assert proof["met"] and proof["backup_id"] == entry.backup_id and proof["restore_seconds"] > 0
    assert not [a for a in actions if "copy" in a]
    assert "## Second copies, proven by a restore from the copy" in markdown and "| shop | vault | pass |" in markdown
    proof, actions, _ = drill_row(now + timedelta(days=9))
    assert not proof["met"] and any("was last proven by a restore 216h" in a and "daily run" in a for a in actions), (
        actions
    )

    copy = _catalog(p, "vault")
    victim = max(copy.get(entry.backup_id).manifest.files, key=lambda f: f.stored_size)
    data = bytearray(copy.store.get_bytes(victim.key))
    data[len(data) // 2] ^= 0x01
    copy.store.put_bytes(victim.key, bytes(data))
    slack.clear()
    by_hand = run_dag("pgdr_verify_restore", run_conf={"database": "shop", "verify_from": "vault"})
    assert _verify_tasks(by_hand, "failed") and by_hand.states["verify.restore_and_check[0]"] == "failed"
    failed = _catalog(p, "vault").get(entry.backup_id).verification
    assert failed.status == "failed" and failed.verified_from == "vault" and failed.failed_phase == "check_checksums"
    assert _catalog(p, "main").get(entry.backup_id).status == "verified"  # the source's backup is not the copy's
    alert = "\n".join(slack.texts())
    assert f"{entry.backup_id} in copy vault" in alert, alert
    proof, actions, _ = drill_row(datetime.now(UTC))
    assert not proof["met"] and any(
        "the last restore from copy 'vault'" in a and "check_checksums" in a for a in actions
    )
    copy.store.put_bytes(
        victim.key,
        bytes(data[: len(data) // 2]) + bytes([data[len(data) // 2] ^ 0x01]) + bytes(data[len(data) // 2 + 1 :]),
    )


def test_the_drill_rehearses_a_lost_primary_target_from_the_copy_without_reading_the_primary(
    main_and_local_copy, plan, run_dag, monkeypatch, slack
):
    """Scenario primary-target-lost with the primary's S3 endpoint gone: the drill restores the newest verified backup
    from the copy, measures the RPO from the copy, stores its report in the copy, and passes. A plan without copies is
    told at once that losing its target loses every backup."""
    import json

    from pgdr.postgres.binaries import free_port
    from support import aws_connection

    p = main_and_local_copy
    _back_up(run_dag)
    assert run_dag("pgdr_verify_restore", run_conf={"database": "shop"}).states["verify.record_verification[0]"] == (
        "success"
    )
    assert run_dag("pgdr_copy").states["copy_backups[0]"] == "success"
    by_hand = run_dag("pgdr_verify_restore", run_conf={"database": "shop", "verify_from": "vault"})
    assert by_hand.states["verify.record_verification[0]"] == "success"
    (entry,) = _catalog(p, "vault").backups()

    monkeypatch.setenv("AIRFLOW_CONN_PGDR_S3", aws_connection(free_port()))  # the primary's endpoint: nothing there
    dag_run = run_dag("pgdr_drill", run_conf={"scenario": "primary-target-lost"})
    assert str(dag_run.state) == "success", dag_run.states
    (json_path,) = (p.storages["vault"].path / "v1/reports/drills").glob("*/drill.json")
    report = json.loads(json_path.read_text())
    (result,) = report["databases"]
    assert report["scenario"] == "primary-target-lost" and report["status"] == "pass", report
    assert result["backup_id"] == entry.backup_id and result["checks"]["rto"]["met"]
    assert result["rpo"]["newest_verified_age_s"] is not None and result["checks"]["copy_verified.vault"]["met"]
    assert "| shop | vault | pass |" in (json_path.parent / "drill.md").read_text()

    plan()  # a plan without copies
    slack.clear()
    refused = run_dag("pgdr_drill", run_conf={"scenario": "primary-target-lost"})
    assert refused.states["select_databases"] == "failed", refused.states
    alert = "\n".join(slack.texts())
    assert "none of shop has one: losing their storage target loses every backup" in alert, alert


def test_a_copy_in_another_region_is_streamed_verified_there_and_restores_with_the_primary_endpoint_gone(
    plan, env, second_region, run_dag, pg_server, monkeypatch, slack
):
    """Two S3 endpoints, two AWS connections (two regions or accounts): the copy is streamed through the worker (no
    CopyObject across endpoints), read back there, proven by a restore from it, and with the primary's endpoint gone
    the form restores the database from it, every table's rows identical to the source's."""
    from pgdr.logical.copies import copies_inside_s3
    from pgdr.postgres.binaries import free_port
    from support import aws_connection

    port, client = second_region
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_S3_DR", aws_connection(port))
    storage = {
        "main": {"type": "s3", "bucket": BUCKET, "prefix": env["prefix"], "aws_conn_id": "pgdr_s3"},
        "dr": {"type": "s3", "bucket": DR_BUCKET, "prefix": env["prefix"], "aws_conn_id": "pgdr_s3_dr"},
    }
    p = plan(storage=storage, defaults={"copies": ["dr"]})
    assert not copies_inside_s3(p.storages["main"], p.storages["dr"])
    _back_up(run_dag)
    assert run_dag("pgdr_copy").states["copy_backups[0]"] == "success"
    (entry,) = _catalog(p, "main").backups()
    stored = client.list_objects_v2(Bucket=DR_BUCKET, Prefix=f"{env['prefix']}/")["Contents"]
    assert {f.key for f in entry.manifest.files} <= {o["Key"] for o in stored}  # in the other endpoint's bucket
    assert _stored(_catalog(p, "dr"), entry.backup_id) == _stored(_catalog(p, "main"), entry.backup_id)
    by_hand = run_dag("pgdr_verify_restore", run_conf={"database": "shop", "verify_from": "dr"})
    assert by_hand.states["verify.record_verification[0]"] == "success", by_hand.states

    monkeypatch.setenv("AIRFLOW_CONN_PGDR_S3", aws_connection(free_port()))  # the primary region is gone
    _restore_from_copy(run_dag, pg_server, "dr", "latest-verified")
