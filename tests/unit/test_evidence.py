"""The evidence log (#30): receipts chained by SHA-256 and signed with HMAC; an edited byte, a deleted receipt, two
swapped, a forged one, and a record changed after its receipt are each found and named; appends from many threads
at once leave one gapless chain."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta

import pytest
from pgdr.evidence import GENESIS, EvidenceBroken, EvidenceLog
from pgdr.storage.backends import LocalFolderStore
from pgdr.storage.encryption import MasterKeys
from support import append_at_once

KEYS = MasterKeys(current="ev-1", keys={"ev-1": os.urandom(32)}, source="Airflow connection 'pgdr_evidence_key'")


def _log(tmp_path, keys: MasterKeys = KEYS, clock=None) -> EvidenceLog:
    return EvidenceLog(LocalFolderStore(tmp_path / "store"), "acme", keys, clock)


def _month(log: EvidenceLog) -> None:
    """Five receipts: two backups, a verification of each (one failed), a restore."""
    log.append("backup_taken", "schedule", {"database": "shop", "backup_id": "b1"}, "ok", {"rows": 10})
    log.append("backup_verified", "asset event", {"database": "shop", "backup_id": "b1"}, "ok")
    log.append("backup_taken", "schedule", {"database": "shop", "backup_id": "b2"}, "ok", {"rows": 11})
    log.append("backup_verification_failed", "asset event", {"database": "shop", "backup_id": "b2"}, "failed")
    log.append("restore_finished", "Airflow user alice", {"database": "shop", "backup_id": "b1"}, "ok")


def _path(log: EvidenceLog, seq: int):
    return log.store.root / log.key(seq)


def test_a_month_of_receipts_verifies_and_each_holds_what_an_auditor_checks(tmp_path):
    log = _log(tmp_path)
    _month(log)
    report = log.verify()
    assert report.ok and report.checked == 5 and (report.first_seq, report.last_seq) == (1, 5), report.problems
    assert "5 checked (receipts 1 to 5)" in report.summary()
    receipts = log.receipts()
    assert [r.body["event"] for r in receipts] == [
        "backup_taken",
        "backup_verified",
        "backup_taken",
        "backup_verification_failed",
        "restore_finished",
    ]
    first, second = receipts[0], receipts[1]
    assert first.body["prev"] == GENESIS and second.body["prev"] == first.digest
    assert first.body["actor"] == "schedule" and receipts[4].body["actor"] == "Airflow user alice"
    assert first.body["key_id"] == "ev-1" and len(first.body["signature"]) == 64
    assert json.loads(first.data) == first.body  # stored as the JSON it is checked as


def test_an_edited_byte_a_deleted_receipt_and_two_swapped_are_each_named(tmp_path):
    log = _log(tmp_path)
    _month(log)

    receipt = _path(log, 3)
    original = receipt.read_bytes()
    receipt.write_bytes(original.replace(b'"rows":11', b'"rows":99'))
    report = log.verify()
    assert not report.ok
    assert any("receipt 3" in p and "fails its signature" in p for p in report.problems), report.problems
    assert any("receipt 4" in p and "does not follow receipt 3" in p for p in report.problems), report.problems
    assert report.summary().startswith("the evidence chain is broken: receipt 3")
    receipt.write_bytes(original)
    assert log.verify().ok

    gone = _path(log, 2).read_bytes()
    _path(log, 2).unlink()
    report = log.verify()
    assert [p for p in report.problems if "missing" in p] and "receipt 2 is missing" in report.problems[0]
    _path(log, 2).write_bytes(gone)

    two, three = _path(log, 2).read_bytes(), _path(log, 3).read_bytes()
    _path(log, 2).write_bytes(three)
    _path(log, 3).write_bytes(two)
    report = log.verify()
    assert any("receipt 2" in p and "says it is receipt 3" in p for p in report.problems), report.problems
    assert any("receipt 3" in p and "says it is receipt 2" in p for p in report.problems), report.problems


def test_a_receipt_forged_without_the_key_or_replacing_the_first_ones_is_named(tmp_path):
    log = _log(tmp_path)
    _month(log)
    thief = MasterKeys(current="ev-1", keys={"ev-1": os.urandom(32)}, source="a guess")
    forged = _log(tmp_path, thief)
    forged.append("backup_verified", "schedule", {"database": "shop", "backup_id": "b2"}, "ok")
    report = log.verify()
    assert report.problems == [
        f"receipt 6 ({log.store.describe(log.key(6))}) fails its signature: its content was changed after it was "
        "written"
    ]

    # Receipts 1 and 2 deleted, and the chain renumbered from 3 on, would need every receipt signed again; deleted
    # without renumbering, they are a gap.
    _path(log, 1).unlink()
    assert "receipt 1 is missing" in log.verify().problems[0]


def test_a_rotated_key_still_verifies_older_receipts_and_an_unknown_key_is_named(tmp_path):
    log = _log(tmp_path)
    _month(log)
    rotated = MasterKeys(current="ev-2", keys={"ev-2": os.urandom(32), "ev-1": KEYS.keys["ev-1"]}, source="conn")
    after = _log(tmp_path, rotated)
    after.append("backup_taken", "schedule", {"database": "shop", "backup_id": "b3"}, "ok")
    assert after.verify().ok and after.receipts()[-1].body["key_id"] == "ev-2"
    lost = MasterKeys(current="ev-2", keys={"ev-2": rotated.keys["ev-2"]}, source="Airflow connection 'k'")
    problems = _log(tmp_path, lost).verify().problems
    assert (
        len(problems) == 5 and "signed with key 'ev-1', which the Airflow connection 'k' does not hold" in problems[0]
    )


def test_a_record_changed_after_its_receipt_is_named_and_a_record_deleted_by_retention_is_not(tmp_path):
    log = _log(tmp_path)
    store = log.store
    store.put_bytes("acme/v1/shop/b1/verification.json", b'{"status": "verified"}')
    store.put_bytes("acme/v1/shop/b2/verification.json", b'{"status": "verified"}')
    for backup_id in ("b1", "b2"):
        key = f"acme/v1/shop/{backup_id}/verification.json"
        record = ("local", key, store.get_bytes(key))
        log.append("backup_verified", "schedule", {"database": "shop", "backup_id": backup_id}, "ok", record=record)
    assert log.verify(open_target={"local": store}.__getitem__).ok

    store.put_bytes("acme/v1/shop/b1/verification.json", b'{"status": "failed"}')  # edited afterwards
    store.delete(["acme/v1/shop/b2/verification.json"])  # retention: its receipt is what remains
    report = log.verify(open_target={"local": store}.__getitem__)
    assert report.problems == [] and len(report.record_mismatches) == 1, report.record_mismatches
    assert "receipt 1 (backup_verified at" in report.record_mismatches[0]
    assert "that record was changed after the receipt was written" in report.record_mismatches[0]
    # outside the dates asked for, records are not read
    later = datetime.now(UTC) + timedelta(days=1)
    assert log.verify(since=later, open_target={"local": store}.__getitem__).ok
    # a target no longer in the plan
    report = log.verify(open_target={}.__getitem__)
    assert "points to a record pgdr cannot read" in report.record_mismatches[0]


def test_a_stale_or_hostile_head_hint_neither_breaks_nor_forks_the_chain(tmp_path):
    log = _log(tmp_path)
    _month(log)
    for hint in (b'{"seq": 2}', b'{"seq": 900}', b"not json", b'{"seq": -4}'):
        log.store.put_bytes(log.head_key, hint)
        log.append("backup_taken", "schedule", {"database": "shop", "backup_id": "x"}, "ok")
    report = log.verify()
    assert report.ok and report.last_seq == 9, report.problems


def test_unknown_events_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown evidence event"):
        _log(tmp_path).append("backup_deleted_quietly", "schedule", {}, "ok")


@pytest.mark.parametrize("round_", range(3))
def test_appends_from_many_threads_at_once_make_one_gapless_chain(tmp_path, round_):
    """Eight writers, twenty receipts each, all at once (the fleet's tasks finishing together): every receipt is
    written once, numbered 1..160 with no gap and no fork, and the chain verifies."""
    log = _log(tmp_path)
    assert append_at_once(lambda: _log(tmp_path), writers=8, receipts=20) == []
    report = log.verify()
    assert report.ok and report.checked == 160, report.problems
    written = {(r.body["subject"]["database"], r.body["subject"]["backup_id"]) for r in log.receipts()}
    assert len(written) == 160


def test_an_incremental_check_starts_after_the_receipt_checked_before(tmp_path):
    log = _log(tmp_path)
    _month(log)
    full = log.verify()
    after = (full.last_seq, full.last_digest)
    assert full.last_seq == 5 and full.last_digest == log.receipts()[-1].digest
    nothing_new = log.verify(after=after)
    assert nothing_new.ok and nothing_new.checked == 0 and "none new after receipt 5" in nothing_new.summary()
    log.append("backup_taken", "schedule", {"database": "shop", "backup_id": "b3"}, "ok")
    one = log.verify(after=after)
    assert one.ok and one.checked == 1 and one.last_seq == 6
    assert not log.verify(after=(5, "0" * 64)).ok  # receipt 6 does not follow what was checked as receipt 5
    _path(log, 6).unlink()
    _path(log, 5).unlink()
    gone = log.verify(after=(6, one.last_digest))
    assert "receipt 6 was checked before and is no longer there" in gone.problems[0]


def test_a_hostile_receipt_is_reported_not_a_crash(tmp_path):
    """A receipt written by someone else (not JSON, a list, a key id that is not a string) is a problem named."""
    log = _log(tmp_path)
    _month(log)
    _path(log, 2).write_bytes(b"[1, 2]")
    _path(log, 3).write_bytes(b"\xff not json")
    body = json.loads(_path(log, 4).read_bytes())
    _path(log, 4).write_bytes(json.dumps({**body, "key_id": ["ev-1"]}).encode())
    problems = log.verify().problems
    assert any("receipt 2" in p and "is not a JSON receipt" in p for p in problems), problems
    assert any("receipt 3" in p and "is not a JSON receipt" in p for p in problems), problems
    assert any("receipt 4" in p and "signed with key ['ev-1']" in p for p in problems), problems


class _Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _aged_log(tmp_path, days: int = 500) -> tuple[EvidenceLog, _Clock]:
    """One receipt a day for ``days`` days, the newest today."""
    today = datetime(2026, 12, 5, tzinfo=UTC)
    clock = _Clock(today - timedelta(days=days - 1))
    log = _log(tmp_path, clock=clock)
    for day in range(days):
        clock.now = today - timedelta(days=days - 1 - day)
        log.append("backup_taken", "schedule", {"database": "shop", "backup_id": f"b{day + 1}"}, "ok")
    return log, clock


def test_pruning_by_keep_deletes_the_oldest_behind_a_signed_anchor_and_the_chain_still_verifies(tmp_path):
    log, clock = _aged_log(tmp_path)
    done = log.prune(timedelta(days=400))
    # Written 499 .. 0 days ago: the 99 written more than 400 days ago go.
    assert done["deleted"] == 99 and done["pruned"] == [1, 99] and done["first_kept"] == 100, done
    assert not _path(log, 99).exists() and _path(log, 100).exists()
    report = log.verify()
    assert report.ok and report.checked == 401 and report.first_kept == 100, report.problems
    assert "those before 100 pruned by evidence.keep (signed anchor)" in report.summary()
    assert log.prune(timedelta(days=400))["deleted"] == 0  # nothing more is old enough
    # The chain goes on; a later prune moves the anchor on; an incremental check from before it still works.
    cursor = (report.last_seq, report.last_digest)
    clock.now += timedelta(days=30)
    log.append("drill_run", "schedule", {"drill": "d"}, "ok")
    assert log.prune(timedelta(days=400))["pruned"] == [100, 129]
    assert log.verify(after=cursor).ok and log.verify(after=(50, "f" * 64)).ok  # (50: pruned since it was checked)
    assert log.verify().ok and log.verify().first_kept == 130
    # Even a receipt older than keep stays when it is the newest: the chain continues from it.
    log2, _ = _aged_log(tmp_path / "two", days=1)
    assert log2.prune(timedelta(days=0), datetime(2030, 1, 1, tzinfo=UTC))["deleted"] == 0


def test_a_removed_forged_or_replayed_anchor_and_an_edit_after_it_are_named(tmp_path):
    log, _ = _aged_log(tmp_path, days=10)
    log.prune(timedelta(days=7))  # receipts 1, 2 go (9 and 8 days old)
    old_anchor = log.store.get_bytes(log.anchor_key)
    log.prune(timedelta(days=5))  # then 3, 4
    assert log.verify().ok and log.verify().first_kept == 5
    anchor = log.store.get_bytes(log.anchor_key)

    log.store.delete([log.anchor_key])  # removed: the pruned receipts are gaps
    assert "receipt 1 is missing" in log.verify().problems[0]
    log.store.put_bytes(log.anchor_key, old_anchor)  # an older anchor put back: receipts 3 and 4 are gaps
    assert "receipt 3 is missing" in log.verify().problems[0]
    forged = json.loads(anchor)
    forged["first_seq"] = 7  # hiding receipts 5 and 6 would need the key
    log.store.put_bytes(log.anchor_key, json.dumps(forged).encode())
    problems = log.verify().problems
    assert "the anchor of the pruned chain" in problems[0] and "fails its signature" in problems[0], problems
    log.store.put_bytes(log.anchor_key, b"[]")
    assert "is not a JSON anchor" in log.verify().problems[0]
    log.store.put_bytes(log.anchor_key, anchor)
    assert log.verify().ok

    # The first receipt kept, edited: named; and pruning refuses to delete anything while the chain is broken.
    original = _path(log, 5).read_bytes()
    _path(log, 5).write_bytes(original.replace(b'"b5"', b'"b0"'))
    assert "receipt 5" in log.verify().problems[0]
    with pytest.raises(EvidenceBroken, match="Not pruning the evidence log .* Nothing was deleted"):
        log.prune(timedelta(days=0))
    assert all(_path(log, seq).exists() for seq in range(5, 11))


def test_receipts_under_object_lock_wait_and_so_do_the_ones_after_them(tmp_path):
    log, _ = _aged_log(tmp_path, days=10)

    class Locked(LocalFolderStore):
        def held(self, keys, now):  # receipt 3 written under a lock that has not ended
            return {k: now + timedelta(days=3) for k in keys if k.endswith("000000000003.json")}

    locked = EvidenceLog(Locked(log.store.root), "acme", KEYS, log.clock)
    done = locked.prune(timedelta(days=2))
    assert done["pruned"] == [1, 2] and done["held_until"] is not None, done
    assert _path(log, 3).exists() and _path(log, 4).exists() and locked.verify().ok
