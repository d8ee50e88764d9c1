"""The typed verification record reads what earlier versions wrote, writes the same fields, and owns the RTO rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pgdr.records import (
    PITR_KIND,
    VerificationRecord,
    achieved_rto,
    expected_recovery_seconds,
    expected_restore_seconds,
    phase_seconds,
    verify_restore_record,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "records"
ORDER = ("check_checksums", "restore_backup", "check_integrity", "validate_data", "apply_privileges")


def _phase(start: str, end: str, **extra) -> dict:
    return {"started_at": f"2026-12-01T10:{start}+00:00", "finished_at": f"2026-12-01T10:{end}+00:00", **extra}


def test_a_record_written_by_pgdr_0_3_reads_typed_and_writes_back_unchanged():
    raw = (FIXTURES / "verification-0.3.json").read_bytes()
    record = VerificationRecord.from_json(raw)
    assert record.verified and record.database == "app" and record.backup_id == "20261203T045735Z-5f7c2d"
    assert record.restore_seconds == pytest.approx(3.084931) and record.rto_met is True
    assert record.integrity["rows_checked"] == 90 and record.privileges["owners"] == 11
    assert record.run_id == "manual__2026-12-03T04:57:35.976340+00:00"
    assert sorted(record.phases["restore_backup"]["roles_created"]) == [
        "Data Owner",
        "app_login",
        "billing_owner",
        "reporting",
    ]
    assert json.loads(record.to_json()) == json.loads(raw)


def test_a_base_backup_record_written_by_pgdr_0_3_reads_typed_and_writes_back_unchanged():
    raw = (FIXTURES / "pitr-verification-0.3.json").read_bytes()
    record = VerificationRecord.from_json(raw)
    assert record.is_pitr and record.verified and record.server == "main"
    assert record.recovery_seconds == pytest.approx(sum(record.timings.values()) + record.recovery["replay_seconds"])
    assert json.loads(record.to_json()) == json.loads(raw)


def test_a_failed_base_backup_record_keeps_every_field_even_unknown():
    record = VerificationRecord(status="failed", backup_id="20261201T100000Z-abcdef", kind=PITR_KIND, server="main")
    written = json.loads(record.to_json())
    for key in ("recovery", "timings", "target_check", "databases", "chain", "target", "window"):
        assert key in written and written[key] is None
    assert "phases" not in written and "restore_seconds" not in written
    assert record.recovery_seconds is None


def test_a_record_of_an_older_or_newer_pgdr_keeps_what_it_does_not_know():
    oldest = {"status": "verified", "backup_id": "20261120T100000Z-abcdef", "restore_seconds": 4.2, "phases": {}}
    record = VerificationRecord.from_dict(oldest)
    assert record.restore_seconds == 4.2 and record.privileges is None
    newer = {**oldest, "evidence": {"receipt": "abc"}}
    assert json.loads(VerificationRecord.from_dict(newer).to_json())["evidence"] == {"receipt": "abc"}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b'{"status": "great"}',
        b'{"status": "verified"}',
        b'{"status": "verified", "backup_id": 7}',
        b"\xff\xfe",
    ],
)
def test_a_damaged_record_counts_for_nothing(raw):
    assert VerificationRecord.from_json(raw) is None


def test_the_record_of_a_verify_restore_from_its_phases():
    phases = {
        "check_checksums": _phase("00:00", "00:05"),
        "restore_backup": _phase(
            "00:05", "01:00", restore_seconds=50.0, download_seconds=4.0, roles_created=["app"], unrelated=1
        ),
        "check_integrity": {
            **_phase("01:00", "01:10"),
            "tables_checked": 3,
            "rows_checked": 10,
            "sequences_checked": 1,
            "amcheck_ok": True,
            "large_objects": 0,
            "problems": [],
        },
        "validate_data": {**_phase("01:10", "01:20"), "summary": {"expectations": 5, "failed": 0}, "report": "r.html"},
        "apply_privileges": {
            **_phase("01:20", "01:21"),
            "owners": 1,
            "grants": 2,
            "default_privileges": 0,
            "database_properties": 1,
            "superuser_objects": [],
            "skipped_objects": [],
            "seconds": 0.5,
        },
    }
    record = verify_restore_record(
        database="shop",
        backup_id="b",
        recovery_point="rp",
        verified_at="now",
        airflow={"run_id": "r"},
        phases=phases,
        order=ORDER,
        rto_target_seconds=60,
    )
    assert record.verified and record.restore_seconds == 81.0 and record.rto_met is False
    assert record.phases["restore_backup"] == {
        **_phase("00:05", "01:00"),
        "seconds": 55.0,
        "restore_seconds": 50.0,
        "download_seconds": 4.0,
        "roles_created": ["app"],
    }
    assert record.validation == {"expectations": 5, "failed": 0, "report": "r.html"}
    assert "problems" not in record.integrity and record.privileges["grants"] == 2
    assert record.restored_as_superuser is None and "warning" not in record.to_dict()

    failed = verify_restore_record(
        database="shop",
        backup_id="b",
        recovery_point="rp",
        verified_at="now",
        airflow={},
        phases={**phases, "check_integrity": None},
        order=ORDER,
        rto_target_seconds=60,
        superuser_warning="as a superuser",
    )
    assert failed.status == "failed" and failed.failed_phase == "check_integrity"
    assert failed.restore_seconds is None and failed.rto_met is None and failed.integrity is None
    assert failed.to_dict()["restored_as_superuser"] is True and "restore_seconds" not in failed.to_dict()


def test_achieved_rto_is_first_start_to_last_end_and_nothing_when_a_phase_did_not_finish():
    a, b = _phase("00:00", "00:30"), _phase("00:30", "02:00")
    assert achieved_rto([a, b]) == 120.0
    assert achieved_rto([a, b], began_at="2026-12-01T09:59:00+00:00") == 180.0  # e.g. a PITR restore's recovery first
    assert achieved_rto([a, None]) is None and achieved_rto([]) is None
    assert phase_seconds({"a": a, "b": b, "c": None}) == {"a": 30.0, "b": 90.0}


def test_expected_durations_are_medians_of_what_is_known():
    records = [
        VerificationRecord.from_dict({"status": "verified", "backup_id": str(i), "restore_seconds": s})
        for i, s in enumerate([10.0, 30.0, None, 20.0])
    ]
    assert expected_restore_seconds([*records, None]) == 20.0
    assert expected_restore_seconds([]) is None
    pitr = VerificationRecord(
        status="verified",
        backup_id="x",
        kind=PITR_KIND,
        timings={"download": 2.0, "extract": 3.0},
        recovery={"replay_seconds": 5.0},
    )
    assert expected_recovery_seconds([pitr, records[0]]) == 10.0
