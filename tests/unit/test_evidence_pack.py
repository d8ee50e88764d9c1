"""The evidence pack (#30 item 3) from a month of receipts: backups against the schedule (two missed days named),
restore tests (one failed), base backups and PITR verifications, a drill, two incidents, a key rotation, retention
deleting old backups (still listed); each section mapped to its controls; the chain's result and the pack's own
SHA-256; a receipt with hostile values is left out, not a crash."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pgdr.evidence import EvidenceLog
from pgdr.evidence_pack import build_pack, findings, pack_files, scheduled_runs, utc_bound
from pgdr.storage.backends import LocalFolderStore
from pgdr.storage.encryption import MasterKeys

KEYS = MasterKeys(current="ev-1", keys={"ev-1": os.urandom(32)}, source="Airflow connection 'pgdr_evidence_key'")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NOVEMBER = datetime(2026, 11, 1, tzinfo=UTC)
MISSED_DAYS = (12, 13)  # no backup on these days
FAILED_DAY = 20  # the restore test of this day's backup fails
PLAN_FACTS = {
    "plan": "/etc/pgdr/plan.yaml",
    "databases": [
        {
            "name": "shop",
            "in_plan": True,
            "schedule": "@daily",
            "rto_target_s": 1800.0,
            "rpo_target_s": 86400.0,
            "encryption": "master key pgdr_key",
            "storage_encryption": "SSE AES256",
        }
    ],
    "servers": [{"name": "main", "rpo_target_s": 300.0, "schedules": ["@daily"]}],
}


class Clock:
    def __init__(self):
        self.now = NOVEMBER

    def __call__(self):
        return self.now


def _restore_seconds(day: int) -> float:
    return 60.0 + day  # 61 s on the 1st ... 90 s on the 30th


def _month(tmp_path) -> tuple[EvidenceLog, Clock]:
    """November 2026 as the tasks record it."""
    clock = Clock()
    log = EvidenceLog(LocalFolderStore(tmp_path / "store"), "acme", KEYS, clock)

    def at(day: int, hour: int, minute: int = 0) -> None:
        clock.now = NOVEMBER + timedelta(days=day - 1, hours=hour, minutes=minute)

    at(1, 3)
    log.append(
        "drill_run",
        "schedule",
        {"drill": "2026-11-01-0300"},
        "failed",
        {
            "drill_id": "2026-11-01-0300",
            "scenario": "monthly",
            "status": "fail",
            "headline": ["shop: RTO 4m 10s / 30m 00s"],
            "broken": ["shop"],
            "action_items": ["shop: the negative control was not rejected"],
            "report": "s3://b/acme/v1/reports/drills/2026-11-01-0300/drill.html",
        },
    )
    for day in range(1, 31):
        backup_id = f"2026{11:02d}{day:02d}T001000Z"
        if day not in MISSED_DAYS:
            at(day, 0, 10)
            details = {"rows": 1000 + day, "stored_bytes": 5_000_000, "encrypted_under": "k1" if day < 15 else "k2"}
            log.append("backup_taken", "schedule", {"database": "shop", "backup_id": backup_id}, "ok", details)
            at(day, 1)
            failed = day == FAILED_DAY
            log.append(
                "backup_verification_failed" if failed else "backup_verified",
                "asset event (a new backup to verify)",
                {"database": "shop", "backup_id": backup_id},
                "failed" if failed else "ok",
                {
                    "failed_phase": "check_integrity" if failed else None,
                    "restore_seconds": _restore_seconds(day),
                    "rto_target_seconds": 1800.0,
                    "rto_met": True,
                    "verified_from": "s3",
                },
            )
        if day != 5:
            at(day, 2)
            kind = "full" if day % 7 == 1 else "incremental"
            log.append(
                "base_backup_taken", "schedule", {"server": "main", "backup_id": f"bb{day}"}, "ok", {"kind": kind}
            )
        if day % 7 == 3:
            at(day, 4)
            target = clock.now - timedelta(minutes=30)
            log.append(
                "pitr_verified",
                "schedule",
                {"server": "main", "backup_id": f"bb{day}"},
                "ok",
                {
                    "target": target.isoformat(),
                    "achieved_recovery_point": (target - timedelta(seconds=day)).isoformat(),
                },
            )
    # Two incidents, a key rotation and retention, in the middle of the month.
    for day, mttr, incident_id in ((8, 900.0, "INC-1"), (22, 2400.0, "INC-2")):
        at(day, 9)
        declared = (clock.now - timedelta(seconds=mttr)).isoformat()
        log.append(
            "restore_finished",
            "Airflow user alice",
            {"database": "shop", "backup_id": f"202611{day:02d}T001000Z"},
            "ok",
            {
                "mode": "replace",
                "achieved_rto_seconds": mttr - 300,
                "rto_target_seconds": 1800.0,
                "triggered_by": "alice",
                "incident": {
                    "id": incident_id,
                    "declared_at": declared,
                    "mttr_seconds": mttr,
                    "data_loss_window_seconds": 3000.0,
                    "served_at": clock.now.isoformat(),
                },
            },
        )
    at(15, 12)
    log.append(
        "keys_rotated",
        "Airflow user bob",
        {"key_connections": ["pgdr_key"]},
        "ok",
        {"report": {"pgdr_key": {"rewrapped": 13}}},
    )
    at(10, 5)  # (receipts are numbered in order of writing; the clock only dates them)
    log.append(
        "retention_deleted",
        "schedule",
        {"database": "shop"},
        "ok",
        {"deleted": ["20261101T001000Z", "20261102T001000Z"], "deleted_partial": []},
    )
    return log, clock


def _pack(log: EvidenceLog, since=NOVEMBER, until=None, now=None) -> dict:
    until = until or NOVEMBER + timedelta(days=30) - timedelta(microseconds=1)
    report = log.verify()
    chain = {"ok": report.ok, "summary": report.summary(), "checked": report.checked, "problems": report.problems}
    receipts = [(r.seq, r.body) for r in log.receipts()]
    return build_pack(receipts, PLAN_FACTS, since, until, now or datetime(2026, 12, 1, 6, tzinfo=UTC), chain, "log")


def test_a_month_of_receipts_makes_a_pack_whose_counts_are_what_ran(tmp_path):
    log, _ = _month(tmp_path)
    pack = _pack(log)
    assert pack["chain"]["ok"] and pack["receipts_in_period"] == len(log.receipts())
    (shop,) = pack["databases"]
    backups, tests = shop["backups"], shop["restore_tests"]
    assert (backups["scheduled"], backups["taken"]) == (30, 28)
    assert backups["missed"] == [f"2026-11-{d}T00:00:00+00:00" for d in MISSED_DAYS]
    # Retention deleted the first two backups: their receipts remain, and the pack lists them as deleted.
    deleted = [b["backup_id"] for b in backups["list"] if b["deleted_by_retention_at"]]
    assert deleted == ["20261101T001000Z", "20261102T001000Z"] and backups["deleted_by_retention"] == 2
    assert (tests["count"], tests["passed"], tests["failed"]) == (28, 27, 1)
    assert tests["pass_rate"] == round(27 / 28, 4)
    passed = sorted(_restore_seconds(d) for d in range(1, 31) if d not in (*MISSED_DAYS, FAILED_DAY))
    assert len(passed) == 27 and tests["median_s"] == 76.0 == passed[13]  # the 14th of 27: day 16's test
    assert tests["worst_s"] == 90.0 == max(passed)
    (failure,) = [t for t in tests["list"] if not t["passed"]]
    assert failure["backup_id"] == "20261120T001000Z" and failure["failed_phase"] == "check_integrity"
    assert shop["encryption"]["backups_encrypted"] == 28 and shop["encryption"]["keys_used"] == ["k1", "k2"]
    assert [(i["incident_id"], i["mttr_s"], i["actor"]) for i in shop["incidents"]] == [
        ("INC-1", 900.0, "Airflow user alice"),
        ("INC-2", 2400.0, "Airflow user alice"),
    ]
    (server,) = pack["servers"]
    assert server["base_backups"]["taken"] == 29 and server["base_backups"]["missed"] == ["2026-11-05T00:00:00+00:00"]
    assert server["base_backups"]["full"] == 5  # days 1, 8, 15, 22, 29
    assert server["verifications"]["count"] == 4 and server["verifications"]["rpo_worst_s"] == 24.0  # day 24
    (drill,) = pack["drills"]
    assert drill["action_items"] == ["shop: the negative control was not rejected"] and drill["result"] == "failed"
    (rotation,) = pack["key_rotations"]
    assert rotation["rewrapped"] == {"pgdr_key": 13.0} and rotation["actor"] == "Airflow user bob"
    assert pack["events"]["backup_taken"] == 28 and pack["events"]["restore_finished"] == 2
    assert {c["control"] for cs in pack["controls"].values() for c in cs} == {
        "A1.2",
        "A1.3",
        "A.8.13",
        "A.5.29",
        "A.5.30",
    }
    found = findings(pack)
    assert found[0] == "shop: 2 scheduled backups missed (first 2026-11-12 00:00 UTC)", found
    assert "shop: 1 of 28 restore tests failed" in found
    assert any("INC-2 took 40m 00s to recover (MTTR), over the RTO target 30m 00s" in f for f in found), found
    assert "server main: 1 scheduled base backups missed (first 2026-11-05 00:00 UTC)" in found
    assert "drill 2026-11-01-0300: shop: the negative control was not rejected" in found
    assert not any("INC-1" in f for f in found)


def test_the_files_carry_the_packs_own_sha256_and_the_html_names_each_control(tmp_path):
    log, _ = _month(tmp_path)
    files = pack_files(_pack(log))
    digest = hashlib.sha256(files["pack.json"]).hexdigest()
    sums = dict(line.split("  ")[::-1] for line in files["SHA256SUMS"].decode().splitlines())
    assert sums == {name: hashlib.sha256(data).hexdigest() for name, data in files.items() if name != "SHA256SUMS"}
    page = files["pack.html"].decode()
    assert digest in page and "the evidence chain verifies" in page
    for control in ("SOC 2 A1.2", "SOC 2 A1.3", "ISO 27001 A.8.13", "ISO 27001 A.5.29", "ISO 27001 A.5.30"):
        assert control in page
    assert "2026-11-12 00:00" in page and "INC-2" in page and "failed in check_integrity" in page
    assert files["chart.png"].startswith(b"\x89PNG")
    assert json.loads(files["pack.json"])["databases"][0]["backups"]["taken"] == 28


def test_the_period_bounds_what_is_counted_and_an_open_interval_is_not_yet_missed(tmp_path):
    log, _ = _month(tmp_path)
    # The last week only, made on the 30th at noon: the 30th's run is still open (its interval ends at midnight).
    since, until = datetime(2026, 11, 24, tzinfo=UTC), datetime(2026, 11, 30, 23, 59, tzinfo=UTC)
    pack = _pack(log, since, until, now=datetime(2026, 11, 30, 12, tzinfo=UTC))
    shop = pack["databases"][0]
    assert (shop["backups"]["scheduled"], shop["backups"]["taken"], shop["backups"]["missed"]) == (6, 7, [])
    assert shop["incidents"] == [] and pack["drills"] == [] and pack["key_rotations"] == []
    assert shop["backups"]["deleted_by_retention"] == 0  # the deleted backups are outside the period
    # A schedule before the log's first receipt counts nothing as missed: there was nothing to record it.
    pack = _pack(log, datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 10, 31, 23, 59, tzinfo=UTC))
    assert pack["databases"][0]["backups"]["scheduled"] == 0 and pack["receipts_in_period"] == 0
    monday = (datetime(2026, 11, 30, 6, tzinfo=UTC), datetime(2026, 12, 7, 6, tzinfo=UTC))  # weekly, Mondays 06:00
    assert scheduled_runs(["0 6 * * 1"], since, until, datetime(2026, 12, 1, tzinfo=UTC)) == []  # still open
    assert scheduled_runs(["0 6 * * 1"], since, until, datetime(2026, 12, 8, tzinfo=UTC)) == [monday]


def test_the_quarterly_run_exports_the_quarter_before_and_the_form_any_period():
    from pgdr.errors import PgdrError
    from pgdr.tasks.evidence import period_of, quarter_before

    run_at = datetime(2027, 1, 1, 6, tzinfo=UTC)
    assert quarter_before(run_at) == (
        datetime(2026, 10, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC) - timedelta(microseconds=1),
    )
    assert quarter_before(datetime(2026, 5, 17, tzinfo=UTC))[0] == datetime(2026, 1, 1, tzinfo=UTC)
    assert period_of({"from": None, "to": None}, run_at) == quarter_before(run_at)
    assert period_of({"from": "2026-11-01", "to": "2026-11-30"}, run_at) == (
        NOVEMBER,
        datetime(2026, 11, 30, 23, 59, 59, 999999, tzinfo=UTC),
    )
    assert utc_bound("2026-12-31T12:00:00+01:00") == datetime(2026, 12, 31, 11, tzinfo=UTC)
    with pytest.raises(PgdrError, match="give both 'from' and 'to'"):
        period_of({"from": "2026-11-01", "to": None}, run_at)
    with pytest.raises(PgdrError, match="'yesterday' is not a date or time"):
        period_of({"from": "yesterday", "to": "2026-11-30"}, run_at)


def test_an_edited_receipt_shows_in_the_pack_and_hostile_values_are_left_out(tmp_path):
    log, clock = _month(tmp_path)
    clock.now = NOVEMBER + timedelta(days=29, hours=20)
    log.append(
        "backup_verified",
        "schedule",
        {"database": ["not", "a", "name"], "backup_id": {"x": 1}},
        "ok",
        {"restore_seconds": "fast", "rto_met": "yes", "deleted": 5},
    )
    log.append("retention_deleted", "schedule", {"database": "shop"}, "ok", {"deleted": [1, None, "<script>"]})
    pack = _pack(log)
    assert pack["databases"][0]["restore_tests"]["count"] == 28  # the hostile one names no database
    assert "<script>" not in pack_files(pack)["pack.html"].decode()
    path = log.store.root / log.key(2)  # the first backup's receipt (the drill's is the first)
    path.write_bytes(path.read_bytes().replace(b'"rows":1001', b'"rows":9999'))
    pack = _pack(log)
    assert not pack["chain"]["ok"] and findings(pack)[0].startswith("The evidence chain does not verify: ")
    assert "receipt 2" in findings(pack)[0] and "fails its signature" in findings(pack)[0]


@pytest.mark.skipif(not CHROMIUM, reason="needs Debian's chromium to render the pack: apt-get install chromium")
def test_the_pack_renders_in_headless_chromium(tmp_path):
    """The README shows the month's pack as headless Chromium renders it."""
    log, _ = _month(tmp_path)
    page = tmp_path / "pack.html"
    page.write_bytes(pack_files(_pack(log))["pack.html"])
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    target = SCREENSHOTS / "evidence-pack.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--window-size=1200,1600",
            f"--screenshot={target}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert target.stat().st_size > 20_000
