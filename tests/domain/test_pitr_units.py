"""Point-in-time recovery's pure logic: the plan's servers section, WAL names, retention by window, what is due."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pgdr.errors import PlanError
from pgdr.plan import parse_plan

BASE = """
storage:
  local: {type: local, path: /tmp/x}
  s3: {type: s3, bucket: b, prefix: p, aws_conn_id: aws}
databases:
  - {name: shop, conn_id: main_conn}
  - {name: billing, conn_id: main_conn}
  - {name: other, conn_id: other_conn}
"""


def _plan(servers: str):
    return parse_plan(BASE + servers, Path("/plans/pgdr.yaml"))


def test_a_server_with_pitr_covers_every_database_on_it():
    plan = _plan("servers:\n  main_conn:\n    pitr: {storage: s3, keep_window: 3d, incremental_schedule: null}\n")
    (server,) = plan.servers
    assert server.databases == ("shop", "billing") and server.conn_id == "main_conn"
    assert server.pitr.keep_window == timedelta(days=3) and server.pitr.incremental_schedule is None
    assert server.pitr.rpo == timedelta(minutes=5) and server.pitr.storage.bucket == "b"
    assert server.pitr.partial_grace == timedelta(hours=6)
    assert plan.pitr_server_of("billing") is server and plan.pitr_server_of("other") is None
    assert server.pitr.wal_compression == "zstd"
    graced = _plan("servers:\n  main_conn:\n    pitr: {storage: s3, partial_grace: 45m, wal_compression: lz4}\n")
    assert graced.servers[0].pitr.wal_compression == "lz4"
    assert graced.servers[0].pitr.partial_grace == timedelta(minutes=45)
    assert graced.servers[0].restore is None
    assert server.source_conn_id is None and server.on_standby_lag == "primary"
    assert server.max_standby_lag == timedelta(minutes=5)
    assert server.recovery_proof == "quick"  # an incident's recovery: every page; pgdr_verify_pitr's is thorough
    proven = _plan("servers:\n  main_conn:\n    pitr: {storage: s3}\n    recovery_proof: thorough\n").servers[0]
    assert proven.recovery_proof == "thorough"
    standby = _plan(
        "servers:\n  main_conn:\n    pitr: {storage: s3}\n    source_conn_id: main_standby\n    on_standby_lag: fail\n"
    ).servers[0]
    assert (standby.source_conn_id, standby.on_standby_lag, standby.max_standby_lag) == (
        "main_standby",
        "fail",
        timedelta(minutes=5),
    )
    inherited = parse_plan(
        BASE.replace("{name: shop, conn_id: main_conn}", "{name: shop, conn_id: main_conn, max_standby_lag: 30s}")
        + "servers:\n  main_conn:\n    pitr: {storage: s3}\n",
        Path("/plans/pgdr.yaml"),
    ).servers[0]
    assert inherited.max_standby_lag == timedelta(seconds=30)  # its (first) database's, unless given
    target = (
        _plan(
            "servers:\n  main_conn:\n    pitr: {storage: s3}\n    restore: {queue: pgdr-db-new, data_dir: /var/lib/pg, "
            "port: 5433, os_user: postgres}\n"
        )
        .servers[0]
        .restore
    )
    assert (target.queue, target.data_dir, target.port, target.os_user) == (
        "pgdr-db-new",
        "/var/lib/pg",
        5433,
        "postgres",
    )


@pytest.mark.parametrize(
    "servers, expected",
    [
        (
            "servers:\n  main_conn:\n    pitr: {storage: local}\n",
            "line 11: servers.main_conn.pitr.storage: storage target 'local' is a local folder, but the WAL archiver",
        ),
        (
            "servers:\n  nowhere:\n    pitr: {storage: s3}\n",
            "servers.nowhere: no database of the plan is on a server called 'nowhere'. A server is named by its "
            "databases' 'server:'",
        ),
        (
            "servers:\n  main_conn:\n    conn_id: main_conn\n",
            "servers.main_conn.pitr: missing; say where the WAL archive",
        ),
        (
            "servers:\n  main_conn:\n    pitr: {storage: s3, keep_windw: 7d}\n",
            "servers.main_conn.pitr.keep_windw: unknown key. Did you mean 'keep_window'?",
        ),
        (
            "servers:\n  main_conn:\n    pitr: {storage: s4}\n",
            "servers.main_conn.pitr.storage: no storage target named 's4'; defined: local, s3",
        ),
        (
            "servers:\n  main_conn:\n    pitr: {storage: s3, wal_compression: snappy}\n",
            "servers.main_conn.pitr.wal_compression: expected one of gzip, lz4, zstd, bzip2, xz (how "
            "barman-cloud-wal-archive compresses each WAL segment; zstd, the default, is the fastest and stores less "
            "than gzip), got 'snappy'",
        ),
        (
            "servers:\n  main_conn:\n    pitr: {storage: s3, rpo: soon}\n",
            "servers.main_conn.pitr.rpo: expected a duration",
        ),
        (
            "servers:\n  main_conn:\n    pitr: {storage: s3}\n    on_standby_lag: wait\n",
            "servers.main_conn.on_standby_lag: expected primary (back up from the primary, with a warning, when the "
            "standby lags more than max_standby_lag) or fail (fail the backup), got 'wait'",
        ),
        (
            "servers:\n  main_conn:\n    pitr: {storage: s3}\n    recovery_proof: full\n",
            "servers.main_conn.recovery_proof: expected quick (pg_amcheck of every page, unique keys, counts, "
            "sequences, your suites) or thorough (also every row looked up in every index",
        ),
        (
            "servers:\n  main_conn:\n    pitr: {storage: s3}\n    source_conn_id: 'a b'\n",
            "servers.main_conn.source_conn_id: expected an Airflow connection id",
        ),
        (
            "servers:\n  main_conn:\n    pitr: {storage: s3}\n    restore: {queue: new-host}\n",
            "servers.main_conn.restore.data_dir: missing; a whole-server recovery from the form needs",
        ),
        (
            "servers:\n  main_conn:\n    pitr: {storage: s3}\n    restore: {queue: q, data_dir: pgdata}\n",
            "servers.main_conn.restore.data_dir: must be an absolute path",
        ),
        (
            "servers:\n  main_conn:\n    pitr: {storage: s3}\n    restore: {queue: q, data_dir: /d, port: 99999}\n",
            "servers.main_conn.restore.port: must be a TCP port",
        ),
        (
            "servers:\n  main_conn:\n    pitr: {storage: s3}\n    restore: {queue: 'a b', data_dir: /d}\n",
            "servers.main_conn.restore.queue: expected a Celery queue name",
        ),
    ],
)
def test_bad_servers_sections_name_the_key_and_what_to_do(servers, expected):
    with pytest.raises(PlanError) as err:
        _plan(servers)
    assert expected in str(err.value)


COPY_TARGETS = BASE.replace(
    "  s3: {type: s3, bucket: b, prefix: p, aws_conn_id: aws}\n",
    "  s3: {type: s3, bucket: b, prefix: p, aws_conn_id: aws}\n"
    "  dr: {type: s3, bucket: b-dr, prefix: p, aws_conn_id: aws_dr}\n"
    "  same: {type: s3, bucket: b, prefix: p/, aws_conn_id: aws}\n",
)


def test_a_servers_copies_are_s3_targets_other_than_its_archive_with_a_copy_rpo():
    plan = parse_plan(COPY_TARGETS + "servers:\n  main_conn:\n    pitr: {storage: s3, copies: [dr]}\n", Path("/p"))
    pitr = plan.servers[0].pitr
    assert [c.name for c in pitr.copies] == ["dr"] and pitr.copy_rpo == timedelta(hours=1)
    assert pitr.storage_named(None) is pitr.storage and pitr.storage_named("s3") is pitr.storage
    assert pitr.storage_named("dr") is pitr.copies[0]
    with pytest.raises(ValueError, match=r"not stored in 'eu'; they are in: s3 \(its archive\), dr \(a copy\)"):
        pitr.storage_named("eu")
    tuned = parse_plan(COPY_TARGETS + "servers:\n  main_conn:\n    pitr: {storage: s3, copy_rpo: 10m}\n", Path("/p"))
    assert tuned.servers[0].pitr.copy_rpo == timedelta(minutes=10) and tuned.servers[0].pitr.copies == ()


@pytest.mark.parametrize(
    "copies, expected",
    [
        ("[eu]", "servers.main_conn.pitr.copies: no storage target named 'eu'; defined: dr, local, s3, same"),
        ("[dr, dr]", "servers.main_conn.pitr.copies: a storage target is named twice"),
        ("[local]", "storage target 'local' is a local folder, but a recovery from a copy replays its WAL with"),
        ("[same]", "'same' is where the archive itself is (s3://b/p): not a copy"),
        ("{dr: 1}", "servers.main_conn.pitr.copies: expected a list of strings"),
    ],
    ids=["unknown", "twice", "a folder", "the archive itself", "not a list"],
)
def test_a_wrong_pitr_copies_key_is_named(copies, expected):
    with pytest.raises(PlanError) as err:
        parse_plan(COPY_TARGETS + f"servers:\n  main_conn:\n    pitr: {{storage: s3, copies: {copies}}}\n", Path("/p"))
    assert expected in str(err.value)


def test_the_first_gap_in_a_timeline_names_the_missing_segment_and_the_last_one_before_it():
    from pgdr.physical.archive import WalSegment, first_gap, segment_name

    at = datetime(2026, 12, 4, tzinfo=UTC)
    segments = [WalSegment(segment_name(1, n), f"k/{n}", 1, at + timedelta(minutes=n)) for n in (3, 4, 6, 7)]
    segments.append(WalSegment(segment_name(2, 9), "k/t2", 1, at))  # another timeline: not counted
    gap = first_gap(segments, segment_name(1, 3))
    assert (gap.missing, gap.reachable.name, gap.after) == (segment_name(1, 5), segment_name(1, 4), 2)
    assert first_gap(segments, segment_name(1, 6)) is None
    missing_start = first_gap(segments, segment_name(1, 2))
    assert (missing_start.missing, missing_start.reachable, missing_start.after) == (segment_name(1, 2), None, 4)


@pytest.mark.parametrize(
    "path, copied",
    [
        ("0000000100000000/000000010000000000000003.zst", True),
        ("000000010000000000000003.gz", True),
        ("0000000100000000/000000010000000000000003.00000028.backup.gz", True),
        ("0000000100000000/000000010000000000000003.partial", True),
        ("00000002.history.gz", True),
        ("00000002.history", True),
        ("../../base/x/backup.json", False),
        ("0000000100000000/../../evil", False),
        ("0000000100000000/000000010000000000000003.zst/x", False),
        ("000000010000000000000003.zst\n", False),
        ("notes.txt", False),
    ],
)
def test_only_wal_file_names_are_copied_from_an_archive(path, copied):
    from pgdr.physical.copies import is_wal_file

    assert is_wal_file(path) is copied


def test_a_copys_lag_is_a_problem_past_copy_rpo_and_a_gap_at_once():
    from pgdr.physical.copies import ServerCopyLag

    behind = ServerCopyLag(
        "dr", ("0000000100000000/000000010000000000000009.zst",), ("20261204T000000Z-aaaaaa",), 7200, None
    )
    problem = behind.problem(3600)
    assert (
        "copy 'dr' lacks 1 WAL files (from 0000000100000000/000000010000000000000009.zst) and 1 base backups" in problem
    )
    assert "2h" in problem and "copy_rpo 1h" in problem and "pgdr_copy is failing or not running" in problem
    assert behind.problem(10_000) is None
    assert (
        ServerCopyLag("dr", (), (), 0, "copy 'dr' lacks WAL segment X").problem(3600) == "copy 'dr' lacks WAL segment X"
    )


def test_wal_segment_arithmetic():
    from pgdr.physical.archive import archived_segment, segment_name, segment_number, segment_of_lsn

    assert segment_number("0000000100000001000000FF") == 511
    assert segment_name(1, 512) == "000000010000000200000000"
    assert segment_of_lsn(2, "1/2000028") == "000000020000000100000002"
    assert archived_segment("000000010000000000000002.00000028.backup") == "000000010000000000000002"
    assert archived_segment("00000002.history") is None and archived_segment(None) is None


def _entry(
    backup_id: str,
    finished: datetime,
    kind: str = "full",
    parent: str | None = None,
    status: str = "unverified",
    start: int = 1,
):
    from pgdr.physical.archive import segment_name
    from pgdr.physical.catalog import BaseBackupEntry, BaseBackupFile, BaseBackupRecord

    record = BaseBackupRecord(
        backup_id=backup_id,
        server="main",
        kind=kind,
        parent=parent,
        system_identifier="1",
        pg_version=180006,
        timeline=1,
        start_lsn="0/1000028",
        end_lsn="0/1000100",
        start_wal=segment_name(1, start),
        started_at=finished - timedelta(minutes=1),
        finished_at=finished,
        wal_segment_size=16 * 1024 * 1024,
        files=(BaseBackupFile("base.tar.gz", "k", 1, "0" * 64),),
    )
    return BaseBackupEntry(record, status)


def test_retention_keeps_what_the_window_needs_and_the_newest_verified_chain():
    from pgdr.physical.retention import decide_pitr_retention

    now = datetime(2026, 11, 26, 12, tzinfo=UTC)
    day = timedelta(days=1)
    entries = [
        _entry("20261110T000000Z-aaaaaa", now - 16 * day, status="verified", start=1),
        _entry("20261115T000000Z-bbbbbb", now - 11 * day, start=10),
        _entry("20261118T000000Z-cccccc", now - 8 * day, start=20),  # the anchor: ended before the window
        _entry(
            "20261119T000000Z-dddddd",
            now - 7 * day + timedelta(hours=1),
            "incremental",
            "20261118T000000Z-cccccc",
            start=25,
        ),
        _entry("20261125T000000Z-eeeeee", now - day, start=40),
    ]
    decision = decide_pitr_retention(
        entries, ["20261120T000000Z-ffffff", "20261126T110000Z-999999"], timedelta(days=7), now
    )
    assert set(decision.keep) == {
        "20261110T000000Z-aaaaaa",
        "20261118T000000Z-cccccc",
        "20261119T000000Z-dddddd",
        "20261125T000000Z-eeeeee",
    }
    assert decision.keep["20261110T000000Z-aaaaaa"] == "the newest verified chain"
    assert set(decision.delete) == {"20261115T000000Z-bbbbbb"}
    assert decision.delete_partial == ["20261120T000000Z-ffffff"]  # the fresh one may still be uploading
    partials = ["20261120T000000Z-ffffff", "20261126T110000Z-999999"]
    hasty = decide_pitr_retention(entries, partials, timedelta(days=7), now, partial_grace=timedelta(minutes=30))
    assert hasty.delete_partial == partials  # the plan's pitr.partial_grace, not a hard-coded 6 hours
    assert decision.delete_wal_before == "000000010000000000000001"  # the verified chain still needs its WAL
    without_verified = decide_pitr_retention([e for e in entries if e.status != "verified"], [], timedelta(days=7), now)
    assert without_verified.delete_wal_before == "000000010000000000000014"


def test_what_a_scheduled_run_takes():
    from pgdr.physical.basebackup import due_kind

    now = datetime(2026, 11, 26, 12, 30, tzinfo=UTC)
    assert due_kind([], "@daily", "@hourly", now) == "full"
    fresh_full = [_entry("20261126T000500Z-aaaaaa", datetime(2026, 11, 26, 0, 5, tzinfo=UTC))]
    assert due_kind(fresh_full, "@daily", "@hourly", now) == "incremental"
    assert due_kind(fresh_full, "@daily", None, now) is None
    recent = fresh_full + [
        _entry(
            "20261126T120100Z-bbbbbb",
            datetime(2026, 11, 26, 12, 1, tzinfo=UTC),
            "incremental",
            "20261126T000500Z-aaaaaa",
        )
    ]
    assert due_kind(recent, "@daily", "@hourly", now) is None
    assert due_kind(fresh_full, "0 12 * * *", "@hourly", now) == "full"


def test_a_recovery_target_is_read_as_the_form_writes_it():
    from pgdr.incident import parse_timestamp

    assert parse_timestamp("2026-11-26 09:41:00") == datetime(2026, 11, 26, 9, 41, tzinfo=UTC)
    assert parse_timestamp("2026-11-26T09:41:00Z") == datetime(2026, 11, 26, 9, 41, tzinfo=UTC)
    assert parse_timestamp("latest") is None and parse_timestamp("yesterday") is None


def test_a_damaged_base_backup_record_is_refused():
    from pgdr.logical.catalog import ManifestInvalid
    from pgdr.physical.catalog import BaseBackupRecord
    from pgdr.storage.layout import PhysicalLayout

    good = _entry("20261125T000000Z-eeeeee", datetime(2026, 11, 25, tzinfo=UTC)).record
    layout = PhysicalLayout("p")
    import dataclasses
    import json

    files = (
        dataclasses.replace(good.files[0], key=layout.file_key("main", good.backup_id, "base.tar.gz")),
        dataclasses.replace(
            good.files[0], name="backup_manifest", key=layout.file_key("main", good.backup_id, "backup_manifest")
        ),
    )
    raw = json.loads(dataclasses.replace(good, files=files).to_json())
    assert "source" not in raw  # read on the primary: backup.json as a pgdr before the field reads it
    assert (
        BaseBackupRecord.from_json(json.dumps(raw).encode(), "w", layout, "main", good.backup_id).backup_id
        == good.backup_id
    )
    standby = {"source": "standby", "source_conn_id": "pgdr_standby", "standby_lag_s": 0.4}
    read_on_standby = dataclasses.replace(good, files=files, source=standby)
    again = BaseBackupRecord.from_json(read_on_standby.to_json(), "w", layout, "main", good.backup_id)
    assert again.source == standby and again.summary("s3://b/p")["source_conn_id"] == "pgdr_standby"
    for field, value, words in [
        ("source", {"backup_id": "other"}, "source must be a mapping of source, source_conn_id, standby_lag_s"),
        ("source", {"source": ["standby"]}, "to plain values"),
        ("source", "standby", "to plain values"),
        ("files", [{**raw["files"][0], "key": "../../etc/passwd"}, raw["files"][1]], "outside this base backup"),
        ("start_lsn", "0/1; DROP", "must be an LSN"),
        ("parent", "x", "must be a backup id"),
        ("server", "other", "do not match where the record is stored"),
    ]:
        with pytest.raises(ManifestInvalid, match=words):
            BaseBackupRecord.from_json(json.dumps({**raw, field: value}).encode(), "w", layout, "main", good.backup_id)


def test_leftover_scratch_clusters_are_removed_only_when_their_run_is_over(tmp_path):
    import json
    import os
    import socket
    import subprocess

    from pgdr.physical.cluster import MARKER, remove_leftover_clusters
    from pgdr.workdir import process_identity

    def leftover(name: str, run_id: str, host: str = socket.gethostname(), **more) -> Path:
        folder = tmp_path / f"pgdr-cluster-{name}"
        (folder / "data").mkdir(parents=True)
        marker = {"dag_id": "pgdr_verify_pitr", "run_id": run_id, "host": host, "port": 1, "pg_version": 180006}
        (folder / MARKER).write_text(json.dumps({**marker, **more}))
        return folder

    finished = leftover("a", "killed-run")
    gone = leftover("f", "deleted-run")  # Airflow no longer knows the run: the same policy as scratch databases
    running = leftover("b", "live-run")
    elsewhere = leftover("c", "killed-run", host="another-worker")
    mine = leftover("d", "killed-run")
    unmarked = tmp_path / "pgdr-cluster-e"
    unmarked.mkdir()
    states = {"killed-run": "failed", "live-run": "running"}
    # The break-glass command's run is in a metadata database of its own: unknown here, but its process runs.
    with subprocess.Popen(["sleep", "60"]) as other:
        try:
            breakglass = leftover("g", "cli-run", owner=process_identity(other.pid))
            gone_pid = 2**22 + 1  # above Linux's largest pid (PID_MAX_LIMIT): no process runs with it
            ended = leftover("h", "cli-run", owner={"host": socket.gethostname(), "pid": gone_pid, "started": "1"})
            ours = leftover("i", "killed-run", owner=process_identity(os.getpid()))  # an earlier run of this process
            removed = remove_leftover_clusters(tmp_path, lambda dag_id, run_id: states[run_id], keep=mine)
        finally:
            other.kill()
    assert sorted(removed) == sorted([finished, gone, ended, ours]) and not finished.exists() and not gone.exists()
    assert running.exists() and elsewhere.exists() and mine.exists() and unmarked.exists() and breakglass.exists()


def test_trend_axes_read_as_durations_whatever_the_spread():
    """A 7-second RTO and a 30-minute target are both readable (not seconds plotted on a minutes axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pgdr.drill import duration_axis

    fig, (wide, narrow) = plt.subplots(1, 2)
    duration_axis(wide, [7.2, 9.1, 1800])
    duration_axis(narrow, [340, 900, 3600])
    fig.canvas.draw()
    assert wide.get_yscale() == "log" and narrow.get_yscale() == "linear"
    wide_labels = [t.get_text() for t in wide.get_yticklabels() if t.get_text()]
    assert "10.0s" in wide_labels and "30m 00s" in wide_labels
    assert "1h 00m" in [t.get_text() for t in narrow.get_yticklabels()]
    plt.close(fig)


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="only root runs the server as another user")
def test_a_private_checkout_keeps_the_servers_files_where_its_user_can_reach_them(monkeypatch):
    import shutil
    import tempfile

    from pgdr.postgres.binaries import reachable_by_server_user, state_dir_for

    base = Path(tempfile.mkdtemp(prefix="pgdr-reach-"))  # /tmp itself is open to every user
    try:
        base.chmod(0o755)
        private = base / "home"
        (private / "checkout" / ".pgdr").mkdir(parents=True)
        private.chmod(0o700)  # like /root
        monkeypatch.setenv("PGDR_SHARED_DIR", str(base / "shared"))
        moved = state_dir_for(private / "checkout" / ".pgdr" / "postgres")
        assert moved.parent.parent == base / "shared" and moved.name == "postgres"
        assert reachable_by_server_user(moved.parent) and not reachable_by_server_user(private / "checkout")
        here = base / "open" / ".pgdr"
        here.mkdir(parents=True)
        (base / "open").chmod(0o755)
        here.chmod(0o755)
        assert state_dir_for(here / "postgres") == here / "postgres"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_archive_command_asks_for_the_targets_server_side_encryption():
    from pgdr.physical.archive import ArchiveAccess, WalArchive
    from pgdr.storage.layout import PhysicalLayout

    access = ArchiveAccess(endpoint_url="http://127.0.0.1:9000")
    plain = WalArchive("b", PhysicalLayout(prefix="p"), "main", access).archive_command(Path("/bin"))
    assert "--encryption" not in plain
    kms = WalArchive("b", PhysicalLayout(prefix="p"), "main", access, "aws:kms", "arn:aws:kms:eu-west-1:1:key/a b")
    assert " --encryption aws:kms --sse-kms-key-id 'arn:aws:kms:eu-west-1:1:key/a b' --zstd " in kms.archive_command(
        Path("/bin")
    )
    sse_s3 = WalArchive("b", PhysicalLayout(prefix="p"), "main", access, "AES256")
    assert " --encryption AES256 --zstd " in sse_s3.archive_command(Path("/bin"))
    lz4 = WalArchive("b", PhysicalLayout(prefix="p"), "main", access, compression="lz4")
    assert " --lz4 s3://b/p/pitr-v1/wal main; " in lz4.archive_command(Path("/bin"))
    assert lz4.archive_command(Path("/bin"), ahead=1).endswith(" --lz4 s3://b/p/pitr-v1/wal main %p")


def test_the_readme_gives_the_dba_the_archive_command_pgdr_writes_and_postgresql_accepts_it():
    """The DBA copies the README's archive_command into postgresql.conf: it is the one pgdr gives its own servers;
    it has no placeholder but %p and %f (PostgreSQL 16+ refuses any other %-sequence), and no quote or backslash that
    postgresql.conf's quoting would change."""
    import re

    from pgdr.physical.archive import WalArchive
    from pgdr.storage.layout import PhysicalLayout

    command = WalArchive("BUCKET", PhysicalLayout(prefix="PREFIX"), "SERVER").archive_command(
        Path("/opt/pgdr-archiver/bin")
    )
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"archive_command = '{command}'" in readme
    assert set(re.findall(r"%.", command)) == {"%p", "%f"}
    assert "'" not in command and "\\" not in command


def test_the_restore_timeout_grows_with_the_largest_rto_and_never_drops_under_six_hours():
    from pgdr.airflow_glue.defaults import restore_timeout

    assert restore_timeout(_plan("")) == timedelta(hours=6)  # RTO 30 min by default: the floor
    large = BASE.replace("{name: billing, conn_id: main_conn}", "{name: billing, conn_id: main_conn, rto: 8h}")
    assert restore_timeout(parse_plan(large, Path("/plans/pgdr.yaml"))) == timedelta(hours=32)


def test_a_drill_with_the_storage_target_lost_reports_a_server_unrecoverable_from_the_copies(tmp_path, monkeypatch):
    """Scenario primary-target-lost: the base backups and WAL have no second copy, so the server's rehearsal is a
    failed row saying so (the report fails with it), not an attempt to read the lost target."""
    from pgdr.drill import broken_parts, drill_report
    from pgdr.tasks.drill import run_rehearse_pitr

    path = tmp_path / "pgdr.yaml"
    path.write_text(
        BASE.replace("/tmp/x", str(tmp_path)) + "servers:\n  main_conn:\n    pitr: {storage: s3, rpo: 2m}\n"
    )
    monkeypatch.setenv("PGDR_PLAN", str(path))
    row = run_rehearse_pitr("main_conn", {"params": {"scenario": "primary-target-lost"}})
    assert row["server"] == "main_conn" and row["rpo"] == {"target_s": 120.0, "achieved_s": None, "met": False}
    assert "cannot be recovered to a moment" in row["error"] and "no second copy" in row["error"]
    report = drill_report("d", "r", "primary-target-lost", datetime.now(UTC), "", [], [row])
    assert report["status"] == "fail" and broken_parts(report)


def test_a_copy_holds_every_base_backup_but_failed_ones_and_chains_built_on_them():
    from pgdr.physical.copies import _wal_floor, base_backups_to_copy

    at, day = datetime(2026, 12, 4, tzinfo=UTC), datetime(2026, 12, 5, tzinfo=UTC)
    entries = [
        _entry("20261201T000000Z-aaaaaa", at, status="failed", start=3),
        _entry("20261201T010000Z-bbbbbb", at + timedelta(hours=1), "incremental", "20261201T000000Z-aaaaaa", start=5),
        _entry("20261202T000000Z-cccccc", day, status="verified", start=9),
        _entry("20261202T010000Z-dddddd", day + timedelta(hours=1), "incremental", "20261202T000000Z-cccccc", start=11),
        _entry("20261202T020000Z-eeeeee", day + timedelta(hours=2), "incremental", "20261130T000000Z-gone00", start=12),
    ]
    wanted = base_backups_to_copy(entries)
    assert [e.backup_id for e in wanted] == ["20261202T000000Z-cccccc", "20261202T010000Z-dddddd"]
    assert _wal_floor(wanted) == "000000010000000000000009" and _wal_floor([]) is None


def test_mode_server_reads_from_a_copy_of_the_servers_archive_and_refuses_a_copy_of_the_dumps_alone():
    from pgdr.incident import InvalidRestoreRequest, read_request

    plan = parse_plan(
        COPY_TARGETS.replace(
            "  - {name: shop, conn_id: main_conn}", "  - {name: shop, conn_id: main_conn, storage: s3, copies: [local]}"
        )
        + "servers:\n  main_conn:\n    pitr: {storage: s3, copies: [dr]}\n    restore: {queue: q, data_dir: /d}\n",
        Path("/p"),
    )
    shop = plan.database("shop")
    form = {"mode": "server", "confirm": "main_conn", "backup": "latest"}
    assert read_request({**form, "restore_from": "dr"}, plan, shop)["restore_from"] == "dr"
    assert read_request(form, plan, shop)["restore_from"] is None
    assert read_request({**form, "restore_from": "s3"}, plan, shop)["restore_from"] is None  # the archive itself
    with pytest.raises(InvalidRestoreRequest) as refused:
        read_request({**form, "restore_from": "local"}, plan, shop)
    assert "not stored in 'local'; they are in: s3 (its archive), dr (a copy)" in str(refused.value)
    assert "holds no WAL" in str(refused.value) and "Nothing was touched" in str(refused.value)


@pytest.mark.parametrize(
    "stderr, removed",
    [
        # CheckXLogRemoved: before the server sends the WAL, and when a segment goes while it is sent
        (
            "pg_basebackup: error: ... ERROR:  requested WAL segment 000000010000000000000042 has already been removed",
            True,
        ),
        # its listing of pg_wal holds none of the backup's segments, or not the first one
        ("pg_basebackup: error: could not get COPY data stream: ERROR:  could not find any WAL files", True),
        ('pg_basebackup: error: ERROR:  could not find WAL file "000000010000000000000042"', True),
        # anything else is not a reason to take the backup again without its WAL
        ("pg_basebackup: error: connection to server failed: FATAL:  password authentication failed", False),
        ('pg_basebackup: error: could not open file "pg_wal/000000010000000000000042": Permission denied', False),
        ("pg_basebackup: error: incremental backups cannot be taken unless WAL summarization is enabled", False),
    ],
)
def test_an_incremental_is_taken_again_without_its_wal_only_when_the_server_no_longer_has_that_wal(stderr, removed):
    from pgdr.physical.basebackup import _wal_removed

    assert _wal_removed(stderr) is removed
