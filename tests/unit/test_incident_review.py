"""An incident's timeline, MTTR and data-loss window, computed from a restore's phases: the rules, without a server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pgdr.incident import InvalidRestoreRequest
from pgdr.incident_review import incident_lines, incident_measures, read_incident

TRIGGERED = datetime(2026, 11, 22, 9, 40, tzinfo=UTC)


def _at(minutes: float) -> str:
    """The ISO time ``minutes`` after the trigger."""
    return (TRIGGERED + timedelta(minutes=minutes)).isoformat()


def _phase(start: float, end: float) -> dict:
    return {"started_at": _at(start), "finished_at": _at(end)}


def _plan(mode: str = "new-database", declared: str | None = None, **incident) -> dict:
    return {
        "mode": mode,
        "database": "shop",
        "dbname": "shop",
        "backup_id": "20261122T090000Z-3fa2c1",
        "backup_status": "verified",
        "recovery_point": _at(-40),
        "keep_live_as": "shop_pre_restore_20261122094000" if mode == "replace" else None,
        "incident": {"id": "INC-2041", "declared_at": declared, "triggered_at": TRIGGERED.isoformat(), **incident},
    }


PHASES = {
    "check_checksums": _phase(0.5, 1),
    "restore_backup": _phase(1, 6),
    "check_integrity": _phase(6, 7),
    "validate_data": _phase(7, 8),
    "apply_privileges": _phase(8, 8.5),
    "swap_into_place": _phase(8.5, 9),
}


def _report(status: str, measures: dict, plan: dict, **more) -> dict:
    """An incident report as the restore writes it, with no checks recorded."""
    return {
        "status": status,
        "incident": measures,
        "plan": plan,
        "rto_target_seconds": 3600,
        "triggered_by": "alice",
        "run_id": "manual__1",
        "integrity": None,
        "validation": None,
        "privileges": None,
        **more,
    }


def test_a_replace_declared_ten_minutes_before_the_trigger():
    measures = incident_measures(_plan("replace", declared=_at(-10)), PHASES, "restored", _at(9.5))
    assert measures["declared_at"] == _at(-10) and measures["declared_given"]
    assert measures["time_to_act_seconds"] == 600.0
    assert measures["time_to_restore_seconds"] == 360.0  # triggered -> restore_backup ended
    assert measures["checks_passed_at"] == _at(8.5)
    assert measures["served_at"] == _at(9) and measures["served_by"] == "the swap"
    assert measures["time_to_serve_seconds"] == 180.0
    assert measures["mttr_seconds"] == 1140.0  # 10 + 9 minutes
    # From the backup's recovery point (40 minutes before the trigger) to the declared failure (10 minutes before).
    assert (
        measures["data_loss_window_seconds"] == 1800.0 and measures["data_loss_until_source"] == "the declared failure"
    )


def test_a_new_database_restore_is_served_at_its_hand_over_and_counts_from_the_trigger():
    measures = incident_measures(_plan(), PHASES, "restored", _at(9.5))
    assert measures["declared_at"] == TRIGGERED.isoformat() and not measures["declared_given"]
    assert measures["time_to_act_seconds"] == 0.0
    assert measures["served_at"] == _at(9.5) and measures["served_by"] == "the hand-over of the checked copy"
    assert measures["mttr_seconds"] == 570.0
    assert measures["data_loss_window_seconds"] == 2400.0
    assert measures["data_loss_until_source"] == "the trigger (no failure time was given)"


def test_without_a_declared_time_the_live_servers_newest_commit_ends_the_data_loss_window():
    measures = incident_measures(_plan(live_newest_commit=_at(-5)), PHASES, "restored", _at(9.5))
    assert measures["data_loss_until"] == _at(-5) and measures["data_loss_window_seconds"] == 2100.0
    assert measures["data_loss_until_source"] == "the live server's newest commit"


def test_a_point_in_time_restore_starts_with_its_recovery_and_a_later_recovery_point_lost_nothing():
    plan = {**_plan(declared=_at(-10)), "recovery_point": _at(-3), "pitr": {"started_at": _at(0.2)}}
    measures = incident_measures(plan, PHASES, "restored", _at(9.5))
    assert measures["restore_started_at"] == _at(0.2)
    assert measures["data_loss_window_seconds"] == 0.0  # the archive held every transaction up to the failure


def test_a_failed_restore_has_a_timeline_up_to_its_failure_and_no_mttr():
    phases = {**PHASES, "check_integrity": None, "validate_data": None, "apply_privileges": None}
    plan = _plan("replace", declared=_at(-10))
    measures = incident_measures(plan, {**phases, "swap_into_place": None}, "failed", _at(7))
    assert measures["restored_at"] == _at(6) and measures["checks_passed_at"] is None
    assert measures["served_at"] is None and measures["mttr_seconds"] is None
    assert measures["data_loss_window_seconds"] == 1800.0
    text = "\n".join(incident_lines(_report("failed", measures, plan)))
    assert "| served again (not reached) | not reached |" in text
    assert "**MTTR** (declared to served): n/a\n" in text
    assert "kept as `shop_pre_restore_20261122094000`" in text and "- [ ] Root cause" in text
    assert "data validation did not run" in text


def test_names_from_the_backup_cannot_forge_a_line_of_a_report():
    """Role, tablespace and extension names come from the dump (any name PostgreSQL accepts, a newline too): the
    incident and drill reports show them escaped, on their own line."""
    from pgdr.drill import restored_lines
    from pgdr.incident import privileges_lines

    forged = "evil\n- [x] Root cause found"
    names = {"roles_created": [forged], "tablespaces_left_out": [forged], "extensions_created": [forged]}
    measures = incident_measures(_plan(), PHASES, "restored", _at(9.5))
    report = _report("restored", measures, {**_plan(), "restore_role_passwords": False}, **names)
    for lines in (incident_lines(report), privileges_lines(report), restored_lines({"restored": names})):
        text = "\n".join(lines)
        assert "\n- [x] Root cause found" not in text and text.count("evil\\x0a- [x] Root cause found") >= 1
    assert len(restored_lines({"restored": names})) == 3 and restored_lines({}) == []


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"incident_declared_at": "last night"}, "incident_declared_at must be a UTC time such as"),
        ({"incident_declared_at": "2026-11-22T09:43:00Z"}, "is after this restore was triggered"),
        ({"incident_id": "INC-1\nDROP"}, "must be printable"),
        ({"incident_id": "x" * 121}, "at most 120 characters"),
    ],
    ids=["not-a-time", "after-the-trigger", "control-character", "too-long"],
)
def test_a_bad_incident_field_is_refused_saying_what_to_give(params, message):
    with pytest.raises(InvalidRestoreRequest, match="Nothing was touched") as err:
        read_incident(params, TRIGGERED)
    assert message in str(err.value)


def test_incident_fields_are_optional_and_a_clock_a_minute_ahead_is_accepted():
    assert read_incident({"incident_id": "  ", "incident_declared_at": ""}, TRIGGERED) == {
        "id": None,
        "declared_at": None,
        "triggered_at": TRIGGERED.isoformat(),
    }
    given = read_incident({"incident_id": "INC-2041", "incident_declared_at": "2026-11-22 09:41:00"}, TRIGGERED)
    assert given["id"] == "INC-2041" and given["declared_at"] == "2026-11-22T09:41:00+00:00"
    local = read_incident({"incident_declared_at": "2026-11-22T10:30:00+01:00"}, TRIGGERED)
    assert local["declared_at"] == "2026-11-22T09:30:00+00:00"  # in UTC, as every time in the report


def _record(incident_id: str, declared: datetime, **more) -> dict:
    from pgdr.incident_review import incident_record

    measures = {"id": incident_id, "declared_at": declared.isoformat(), "mttr_seconds": 900.0, **more}
    return incident_record("database restore", "shop", f"manual__{incident_id}", "restored", measures, 3600.0)


def test_incident_records_outlive_the_backups_and_a_forged_one_is_skipped_not_a_crash(tmp_path, caplog):
    import json

    from pgdr.incident_review import incident_records, store_incident_record
    from pgdr.storage.backends import LocalFolderStore
    from pgdr.storage.layout import BackupLayout

    store, layout = LocalFolderStore(tmp_path), BackupLayout()
    now = datetime(2026, 12, 5, tzinfo=UTC)
    key = store_incident_record(store, layout, _record("INC-1", now - timedelta(days=2)))
    assert key.startswith("v1/reports/incidents/20261203T000000Z-")  # not under a backup: retention never sees it
    store_incident_record(store, layout, _record("INC-0", now - timedelta(days=400)))
    forged = {
        "not-json": b"{",
        "a-list": b"[1, 2]",
        "mttr-text": json.dumps({**_record("X", now), "mttr_seconds": "fast"}).encode(),
        "mttr-bool": json.dumps({**_record("X", now), "mttr_seconds": True}).encode(),
        "no-time": json.dumps({**_record("X", now), "declared_at": "soon"}).encode(),
        "subject-list": json.dumps({**_record("X", now), "subject": ["shop"]}).encode(),
    }
    for name, body in forged.items():
        store.put_bytes(layout.incident_key("20261204T000000Z", name), body)
    found = incident_records(store, layout, now - timedelta(days=365))
    assert [r["id"] for r in found] == ["INC-1"]
    assert sum("is not one pgdr wrote" in m for m in caplog.messages) == len(forged)


def test_an_incident_record_that_cannot_be_stored_never_fails_the_restore(tmp_path, caplog):
    from pgdr.incident_review import store_incident_record
    from pgdr.storage.layout import BackupLayout

    class Unreachable:
        def put_bytes(self, key, data):
            raise OSError("connection refused")

    assert store_incident_record(Unreachable(), BackupLayout(), _record("INC-2", TRIGGERED)) is None
    assert any("could not be stored" in m and "connection refused" in m for m in caplog.messages)
    assert (
        store_incident_record(Unreachable(), BackupLayout(), {**_record("INC-2", TRIGGERED), "declared_at": None})
        is None
    )


def test_the_drill_report_shows_the_mttr_trend_of_incidents_and_drills_and_hostile_names_stay_text():
    from pgdr.drill import mttr_rows, render_markdown, trend_chart

    rto = {"achieved_s": 240.0, "target_s": 3600.0, "met": True}
    drill = {
        "drill_id": "20261101T020000Z-abc123",
        "started_at": "2026-11-01T02:00:00+00:00",
        "databases": [{"database": "shop", "status": "pass", "checks": {"rto": rto, "rpo_newest_verified": rto}}],
    }
    incidents = [
        {**_record("INC-$x$\x07", TRIGGERED), "subject": "shop $\\frac{1}{0}$", "data_loss_window_seconds": 60.0},
        {**_record("INC-2", TRIGGERED + timedelta(days=1)), "mttr_seconds": None, "status": "failed"},
    ]
    rows = mttr_rows([drill], incidents)
    assert [r["what"] for r in rows] == ["drill 20261101T020000Z-abc123", "incident INC-$x$\\x07", "incident INC-2"]
    png = trend_chart([drill], rows)  # a name with matplotlib's math signs is drawn as text, not parsed
    assert png.startswith(b"\x89PNG")
    report = {
        "drill_id": drill["drill_id"],
        "status": "pass",
        "started_at": drill["started_at"],
        "scenario": "primary-target-lost",
        "run_id": "r",
        "databases": [],
        "mttr_trend": rows,
    }
    text = render_markdown(report)
    assert "2 incidents, MTTR median 15m 00s, worst 15m 00s; 1 drill restore, RTO median 4m 00s" in text
    assert "| incident INC-2: database restore, failed | shop | n/a | 1h 00m | n/a |" in text
