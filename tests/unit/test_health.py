"""The archiver and WAL-lag checks read one ArchiverState and say what to do."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pgdr.health import archiver_check, wal_lag
from pgdr.physical.archive import ArchiverState

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
SEGMENT = 16 * 1024 * 1024


def _state(archived_at=NOW - timedelta(seconds=30), failed_at=None, failed=0):
    return ArchiverState(10, "00000001000000000000000A", archived_at, failed, "00000001000000000000000B", failed_at)


def test_an_archiver_that_failed_after_its_last_success_is_failing():
    failing = archiver_check(_state(failed_at=NOW, failed=3), "on", "main")
    assert not failing.ok and "is failing: 3 failed attempts" in failing.detail and failing.value == 3.0
    recovered = archiver_check(_state(failed_at=NOW - timedelta(hours=1), failed=3), "on", "main")
    assert recovered.ok and _state(failed_at=NOW - timedelta(hours=1)).new_failures(_state()) == 0
    off = archiver_check(_state(), "off", "main")
    assert not off.ok and "archive_mode = off" in off.detail


def test_the_wal_lag_counts_bytes_past_the_newest_archived_segment_and_time_since_it():
    end_of_a = 0x0B * SEGMENT  # segment ...0A ends where ...0B begins
    lag_bytes, check = wal_lag(_state(), f"0/{end_of_a + 4096:X}", SEGMENT, NOW, "main", timedelta(minutes=5))
    assert lag_bytes == 4096 and check.ok and check.value == 30.0
    _, late = wal_lag(_state(), f"0/{end_of_a + 4096:X}", SEGMENT, NOW, "main", timedelta(seconds=10))
    assert not late.ok and "more than its RPO" in late.detail
    _, idle = wal_lag(_state(), f"0/{end_of_a:X}", SEGMENT, NOW, "main", timedelta(seconds=10))
    assert idle.ok and idle.value == 0.0  # nothing unarchived: no lag, however old the last segment
    _, never = wal_lag(_state(archived_at=None), "0/1000", SEGMENT, NOW, "main", timedelta(minutes=5))
    assert not never.ok and "never written" in never.detail and never.value is None
