"""WAL archive headroom: how fast barman-cloud-wal-archive ships real WAL with each codec, against the WAL pgbench
writes at full speed on this machine.

    make bench                 # after pitr.py: the 2 GB pgbench database's scale (135), 24 segments, 3 rounds
    make bench ARGS=--quick    # scale 20, 6 segments: the CI smoke run (bench/results/quick.json)

An embedded PostgreSQL 18 (no archiving; the segments stay in pg_wal), with production's ``full_page_writes = on``
(the embedded server's scratch default is off, which writes several times less WAL), gets a pgbench database, a
``CHECKPOINT`` and a write load of two clients at full speed; the WAL it wrote per second is ``wal_mb_s_pgbench``:
the rate of the minutes after a checkpoint, when every first change to a page writes the whole page, i.e. the peak
the archiver must keep up with. The load's completed segments are then archived as PostgreSQL's archiver does it:
pgdr's ``archive_command`` run in a data directory whose ``pg_wal/archive_status`` lists them ``.ready``, for one
segment at a time, oldest first, ``.ready`` renamed ``.done`` after each success; the command ships the requested
segment and up to ``ARCHIVE_AHEAD - 1`` more that are ready, one ``barman-cloud-wal-archive`` each, side by side,
to moto's S3 server over HTTP, with each codec of the plan's ``pitr.wal_compression``, in rounds whose codec order
rotates: ``archive_mb_s`` (16 MB segments shipped per second, median of the rounds), ``archive_stored_ratio``
(stored bytes over WAL bytes) and ``archive_headroom`` (``archive_mb_s`` over ``wal_mb_s_pgbench``, goal >= 2).
``archive_mb_s_one_at_a_time``: the same with one segment per call (``ahead=1``: barman-cloud-wal-archive alone as
``archive_command``, pgdr's command before it shipped ahead), in the same rounds.
``archive_fixed_s`` is what one segment costs whatever it holds: a segment of zeros (nothing to compress, a few
bytes to upload) archived the same way, median of the rounds: the process, its imports, the S3 session.
Results are merged into bench/results/latest.json (quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))

from pgdr.local.embedded import EmbeddedServer  # noqa: E402
from pgdr.plan import WAL_COMPRESSIONS  # noqa: E402
from pgdr.postgres.binaries import bundled_bin_dir  # noqa: E402
from pitr import archive_endpoint  # noqa: E402

BUCKET = "pgdr-bench-wal"
CODECS = WAL_COMPRESSIONS  # every codec a plan may choose
SEGMENT_MB = 16


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="scale 20 and 6 segments instead of 135 and 24")
    parser.add_argument("--segments", type=int, help="WAL segments archived per codec and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=int, help="pgbench scale of the write load's database")
    parser.add_argument("--load-seconds", type=int, default=60)
    parser.add_argument("--output", type=Path, help="default: bench/results/latest.json (quick.json with --quick)")
    args = parser.parse_args(argv)
    args.scale = args.scale or (20 if args.quick else 135)
    args.segments = args.segments or (6 if args.quick else 24)
    args.output = args.output or ROOT / "bench" / "results" / ("quick.json" if args.quick else "latest.json")

    from pgdr.errors import PgdrError
    from pgdr.physical.archive import ARCHIVE_AHEAD, WalArchive, archiver_bin_dir
    from pgdr.storage.layout import PhysicalLayout

    try:
        bin_dir = archiver_bin_dir()
    except PgdrError as err:
        print(f"WAL codec benchmark skipped: {err}")
        return
    work, moto, s3, access = archive_endpoint("bench-wal", BUCKET)
    # Keep every segment the load writes (none recycled), so they can be archived afterwards.
    settings = {"wal_keep_size": "8GB", "max_wal_size": "8GB", "full_page_writes": "on"}
    server = EmbeddedServer(work / "postgres", settings=settings).start()
    env = {**os.environ, "PGPASSWORD": server.password, "PGHOST": "127.0.0.1", "PGPORT": str(server.port)}
    env["PGUSER"] = "postgres"
    try:
        pgbench = str(bundled_bin_dir() / "pgbench")
        subprocess.run([pgbench, "-i", "-q", "-s", str(args.scale), "postgres"], env=env, check=True)

        def lsn() -> int:
            return int(float(_query(env, "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")))

        _query(env, "CHECKPOINT")
        first_segment = _current_segment(env)
        before, started = lsn(), time.perf_counter()
        subprocess.run(
            [pgbench, "-c", "2", "-j", "2", "-T", str(args.load_seconds), "-n", "postgres"],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        wal_mb_s = (lsn() - before) / 1e6 / (time.perf_counter() - started)
        last_segment = _current_segment(env)  # still being written: left out
        segments = sorted(p for p in (server.data_dir / "pg_wal").iterdir() if first_segment < p.name < last_segment)[
            : args.segments
        ]
        if len(segments) < args.segments:
            raise SystemExit(f"the load wrote {len(segments)} whole segments; give it more --load-seconds")
        copies = work / "segments"
        copies.mkdir()
        for segment in segments:
            shutil.copy2(segment, copies / segment.name)
        segments = sorted(copies.iterdir())
    finally:
        server.stop()
    zeros = work / "zeros" / "0000000100000FFF000000FF"
    zeros.parent.mkdir()
    zeros.write_bytes(bytes(SEGMENT_MB * 1024 * 1024))

    runs: dict[str, list[float]] = {codec: [] for codec in CODECS}
    alone: dict[str, list[float]] = {codec: [] for codec in CODECS}
    fixed: list[float] = []
    stored: dict[str, int] = {}
    archive_env = {**os.environ, **access.environment()}

    def archive_as_postgres(archive: WalArchive, ahead: int) -> float:
        """Archive every segment as PostgreSQL's archiver calls archive_command; return the seconds it took."""
        data = work / "data"
        shutil.rmtree(data, ignore_errors=True)
        (data / "pg_wal" / "archive_status").mkdir(parents=True)
        for segment in segments:
            os.link(segment, data / "pg_wal" / segment.name)
            (data / "pg_wal" / "archive_status" / f"{segment.name}.ready").touch()
        t = time.perf_counter()
        for segment in segments:
            command = archive.archive_command(bin_dir, ahead).replace("%p", f"pg_wal/{segment.name}")
            subprocess.run(
                command.replace("%f", segment.name), shell=True, cwd=data, env=archive_env, check=True,
                capture_output=True,
            )  # fmt: skip
            status = data / "pg_wal" / "archive_status" / segment.name
            status.with_name(f"{segment.name}.ready").rename(status.with_name(f"{segment.name}.done"))
        return time.perf_counter() - t

    for r in range(args.rounds):
        archive = WalArchive(BUCKET, PhysicalLayout(f"r{r}-zeros"), "bench", access, compression="zstd")
        t = time.perf_counter()
        subprocess.run(
            archive.archive_command(bin_dir).replace("%p", str(zeros)), shell=True, env=archive_env, check=True
        )
        fixed.append(time.perf_counter() - t)
        for codec in CODECS[r % len(CODECS) :] + CODECS[: r % len(CODECS)]:
            archive = WalArchive(BUCKET, PhysicalLayout(f"r{r}-{codec}"), "bench", access, compression=codec)
            one = WalArchive(BUCKET, PhysicalLayout(f"r{r}-{codec}-one"), "bench", access, compression=codec)
            for ahead, contender, into in ((ARCHIVE_AHEAD, archive, runs), (1, one, alone))[:: 1 if r % 2 else -1]:
                into[codec].append(archive_as_postgres(contender, ahead))
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"r{r}-{codec}/")
            stored[codec] = sum(o["Size"] for page in pages for o in page.get("Contents", []))
            if sum(1 for page in pages for o in page.get("Contents", [])) != len(segments):
                raise SystemExit(f"the {codec} archive does not hold each of the {len(segments)} segments once")
            print(
                f"  round {r + 1}: {codec} {runs[codec][-1]:.1f}s ({ARCHIVE_AHEAD} in flight), "
                f"{alone[codec][-1]:.1f}s (one at a time), {stored[codec] / 1e6:.0f} MB stored"
            )
    moto.stop()
    shutil.rmtree(work, ignore_errors=True)

    wal_bytes = len(segments) * SEGMENT_MB * 1024 * 1024
    mb_s = {codec: wal_bytes / 1e6 / statistics.median(times) for codec, times in runs.items()}
    mb_s_alone = {codec: wal_bytes / 1e6 / statistics.median(times) for codec, times in alone.items()}
    results = {
        "archive_mb_s": {codec: round(v, 1) for codec, v in mb_s.items()},
        "archive_mb_s_one_at_a_time": {codec: round(v, 1) for codec, v in mb_s_alone.items()},
        "archive_ahead": ARCHIVE_AHEAD,
        "archive_stored_ratio": {codec: round(stored[codec] / wal_bytes, 3) for codec in CODECS},
        "archive_headroom": {codec: round(v / wal_mb_s, 2) for codec, v in mb_s.items()},
        "wal_mb_s_pgbench": round(wal_mb_s, 1),
        "archive_fixed_s": round(statistics.median(fixed), 3),
        "wal_codecs": {
            "segments": len(segments),
            "rounds": args.rounds,
            "pgbench": f"scale {args.scale}, 2 clients at full speed for {args.load_seconds} s after a CHECKPOINT, "
            "full_page_writes on",
            "runs_s": {codec: [round(x, 2) for x in times] for codec, times in runs.items()},
            "runs_one_at_a_time_s": {codec: [round(x, 2) for x in times] for codec, times in alone.items()},
            "definition": "16 MB segments of the load's WAL archived as PostgreSQL's archiver calls archive_command "
            f"(one call at a time, oldest first, .ready renamed .done): pgdr's command ships up to {ARCHIVE_AHEAD} "
            "ready segments side by side, one barman-cloud-wal-archive process each (one_at_a_time: one segment "
            "per call), to moto's S3 server over HTTP; MB/s of WAL shipped, median of the rounds",
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    report = json.loads(args.output.read_text()) if args.output.exists() else {}
    report.update(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nWAL written by pgbench at full speed: {wal_mb_s:.1f} MB/s; one segment costs at least "
          f"{statistics.median(fixed):.2f} s (a segment of zeros)")  # fmt: skip
    for codec in CODECS:
        print(
            f"  {codec:<5} {mb_s[codec]:6.1f} MB/s shipped ({mb_s[codec] / wal_mb_s:.1f}x the load; one at a time "
            f"{mb_s_alone[codec]:.1f} MB/s), stored {stored[codec] / wal_bytes:.0%} of the WAL"
        )


def _current_segment(env: dict) -> str:
    return _query(env, "SELECT pg_walfile_name(pg_current_wal_lsn())")


def _query(env: dict, statement: str) -> str:
    out = subprocess.run(
        [str(bundled_bin_dir() / "psql"), "-X", "-t", "-A", "-d", "postgres", "-c", statement],
        env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return out.stdout.strip()


if __name__ == "__main__":
    main()
