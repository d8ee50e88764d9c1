"""Which backups an asset-triggered verify-restore run takes (pure: the catalogs are given)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from pgdr.records import VerificationRecord
from pgdr.verification import events_airflow_dropped, not_yet_verified

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def _entry(backup_id: str, age: timedelta, status: str = "unverified", run_id: str | None = None):
    record = VerificationRecord(status, backup_id, airflow={"run_id": run_id}) if status != "unverified" else None
    return SimpleNamespace(backup_id=backup_id, recovery_point=NOW - age, status=status, verification=record)


def test_event_named_backups_verified_by_an_earlier_run_are_left_out():
    listed = {"shop": [_entry("a", timedelta(hours=1), "verified", "r1"), _entry("b", timedelta(minutes=5))]}
    named = [{"database": "shop", "backup_id": b} for b in ("a", "b", "gone")]
    assert [t["backup_id"] for t in not_yet_verified(named, listed)] == ["b", "gone"]


def test_backups_whose_events_airflow_dropped_are_caught_up_newer_than_the_newest_verified_only():
    plan = SimpleNamespace(databases=[SimpleNamespace(name="shop")])
    listed = {
        "shop": [
            _entry("old", timedelta(days=2)),
            _entry("before", timedelta(hours=3)),
            _entry("checked", timedelta(hours=2), "failed"),
            _entry("late", timedelta(minutes=5)),
            _entry("named", timedelta(minutes=4)),
        ]
    }
    found = events_airflow_dropped(plan, [{"database": "shop", "backup_id": "named"}], listed, now=NOW)
    assert found == [{"database": "shop", "backup_id": "late"}]
