"""The rules of a whole-server recovery that need no server: the data directory's state, --delta's sync, the
system identifier of a WAL segment and the check that keeps two clusters apart."""

from __future__ import annotations

import os
import struct
from types import SimpleNamespace

import pytest


def test_a_non_empty_data_directory_is_refused_without_delta(tmp_path):
    from pgdr.physical.server_recovery import ServerRecoveryRefused, check_data_directory

    assert check_data_directory(tmp_path / "new", delta=False) == "missing"
    (tmp_path / "empty").mkdir()
    assert check_data_directory(tmp_path / "empty", delta=False) == "empty"
    (tmp_path / "empty" / "PG_VERSION").write_text("18\n")
    with pytest.raises(ServerRecoveryRefused, match="is not empty.*--delta.*Nothing was changed"):
        check_data_directory(tmp_path / "empty", delta=False)
    assert check_data_directory(tmp_path / "empty", delta=True) == "not empty"


def test_a_data_directory_a_server_runs_on_is_refused_even_with_delta(tmp_path):
    from pgdr.physical.server_recovery import ServerRecoveryRefused, check_data_directory, running_postmaster

    (tmp_path / "postmaster.pid").write_text(f"{os.getpid()}\n{tmp_path}\n")
    assert running_postmaster(tmp_path) == os.getpid()
    with pytest.raises(ServerRecoveryRefused, match=f"pid {os.getpid()}.*is running on"):
        check_data_directory(tmp_path, delta=True)
    (tmp_path / "postmaster.pid").write_text("999999999\n")  # a stale file: no such process
    assert running_postmaster(tmp_path) is None


def test_delta_keeps_equal_files_replaces_changed_ones_and_removes_strays(tmp_path):
    from pgdr.physical.server_recovery import sync_delta

    source, target = tmp_path / "backup", tmp_path / "data"
    for root in (source, target):
        (root / "base" / "5").mkdir(parents=True)
    (source / "PG_VERSION").write_text("18\n")
    (target / "PG_VERSION").write_text("18\n")
    (source / "base" / "5" / "1259").write_bytes(b"a" * 100)
    (target / "base" / "5" / "1259").write_bytes(b"b" * 100)  # same size, other bytes
    (source / "global").mkdir()
    (source / "global" / "pg_control").write_bytes(b"c" * 10)  # missing in the target
    (target / "base" / "5" / "stray").write_text("x")
    (target / "old dir").mkdir()
    counts = sync_delta(source, target)
    assert counts == {"kept": 1, "replaced": 2, "removed": 2}
    assert (target / "base" / "5" / "1259").read_bytes() == b"a" * 100
    assert (target / "global" / "pg_control").read_bytes() == b"c" * 10
    assert not (target / "base" / "5" / "stray").exists() and not (target / "old dir").exists()
    assert not (source / "global" / "pg_control").exists()  # moved in (a rename), not copied: no double space


def _segment(path, sysid: int, long_header: bool = True):
    info = 0x0002 if long_header else 0
    header = struct.pack("<HHIQI4xQII", 0xD118, info, 1, 0, 0, sysid, 16 << 20, 8192)
    path.write_bytes(header + b"\0" * 100)
    return path


def test_the_system_identifier_is_read_from_a_segments_long_header(tmp_path):
    from pgdr.physical.archive import segment_system_identifier

    assert segment_system_identifier(_segment(tmp_path / "a", 7715013712044487469)) == "7715013712044487469"
    assert segment_system_identifier(_segment(tmp_path / "b", 1, long_header=False)) is None
    (tmp_path / "c").write_bytes(b"short")
    assert segment_system_identifier(tmp_path / "c") is None


def test_an_archive_of_another_cluster_is_refused_naming_both(tmp_path):
    from pgdr.physical.recovery import ArchiveOfAnotherCluster, check_same_cluster

    newest = SimpleNamespace(
        backup_id="20261203T095336Z-1295cb", record=SimpleNamespace(system_identifier="111", server="main")
    )
    segment = SimpleNamespace(name="000000010000000000000009")
    archive = SimpleNamespace(describe=lambda: "s3://bucket/prefix/pitr-v1/wal/main")
    check_same_cluster(segment, "111", newest, archive)
    check_same_cluster(segment, None, newest, archive)
    with pytest.raises(ArchiveOfAnotherCluster, match="system identifier 222.*by 111.*own name"):
        check_same_cluster(segment, "222", newest, archive)


def test_a_base_backup_of_a_rebuilt_server_is_refused():
    from pgdr.physical.basebackup import ForeignCluster, check_same_cluster

    newest = SimpleNamespace(backup_id="b1", record=SimpleNamespace(system_identifier="111"))
    check_same_cluster(SimpleNamespace(system_identifier="111"), newest, "main", "s3://b/p")
    check_same_cluster(SimpleNamespace(system_identifier="222"), None, "main", "s3://b/p")  # the first ever
    with pytest.raises(ForeignCluster, match="another cluster .system identifier 222"):
        check_same_cluster(SimpleNamespace(system_identifier="222"), newest, "main", "s3://b/p")


def test_the_pause_needs_a_moment(tmp_path):
    from pgdr.physical.server_recovery import ServerRecoveryRefused, plan_server_recovery

    with pytest.raises(ServerRecoveryRefused, match="--pause needs a moment"):
        plan_server_recovery(SimpleNamespace(name="main"), None, None, tmp_path / "d", tmp_path, pause=True)


def test_a_disk_too_small_for_the_chain_and_its_wal_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from pgdr.physical import recovery
    from pgdr.physical.server_recovery import ServerRecoveryRefused, plan_server_recovery

    pitr = {"chain_disk_bytes": 2_000_000_000, "wal_bytes": 500_000_000}
    monkeypatch.setattr(recovery, "plan_point_in_time", lambda *args: pitr)
    asked = []
    monkeypatch.setattr(recovery, "free_bytes", lambda path: asked.append(path) or 1_500_000_000)
    res = SimpleNamespace(archive=lambda server, source: (None, None, SimpleNamespace(describe=lambda: "s3://b/p")))
    data_dir = tmp_path / "new" / "data"
    with pytest.raises(ServerRecoveryRefused) as refused:
        plan_server_recovery(SimpleNamespace(name="main"), res, None, data_dir, tmp_path / "work")
    needed = (2_000_000_000 + recovery.WAL_HEADROOM + 500_000_000) / 1e9
    assert asked == [tmp_path]  # the nearest folder that exists: the data directory is not made to ask
    assert str(refused.value).startswith(
        f"{tmp_path} has 1.5 GB free; recovering server 'main' needs about {needed:.1f}"
    )
    assert "choose another --data-dir. Nothing was changed." in str(refused.value)
    assert not (tmp_path / "new").exists()


def test_a_window_never_spans_two_clusters():
    from pgdr.physical.recovery import of_newest_cluster

    def entry(backup_id, identifier):
        return SimpleNamespace(backup_id=backup_id, record=SimpleNamespace(system_identifier=identifier))

    backups = [entry("old-1", "111"), entry("new-1", "222"), entry("old-2", "111"), entry("new-2", "222")]
    assert [e.backup_id for e in of_newest_cluster(backups)] == ["new-1", "new-2"]
    assert of_newest_cluster([]) == []


def _server_plan(**overrides):
    plan = {
        "server": "main",
        "system_identifier": "7715013712044487469",
        "pg_version": 180006,
        "target": "latest",
        "end_of_archive": "2026-12-03T09:53:38+00:00",
        "end_of_archive_behind_seconds": 11.1,
        "chain": ["20261203T095336Z-1295cb"],
        "base_backup_bytes": 11_700_000,
        "base_backup_ended": "2026-12-03T09:53:36+00:00",
        "wal_segments": 2,
        "wal_bytes": 33_554_432,
        "window": {"oldest": "2026-12-03T09:53:36+00:00", "newest": "2026-12-03T09:53:38+00:00"},
        "expected_recovery": "unknown (no PITR verification yet)",
        "data_dir": "/var/lib/postgresql/18/main",
        "host": "db-new",
        "data_dir_state": "missing",
        "delta": False,
        "disk_needed_bytes": 1_170_000_000,
        "disk_free_bytes": 76_500_000_000,
        "proof": "quick",
    }
    return {**plan, **overrides}


def test_the_server_plan_says_what_an_on_call_engineer_needs():
    from pgdr.physical.server_recovery import render_server_plan

    text = render_server_plan(_server_plan())
    assert "the end of the archive (latest)" in text and "11.1s ago" in text
    assert "up to 2 segments (34 MB)" in text and "1.17 GB needed, 76.5 GB free" in text
    assert "/var/lib/postgresql/18/main on db-new (missing)" in text and "never contacted" in text
    assert "proof           : quick: pg_amcheck of every table and B-tree index page" in text
    assert "(--proof thorough adds every row looked up in every index)" in text
    assert "--proof thorough adds" not in render_server_plan(_server_plan(proof="thorough"))
    delta = render_server_plan(_server_plan(target="2026-12-03T09:53:37+00:00", delta=True, data_dir_state="not empty"))
    assert "2026-12-03T09:53:37+00:00 UTC" in delta and "--delta: only differing files replaced" in delta


def test_the_server_report_names_the_recovery_point_the_loss_and_the_next_steps():
    from pathlib import Path

    from pgdr.physical.server_recovery import next_steps, render_server_report

    report = {
        "server": "main",
        "status": "recovered and promoted",
        "triggered_by": "the command line",
        "host": "db-new",
        "os_user": "postgres",
        "data_dir": "/srv/pg",
        "port": 5432,
        "target": "2026-12-03T09:53:37+00:00",
        "achieved_recovery_point": "2026-12-03T09:53:36.9+00:00",
        "declared_at": "2026-12-03T10:00:00+00:00",
        "data_loss_window_seconds": 383.1,
        "achieved_rto_seconds": 95.0,
        "plan": _server_plan(),
        "recovery": {"wal_bytes_replayed": 20_000_000},
        "phase_seconds": {"plan": 0.3, "replay": 3.9},
        "proof": {
            "heartbeats_at_or_before_target": 4,
            "newest_heartbeat": "2026-12-03T09:53:36+00:00",
            "databases_found": ["app", "postgres"],
            "databases": {
                "app": {
                    "tables": 1,
                    "rows": 2,
                    "integrity": {"ok": True},
                    "validation": {"expectations": 3, "failed": 0},
                    "checked_as": "pgdr_scratch_reader",
                }
            },
        },
        "delta": None,
        "settings_added": {"archive_mode": "off", "port": "5432"},
        "next_steps": next_steps(False, Path("/srv/pg"), "main"),
    }
    text = render_server_report(report)
    assert text.startswith("# Recovery of server `main`: RECOVERED AND PROMOTED")
    assert "data-loss window 6m 23s" in text and "Achieved RTO (declared to handed over): 1m 35s" in text
    assert "`app`: 1 tables, 2 rows; pg_amcheck and sequences passed; expectations: 3 of 3 passed" in text
    assert "- Proof: thorough: " in text  # a report stored before proofs had levels was proven thoroughly
    report["proof"]["level"] = "quick"
    report["proof"]["databases"]["app"]["validation"] = {"expectations": 0, "failed": 0}
    quick = render_server_report(report)
    assert "- Proof: quick: pg_amcheck of every table" in quick and "expectations: no suite in the plan" in quick
    assert "`archive_mode = off`" in text and "NEW prefix" in text and "main-2" in text
    paused = next_steps(True, Path("/srv/pg"), "main")
    assert paused[0].startswith("Look at the data") and "pg_ctl -D /srv/pg promote" in paused[0]


def _form_plan(restore=True, pitr=True):
    target = SimpleNamespace(queue="pgdr-db-new", data_dir="/srv/pg", port=5432, os_user=None) if restore else None
    server = SimpleNamespace(name="main", databases=("app", "ledger"), restore=target)
    return SimpleNamespace(pitr_server_of=lambda name: server if pitr else None)


@pytest.mark.parametrize(
    "params, plan_args, message",
    [
        ({"confirm": "app"}, {}, "type the server name 'main' in the 'confirm' field (you typed 'app')"),
        ({"confirm": None}, {}, "type the server name 'main' in the 'confirm' field."),
        ({"confirm": "main"}, {"pitr": False}, "has no WAL archive in the plan"),
        ({"confirm": "main"}, {"restore": False}, "add servers.main.restore: {queue: ..., data_dir: ...}"),
        ({"confirm": "main", "backup": "20261122T093000Z-3fa2c1"}, {}, "must be 'latest' (the end of the WAL"),
        ({"confirm": "main", "tables": ["sales.orders"]}, {}, "leave 'tables' empty"),
        ({"confirm": "main", "target_name": "x"}, {}, "leave 'target_name' empty"),
    ],
)
def test_a_wrong_server_request_says_what_to_fix_and_touches_nothing(params, plan_args, message):
    from pgdr.incident import InvalidRestoreRequest, read_request

    db = SimpleNamespace(name="app", conn_id="pgdr_app")
    with pytest.raises(InvalidRestoreRequest) as err:
        read_request({"mode": "server", **params}, _form_plan(**plan_args), db)
    assert message in str(err.value) and "Nothing was touched" in str(err.value)


def test_a_server_request_recovers_to_latest_by_default():
    from pgdr.incident import read_request

    db = SimpleNamespace(name="app", conn_id="pgdr_app")
    request = read_request({"mode": "server", "confirm": "main", "backup": "latest-verified"}, _form_plan(), db)
    assert request == {"mode": "server", "server": "main", "selector": "latest", "dry_run": False, "restore_from": None}
    timed = read_request({"mode": "server", "confirm": "main", "backup": "2026-11-26 09:40:59"}, _form_plan(), db)
    assert timed["selector"] == "2026-11-26 09:40:59"


def test_a_retry_resumes_only_its_own_runs_directory(tmp_path):
    from pgdr.physical.server_recovery import ServerRecovery

    def recovery(key):
        return ServerRecovery(None, None, None, tmp_path / "data", resume_key=key)

    assert recovery("pgdr_restore/run-1").resumes_own_try() is False  # the first try: marks the directory
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "PG_VERSION").write_text("18\n")  # the first try wrote files, then died
    assert recovery("pgdr_restore/run-1").resumes_own_try() is True  # its retry resumes them
    assert recovery("pgdr_restore/run-2").resumes_own_try() is False  # another run never reuses them unasked
    assert recovery(None).resumes_own_try() is False  # the command line: --delta only when given


def test_a_window_with_nothing_committed_after_the_backup_says_give_latest():
    from datetime import UTC, datetime, timedelta

    from pgdr.physical.recovery import RecoverableWindow, TargetOutsideWindow, choose_backup

    ended = datetime(2026, 12, 3, 23, 43, tzinfo=UTC)
    entry = SimpleNamespace(backup_id="b1", record=SimpleNamespace(finished_at=ended))
    empty = RecoverableWindow(ended, ended, None, (entry,))
    for moment in (ended, ended + timedelta(minutes=5)):
        with pytest.raises(TargetOutsideWindow, match="nothing was committed.*after its newest base backup.*'latest'"):
            choose_backup(empty, moment)
    with pytest.raises(TargetOutsideWindow, match="the recoverable window is 2026-12-03 23:43:00 to 2026-12-03 23:43"):
        choose_backup(empty, ended - timedelta(hours=1))  # too old: that is what to say first
    assert choose_backup(empty, None) is entry  # 'latest' still recovers
    window = RecoverableWindow(ended, ended + timedelta(minutes=1), None, (entry,))
    assert choose_backup(window, ended) is entry
    with pytest.raises(TargetOutsideWindow, match="the recoverable window is 2026-12-03 23:43:00 to 2026-12-03 23:44"):
        choose_backup(window, ended + timedelta(minutes=1))


@pytest.mark.parametrize("links", [True, False])
def test_the_disk_a_chain_needs_counts_the_full_backup_twice_when_its_combine_copies(monkeypatch, links):
    """A chain is combined with hard links (PostgreSQL 18's pg_combinebackup --link) or, before 18, by copying every
    file: the extracted full backup and its combined copy are then on disk together, and the plan says so rather
    than let the recovery fill the disk half way."""
    import json

    from pgdr.physical import recovery
    from pgdr.physical.archive import WAL_PREFETCH
    from pgdr.physical.recovery import SCRATCH_WAL_SEGMENTS, chain_disk_bytes, scratch_disk_bytes

    manifest = json.dumps({"Files": [{"Size": 1_000_000_000}, {"Size": 24}, "not a file entry"]}).encode()
    full = SimpleNamespace(
        record=SimpleNamespace(
            file=lambda name: SimpleNamespace(key=f"full/{name}"), files=[], size=90_000_000, wal_segment_size=16 << 20
        )
    )
    incremental = SimpleNamespace(record=SimpleNamespace(size=5_000_000))
    store = SimpleNamespace(get_bytes=lambda key: manifest)
    monkeypatch.setattr(recovery, "combine_links", lambda: links)
    alone = 1_000_000_024 + WAL_PREFETCH * (16 << 20)
    assert chain_disk_bytes([full], store) == alone  # one member is moved into place, never combined
    assert chain_disk_bytes([full, incremental], store) == alone + 10_000_000 + (0 if links else 1_000_000_024)
    assert scratch_disk_bytes(alone, 16 << 20) == alone + SCRATCH_WAL_SEGMENTS * (16 << 20)


@pytest.mark.parametrize(
    "version, links", [("pg_combinebackup (PostgreSQL) 18.1", True), ("pg_combinebackup (PostgreSQL) 17.6", False)]
)
def test_only_a_postgresql_18_pg_combinebackup_links(monkeypatch, version, links):
    from pgdr.physical import cluster

    monkeypatch.setattr(cluster, "tool_version", lambda name: version)
    assert cluster.combine_links() is links
