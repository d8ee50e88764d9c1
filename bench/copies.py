"""Second copies of a server's point-in-time recovery (``pgdr_copy``'s ``copy_server``): how fast a base backup and
its WAL reach a copy target, and how far the copy stays behind the archive under a steady write load.

    make bench                 # after pitr.py: the 2 GB pgbench database's scale (135), 3 rounds
    make bench ARGS=--quick    # scale 14: the CI smoke run (bench/results/quick.json)

An embedded PostgreSQL 18 archives its WAL with barman-cloud to one of moto's S3 servers (the "primary region"),
as ``make demo`` configures it, and takes a full base backup there. Each round then copies the whole archive and
the base backup with :func:`pgdr.physical.copies.copy_server` into an empty copy target, two ways, in alternating
order:

- **inside S3** (``CopyObject``/``UploadPartCopy``): a bucket on the same endpoint, reached through the same
  connection; each object is then read back from the copy and at the source and its SHA-256 compared;
- **streamed**: a bucket on a second moto server (another region or account, another connection): each object is
  read at the source, hashed on the way, written to the copy and read back there.

``copy_inside_s3_mb_s`` and ``copy_streamed_mb_s`` are the stored bytes copied per second (medians), with every check
included. Then, for ``--load-seconds`` under a pgbench write load (two clients at full speed), the copy runs again and
again into one streamed target, as a ``pgdr_copy`` polling every half second would (production's
``full_page_writes = on``); for each WAL segment, the time from when the archive stored it to when the copy had it
(read back and checked) is sampled: ``copy_lag_under_load_s`` is their median, the least lag a copy can keep at that
write rate (a copy run on the backups' schedule adds that schedule's interval: the plan's ``pitr.copy_rpo`` bounds
it). S3 dates objects to the second, so a sample is exact to about a second.
Results are merged into bench/results/latest.json (quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))

from pgdr.postgres.binaries import bundled_bin_dir  # noqa: E402
from pitr import archive_endpoint, archiver_or_skip, archiving_server, load_pgbench  # noqa: E402

BUCKET = "pgdr-bench-copies"
SERVER = "bench"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="scale 14 instead of 135")
    parser.add_argument("--scale", type=int, help="pgbench scale (overrides --quick)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--load-seconds", type=int, help="length of the write load (default 120, 30 with --quick)")
    parser.add_argument("--output", type=Path, help="default: bench/results/latest.json (quick.json with --quick)")
    args = parser.parse_args(argv)
    scale = args.scale or (14 if args.quick else 135)
    load_s = args.load_seconds or (30 if args.quick else 120)
    output = args.output or ROOT / "bench" / "results" / ("quick.json" if args.quick else "latest.json")

    from pgdr.physical.archive import WalArchive
    from pgdr.physical.basebackup import take_base_backup
    from pgdr.physical.copies import copy_server
    from pgdr.physical.heartbeat import switch_and_wait_archived
    from pgdr.plan import PitrPolicy, ProtectedServer, StorageTarget
    from pgdr.storage.backends import S3Store
    from pgdr.storage.layout import PhysicalLayout

    bin_dir = archiver_or_skip("Copy benchmarks")
    if bin_dir is None:
        return
    work, moto, s3, access = archive_endpoint("bench-copies", BUCKET)
    _far_work, far_moto, far_s3, far_access = archive_endpoint("bench-copies-far", BUCKET)
    sides = {"primary": (s3, access), "far": (far_s3, far_access)}
    targets: dict[str, tuple[str, str]] = {}  # copy target name -> (side, bucket)

    def target(name: str, side: str) -> StorageTarget:
        """A new, empty copy target: a bucket of its own on ``side`` (same connection as the archive's or not)."""
        client = sides[side][0]
        client.create_bucket(Bucket=name)
        targets[name] = (side, name)
        return StorageTarget(
            name, "s3", bucket=name, prefix="pitr", aws_conn_id="archive" if side == "primary" else side
        )

    def opened(_server, chosen=None, _pruning=False):
        if chosen is None:
            return store, layout, archive
        side, bucket = targets[chosen.name]
        client, reach = sides[side]
        return S3Store(client, bucket), layout, WalArchive(bucket, layout, SERVER, reach)

    store = S3Store(s3, BUCKET)
    layout = PhysicalLayout("pitr")
    archive = WalArchive(BUCKET, layout, SERVER, access)
    res = SimpleNamespace(archive=opened)
    source_target = StorageTarget("archive", "s3", bucket=BUCKET, prefix="pitr", aws_conn_id="archive")
    # production's full_page_writes (the embedded default is off): the WAL rate the copy must follow
    server_pg, env, pg = archiving_server(work / "postgres", archive, bin_dir, full_page_writes="on")

    def protected(*copies: StorageTarget) -> ProtectedServer:
        return ProtectedServer(
            SERVER, "bench", PitrPolicy(source_target, keep_window=timedelta(days=7), copies=copies), ()
        )

    def copied_mb(copy_target: StorageTarget) -> float:
        return sum(o.size for o in opened(None, copy_target)[0].list("pitr/")) / 1e6

    runs: dict[str, list[float]] = {"inside_s3": [], "streamed": []}
    sizes: dict[str, list[float]] = {"inside_s3": [], "streamed": []}
    try:
        print(f"Creating pgbench data at scale {scale}...", flush=True)
        load_pgbench(env, scale)
        switch_and_wait_archived(pg, 3600)
        folder = work / "bb"
        folder.mkdir()
        record = take_base_backup(SERVER, pg, store, layout, folder, archive.url, None)
        switch_and_wait_archived(pg, 3600)
        wal_mb = sum(s.size for s in archive.segments(store)) / 1e6
        print(f"  base backup {record.size / 1e6:.0f} MB stored, WAL archive {wal_mb:.0f} MB", flush=True)

        for r in range(args.rounds):
            order = ("inside_s3", "streamed") if r % 2 == 0 else ("streamed", "inside_s3")
            for mode in order:
                name = f"copy-{mode.replace('_', '-')}-{r}"
                copy_target = target(name, "primary" if mode == "inside_s3" else "far")
                t = time.perf_counter()
                summary = copy_server(protected(copy_target), res, datetime.now(UTC))
                elapsed = time.perf_counter() - t
                done = summary["targets"][name]
                assert done["error"] is None and done["base_backups"] == [record.backup_id], summary
                stored = copied_mb(copy_target)
                runs[mode].append(elapsed)
                sizes[mode].append(stored)
                print(
                    f"  round {r + 1}, {mode}: {stored:.0f} MB ({done['wal_files']} WAL files and the base backup) "
                    f"in {elapsed:.1f}s = {stored / elapsed:.1f} MB/s",
                    flush=True,
                )

        print(f"Copy lag under a steady write load for {load_s}s (copied again and again, streamed)...", flush=True)
        follower = target("copy-follow", "far")
        server = protected(follower)
        copy_server(server, res, datetime.now(UTC))
        follower_store, _, follower_archive = opened(None, follower)
        seen = {s.name for s in follower_archive.segments(follower_store)}
        lag_samples, run_seconds, wal_files = [], [], 0
        load = subprocess.Popen(
            [str(bundled_bin_dir() / "pgbench"), "-c", "2", "-j", "2", "-T", str(load_s), "-n", "bench"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            while load.poll() is None:
                t = time.perf_counter()
                summary = copy_server(server, res, datetime.now(UTC))
                run_seconds.append(time.perf_counter() - t)
                copied = summary["targets"]["copy-follow"]["wal_files"]
                wal_files += copied
                if not copied:
                    time.sleep(0.5)  # nothing new: poll again, as a copy scheduled every half second would
                    continue
                present_at = datetime.now(UTC)  # each new segment: from stored in the archive to present in the copy
                archived = {s.name: s.stored_at for s in archive.segments(store)}
                for segment in follower_archive.segments(follower_store):
                    if segment.name not in seen and segment.name in archived:
                        seen.add(segment.name)
                        lag_samples.append((present_at - archived[segment.name]).total_seconds())
        finally:
            if load.poll() is None:
                load.terminate()
            _, err = load.communicate()
        if load.returncode not in (0, None):
            raise RuntimeError(f"pgbench failed: {err[-1000:]}")
    finally:
        server_pg.destroy()
        moto.stop()
        far_moto.stop()

    med = {k: statistics.median(v) for k, v in runs.items()}
    size = {k: statistics.median(v) for k, v in sizes.items()}
    results = {
        "copy_inside_s3_mb_s": round(size["inside_s3"] / med["inside_s3"], 1),
        "copy_streamed_mb_s": round(size["streamed"] / med["streamed"], 1),
        "copy_lag_under_load_s": round(statistics.median(lag_samples), 1) if lag_samples else None,
        "copies": {
            "pgbench_scale": scale,
            "rounds": args.rounds,
            "base_backup_stored_mb": round(record.size / 1e6, 1),
            "copied_mb": {k: round(v, 1) for k, v in size.items()},
            "medians_s": {k: round(v, 2) for k, v in med.items()},
            "runs_s": {k: [round(x, 2) for x in v] for k, v in runs.items()},
            "includes": "listing both sides, every WAL file and the base backup's files copied, each read back from "
            "the copy and compared by SHA-256 (inside S3: the source read again too), the record written last, "
            "retention on the copy",
            "lag_samples_s": [round(x, 1) for x in lag_samples],
            "lag_max_s": round(max(lag_samples), 1) if lag_samples else None,
            "copy_run_seconds_under_load": [round(x, 2) for x in run_seconds],
            "wal_files_copied_under_load": wal_files,
            "load_seconds": load_s,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    report = json.loads(output.read_text()) if output.exists() else {}
    report.update(results)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\npgdr copy benchmark: pgbench scale {scale}, medians of {args.rounds} rounds\n")
    for name in ("copy_inside_s3_mb_s", "copy_streamed_mb_s", "copy_lag_under_load_s"):
        print(f"{name:<30}{results[name]!s:>10}  (reported)")
    print(f"\nMerged into {output}")


if __name__ == "__main__":
    main()
