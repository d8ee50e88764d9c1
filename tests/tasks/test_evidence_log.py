"""The evidence log (#30) from the DAGs: each backup, verification and restore writes its signed receipt as its
last act, on S3; the receipts outlive the backups retention deletes; ``python -m pgdr evidence verify`` passes, and
names a receipt edited in the bucket; a receipt that cannot be written never fails the work."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import BUCKET, assert_restores_as_source

pytestmark = pytest.mark.integration


def test_backups_verification_restore_and_retention_leave_receipts_that_verify(
    plan, run_dag, env, pg_server, s3_server, s3_storage, monkeypatch, capsys
):
    from pgdr.airflow_glue.connections import open_store
    from pgdr.airflow_glue.evidence import open_evidence
    from pgdr.local.cli import main
    from pgdr.logical.catalog import BackupCatalog
    from test_encryption import ENCRYPTED, key_connection

    monkeypatch.setenv("AIRFLOW_CONN_PGDR_EVIDENCE_KEY", key_connection("k3"))
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_KEY", key_connection("k1"))  # the backups' master key
    databases = [{"name": "shop", "conn_id": "pgdr_shop", "retention": {"keep_last": 1, "keep_days": 0}}]
    evidence_section = {"storage": "s3", "key_conn_id": "pgdr_evidence_key"}
    p = plan(databases=databases, storage=s3_storage, evidence=evidence_section, defaults=ENCRYPTED)
    catalog = BackupCatalog(*open_store(p.databases[0].storage, p), "shop")
    assert run_dag("pgdr_backup").get_state() == "success"
    (first,) = catalog.backups()
    verify = run_dag("pgdr_verify_restore", run_conf={"database": "shop", "backup_id": first.backup_id})
    assert verify.get_state() == "success", verify.states
    assert catalog.get(first.backup_id).status == "verified"
    assert_restores_as_source(run_dag, pg_server, first.backup_id, "shop_evidence")
    # A second backup, verified, and a third: retention (keep_last 1; the newest verified one is kept too) deletes
    # the first, its records with it; its receipts stay.
    assert run_dag("pgdr_backup").get_state() == "success"
    second = catalog.latest()
    verify = run_dag("pgdr_verify_restore", run_conf={"database": "shop", "backup_id": second.backup_id})
    assert verify.get_state() == "success", verify.states
    assert run_dag("pgdr_backup").get_state() == "success"
    third = catalog.latest()
    assert [e.backup_id for e in catalog.backups()] == [second.backup_id, third.backup_id]
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_KEY", key_connection("k2", "k1"))  # a new master key: rotate
    assert run_dag("pgdr_rotate_keys").get_state() == "success"

    evidence = open_evidence(p)
    receipts = evidence.receipts()
    assert [(r.body["event"], r.body["subject"]["backup_id"], r.body["result"]) for r in receipts[:6]] == [
        ("backup_taken", first.backup_id, "ok"),
        ("backup_verified", first.backup_id, "ok"),
        ("restore_finished", first.backup_id, "ok"),
        ("backup_taken", second.backup_id, "ok"),
        ("backup_verified", second.backup_id, "ok"),
        ("backup_taken", third.backup_id, "ok"),
    ]
    rest = [(r.body["event"], r.body["subject"], r.body["result"]) for r in receipts[6:]]
    assert rest == [
        ("retention_deleted", {"database": "shop"}, "ok"),
        ("keys_rotated", {"key_connections": ["pgdr_key"]}, "ok"),
    ]
    assert receipts[6].body["details"]["deleted"] == [first.backup_id]
    assert receipts[7].body["details"]["report"]["pgdr_key"]["rewrapped"] == 2
    taken, verified, restored = (r.body for r in receipts[:3])
    assert taken["details"]["rows"] == sum(first.manifest.row_counts.values())
    assert taken["details"]["files"] == len(first.manifest.files) and len(taken["details"]["files_sha256"]) == 64
    assert taken["details"]["encrypted_under"] == "k1"
    assert taken["details"]["airflow"]["dag_id"] == "pgdr_backup" and taken["actor"]
    assert verified["details"]["checks"]["integrity"]["amcheck_ok"] is True and verified["details"]["rto_met"]
    assert verified["record"]["key"].endswith(f"{first.backup_id}/verification.json")
    assert restored["details"]["mode"] == "new-database" and restored["details"]["achieved_rto_seconds"] > 0
    assert restored["details"]["checks"]["integrity"]["amcheck_ok"] is True
    assert all(k.startswith(f"{env['prefix']}/evidence-v1/chain/") for k in (evidence.key(r.seq) for r in receipts))

    capsys.readouterr()
    assert main(["evidence", "verify"]) == 0
    out = capsys.readouterr().out
    assert "the evidence chain verifies: 8 checked (receipts 1 to 8)" in out, out

    # The pack of today, from the command line: its counts are what ran; the deleted backup is still listed.
    today = receipts[0].body["at"][:10]
    out_dir = p.path.parent / "pack"
    assert main(["evidence", "export", "--from", today, "--to", today, "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert f"the evidence pack of {today} to {today} is in {out_dir}" in out and "no findings" in out, out
    pack = json.loads((out_dir / "pack.json").read_bytes())
    (shop,) = pack["databases"]
    assert pack["chain"]["ok"] and pack["receipts_in_period"] == 8
    assert [b["backup_id"] for b in shop["backups"]["list"]] == [first.backup_id, second.backup_id, third.backup_id]
    assert [b["backup_id"] for b in shop["backups"]["list"] if b["deleted_by_retention_at"]] == [first.backup_id]
    assert (shop["restore_tests"]["count"], shop["restore_tests"]["passed"]) == (2, 2)
    assert shop["restore_tests"]["worst_s"] == round(
        max(r.body["details"]["restore_seconds"] for r in receipts[1:5:3]), 1
    )
    assert [(i["backup_id"], i["mode"], i["result"]) for i in shop["incidents"]] == [
        (first.backup_id, "new-database", "ok")
    ]
    assert shop["encryption"]["backups_encrypted"] == 3 and shop["encryption"]["keys_used"] == ["k1"]
    assert [k["rewrapped"] for k in pack["key_rotations"]] == [{"pgdr_key": 2.0}]
    sums = (out_dir / "SHA256SUMS").read_text()
    assert f"{hashlib.sha256((out_dir / 'pack.json').read_bytes()).hexdigest()}  pack.json" in sums
    # pgdr_evidence stores the same pack beside the log, and its own receipt records the pack's SHA-256.
    run = run_dag("pgdr_evidence", run_conf={"from": today, "to": today})
    assert run.get_state() == "success", run.states
    stored = s3_server.client.get_object(Bucket=BUCKET, Key=f"{evidence.root}/packs/{today}_{today}/pack.json")
    stored_pack = json.loads(stored["Body"].read())
    assert stored_pack["databases"] == pack["databases"]
    exported = evidence.receipts()[-1].body
    assert exported["event"] == "evidence_exported" and exported["result"] == "ok"
    stored_digest = hashlib.sha256(json.dumps(stored_pack, indent=2, sort_keys=True, ensure_ascii=False).encode())
    assert exported["details"]["pack_json_sha256"] == stored_digest.hexdigest()
    assert main(["evidence", "verify"]) == 0
    assert "the evidence chain verifies: 9 checked" in capsys.readouterr().out

    # One byte of the restore's receipt changed in the bucket: named, with what to suspect.
    key = evidence.key(3)
    edited = json.loads(s3_server.client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    edited["details"]["achieved_rto_seconds"] = 1.0
    s3_server.client.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(edited).encode())
    assert main(["evidence", "verify"]) == 1
    out = capsys.readouterr().out
    assert "the evidence chain is broken: receipt 3" in out and "fails its signature" in out, out
    assert "receipt 4" in out and "does not follow receipt 3" in out, out

    # Without its key the receipt is not written, and the backup still succeeds.
    monkeypatch.delenv("AIRFLOW_CONN_PGDR_EVIDENCE_KEY")
    assert run_dag("pgdr_backup").get_state() == "success"
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_EVIDENCE_KEY", key_connection("k1"))
    assert len(evidence.receipts()) == 9


def test_appends_to_s3_from_many_threads_at_once_make_one_gapless_chain(s3_server, env):
    """S3's conditional write (If-None-Match: *) is what orders concurrent writers: six at once, ten receipts each,
    through the real HTTP endpoint, repeated three times."""
    import os

    from pgdr.evidence import EvidenceLog
    from pgdr.storage.backends import S3Store
    from pgdr.storage.encryption import MasterKeys
    from support import append_at_once

    keys = MasterKeys(current="e", keys={"e": os.urandom(32)}, source="test")
    for round_ in range(3):
        prefix = f"{env['prefix']}-{round_}"
        errors = append_at_once(lambda p=prefix: EvidenceLog(S3Store(s3_server.client, BUCKET), p, keys), 6, 10)
        assert errors == []
        report = EvidenceLog(S3Store(s3_server.client, BUCKET), prefix, keys).verify()
        assert report.ok and report.checked == 60, report.problems


def test_health_checks_the_chain_since_its_last_run_walks_it_whole_daily_and_alerts_once_on_a_break(
    plan, run_dag, env, s3_server, s3_storage, monkeypatch, slack
):
    """pgdr_health checks the receipts written since its last run (a cursor in the alert journal) and the whole chain
    once a day: an edit behind the cursor is found by the next whole walk, alerted once, on the change of state.
    Each change of state has its receipt."""
    from datetime import UTC, datetime, timedelta

    from pgdr.airflow_glue.alert_journal import AlertJournal
    from pgdr.airflow_glue.evidence import open_evidence
    from pgdr.tasks.health import EVIDENCE_CURSOR
    from test_encryption import key_connection

    monkeypatch.setenv("AIRFLOW_CONN_PGDR_EVIDENCE_KEY", key_connection("k1"))
    p = plan(storage=s3_storage, evidence={"storage": "s3", "key_conn_id": "pgdr_evidence_key"})
    evidence = open_evidence(p)

    def receipt() -> None:
        evidence.append("backup_taken", "schedule", {"database": "shop", "backup_id": "x"}, "ok")

    def evidence_alerts() -> list[str]:
        return [m["text"] for m in slack.messages if "evidence_chain" in m.get("text", "")]

    for _ in range(3):
        receipt()
    assert run_dag("pgdr_health").states["check_evidence"] == "success"
    cursor = AlertJournal.for_plan().get_state(EVIDENCE_CURSOR)
    assert cursor["seq"] == 3 and cursor["digest"] == evidence.receipts()[2].digest
    # The checks that changed state on this first run (no backup of shop yet) have their receipt, after the three.
    (changed,) = [r.body for r in evidence.receipts()[3:]]
    assert changed["event"] == "health_state_changed" and changed["result"] == "failed"
    assert "shop:backup_age" in changed["subject"]["checks"]
    assert {
        "check": "backup_age",
        "database": "shop",
        "detail": "there is no backup at all; run pgdr_backup",
    } in changed["details"]["failing"]

    # Receipt 2 edited behind the cursor, receipt 4 written: the incremental check sees 4, which follows 3.
    key = evidence.key(2)
    body = json.loads(s3_server.client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body["result"] = "failed"
    s3_server.client.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(body).encode())
    receipt()
    run_dag("pgdr_health")  # nothing changed state: no new health receipt
    assert AlertJournal.for_plan().get_state(EVIDENCE_CURSOR)["seq"] == 5 == len(evidence.receipts())
    assert evidence_alerts() == []

    # A day later the whole chain is walked again: receipt 2 is named, once.
    journal = AlertJournal.for_plan()
    stale = {**journal.get_state(EVIDENCE_CURSOR), "full_at": (datetime.now(UTC) - timedelta(days=2)).isoformat()}
    journal.set_state(EVIDENCE_CURSOR, stale)
    run_dag("pgdr_health")
    (alert,) = evidence_alerts()
    assert "the evidence chain is broken: receipt 2" in alert and "fails its signature" in alert, alert
    assert evidence.receipts()[-1].body["subject"]["checks"] == ["plan:evidence_chain"]  # the break, recorded too
    assert "python -m pgdr evidence verify lists every problem" in alert
    run_dag("pgdr_health")
    assert len(evidence_alerts()) == 1  # a change of state is alerted once


def test_base_backups_pitr_verification_and_the_drill_write_their_receipts(
    plan, run_dag, env, pitr_server, s3_server, monkeypatch
):
    from conftest import PITR_PREFIX, PITR_SERVER
    from pgdr.airflow_glue.evidence import open_evidence
    from pgdr.local.cli import main
    from test_encryption import key_connection

    monkeypatch.setenv("AIRFLOW_CONN_PGDR_EVIDENCE_KEY", key_connection("k1"))
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_PITR", pitr_server.connection_uri("shop"))
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_RESTORE", pitr_server.restore_connection_uri())
    storage = {
        "s3": {"type": "s3", "bucket": BUCKET, "prefix": PITR_PREFIX, "aws_conn_id": "pgdr_s3"},
        "evidence": {"type": "s3", "bucket": BUCKET, "prefix": env["prefix"], "aws_conn_id": "pgdr_s3"},
    }
    pitr = {"storage": "s3", "keep_window": "7d", "archive_timeout": "10s"}
    p = plan(
        databases=[{"name": "shop", "conn_id": "pgdr_pitr", "server": PITR_SERVER}],
        storage=storage,
        servers={PITR_SERVER: {"pitr": pitr}},
        evidence={"storage": "evidence", "key_conn_id": "pgdr_evidence_key"},
    )
    full = run_dag("pgdr_basebackup", run_conf={"kind": "full"})
    assert full.get_state() == "success", full.states
    verify = run_dag("pgdr_verify_pitr", run_conf={"server": PITR_SERVER})
    assert verify.get_state() == "success", verify.states
    drill = run_dag("pgdr_drill")
    assert drill.states["publish_report"] in ("success", "failed"), drill.states

    # (the base backup's retention may delete what other tests of this archive left: its own receipt then)
    receipts = [r for r in open_evidence(p).receipts() if r.body["event"] != "retention_deleted"]
    events = [(r.body["event"], r.body["result"]) for r in receipts]
    assert events == [("base_backup_taken", "ok"), ("pitr_verified", "ok"), ("drill_run", events[2][1])], events
    taken, verified = receipts[0].body, receipts[1].body
    assert taken["subject"]["server"] == PITR_SERVER and taken["details"]["kind"] == "full"
    assert taken["details"]["stored_intact"]["check"] == (
        "SHA-256 and every file against PostgreSQL's backup_manifest, on the stored bytes"
    )
    assert taken["record"]["key"].endswith(f"{taken['subject']['backup_id']}/backup.json")
    assert verified["details"]["achieved_recovery_point"] <= verified["details"]["target"]
    assert verified["details"]["databases"]["shop"]["amcheck_ok"] is True
    (drill_receipt,) = [r.body for r in receipts if r.body["event"] == "drill_run"]
    expected = "ok" if drill.states["publish_report"] == "success" else "failed"
    assert drill_receipt["result"] == expected and drill_receipt["details"]["report"], drill_receipt
    assert main(["evidence", "verify"]) == 0


def test_pgdr_evidence_prunes_receipts_older_than_keep_behind_a_signed_anchor(
    plan, run_dag, env, s3_server, s3_storage, monkeypatch, capsys
):
    """keep: 1s: after the pack is stored, prune_receipts deletes every receipt but the newest (with the pruner's
    connection), writes its anchor and its own receipt; the chain verifies from the anchor on."""
    import time

    from pgdr.airflow_glue.evidence import open_evidence
    from pgdr.local.cli import main
    from test_encryption import key_connection

    monkeypatch.setenv("AIRFLOW_CONN_PGDR_EVIDENCE_KEY", key_connection("k1"))
    target = {**s3_storage["s3"], "prefix": f"{env['prefix']}-pruned"}
    p = plan(
        databases=[{"name": "shop", "conn_id": "pgdr_shop"}],
        storage={**s3_storage, "evidence": target},
        evidence={"storage": "evidence", "key_conn_id": "pgdr_evidence_key", "keep": "1s"},
    )
    assert run_dag("pgdr_backup").get_state() == "success"
    assert run_dag("pgdr_backup").get_state() == "success"
    evidence = open_evidence(p)
    time.sleep(1.1)
    today = evidence.receipts()[0].body["at"][:10]
    run = run_dag("pgdr_evidence", run_conf={"from": today, "to": today})
    assert run.get_state() == "success", run.states
    # Receipts 1-2 (backups) and 3 (the pack's) were older than 1 s... but the newest (3) always stays.
    kept = evidence.receipts()
    assert [(r.seq, r.body["event"]) for r in kept] == [(3, "evidence_exported"), (4, "retention_deleted")]
    assert kept[1].body["subject"] == {"evidence": "receipts"} and kept[1].body["details"]["pruned"] == [1, 2]
    capsys.readouterr()
    assert main(["evidence", "verify"]) == 0
    assert "those before 3 pruned by evidence.keep (signed anchor)" in capsys.readouterr().out
