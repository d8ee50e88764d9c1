"""What a backup costs production: latency of a steady load on the primary while backups run (#31 item 4).

    .venv/bin/python bench/prod_impact.py            # the 2 GB pgbench database, 3 rounds, 60 s a phase
    .venv/bin/python bench/prod_impact.py --quick    # about 200 MB, 1 round, 20 s a phase (a smoke run)

A fixed-rate pgbench load (``pgbench -R``: the TPC-B-like script, 4 clients) runs on the primary, and each phase
records every transaction's latency (``pgbench --log``) for ``--seconds``:

1. ``idle``: the load alone;
2. ``raw_dump``: ``pg_dump -Fd -j2 -Z gzip:1`` on the primary, over and over while the phase lasts;
3. ``pgdr_backup``: :func:`pgdr.logical.backup.take_backup` on the primary (dump, counts, SHA-256, upload to the
   local S3 endpoint, manifest), over and over;
4. ``pgdr_standby``: the same backup taken from a streaming replica of the primary (``source_conn_id``);
5. ``pgdr_basebackup``: :func:`pgdr.physical.basebackup.take_base_backup` of the primary (a full one: fast
   checkpoint, ``pg_basebackup`` gzip:1, SHA-256, upload), over and over;
6. ``pgdr_basebackup_standby``: the same base backup read on the replica (a server's ``source_conn_id``).

The primary runs as a PITR server does in production: ``full_page_writes = on`` and its WAL archived by
barman-cloud to the same S3 endpoint, in every phase.

Phases alternate in order round by round; medians over rounds are reported. Separately, with no load, the blocks
each contender reads on the source (``pg_stat_database.blks_read + blks_hit`` of its database, before and after one
run) show that pgdr reads every table once, as pg_dump does. Results go to ``prod_impact`` in the output file (by
default ``results/latest.json``, other keys kept). On this machine (2 cores) the worker, the S3 endpoint and both
servers share the CPUs: a backup's own compression and upload compete with the load, which a production worker on
another host would not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench_run  # noqa: E402

ROOT = bench_run.ROOT
PHASES = ("idle", "raw_dump", "pgdr_backup", "pgdr_standby", "pgdr_basebackup", "pgdr_basebackup_standby")
SERVER, PITR_PREFIX = "impact", "impact-pitr"
DB = "impact"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Impact:
    def __init__(self, bench: bench_run.Bench, seconds: int, rate: int):
        from pgdr.local.embedded import EmbeddedServer
        from pgdr.physical.archive import ArchiveAccess, WalArchive, archiver_bin_dir
        from pgdr.postgres.client import PgEndpoint
        from pgdr.storage.layout import PhysicalLayout

        self.bench, self.seconds, self.rate = bench, seconds, rate
        # The primary archives its WAL (base backups need it) with production's full_page_writes (a base backup on
        # a standby needs it): restarted with those settings before its replica is made.
        access = ArchiveAccess(f"http://127.0.0.1:{bench.s3_port}", "us-east-1", "bench", "bench")
        self.layout = PhysicalLayout(PITR_PREFIX)
        self.archive = WalArchive(bench_run.BUCKET, self.layout, SERVER, access)
        bench.server.settings = {**self.archive.server_settings(60, archiver_bin_dir()), "full_page_writes": "on"}
        bench.server.environment = access.environment()
        bench.server.start()
        self.replica = EmbeddedServer.replica_of(bench.server, bench.work / "replica")
        self.standby = PgEndpoint("127.0.0.1", self.replica.port, "postgres", DB, self.replica.password)

    def load(self, log_dir: Path) -> subprocess.Popen:
        """Start the fixed-rate load for one phase; its per-transaction log goes to ``log_dir``."""
        log_dir.mkdir(parents=True)
        return subprocess.Popen(
            [
                self.bench.bin("pgbench"),
                "-n",
                "-c4",
                "-j2",
                f"-R{self.rate}",
                f"-T{self.seconds}",
                "--log",
                f"--log-prefix={log_dir}/tx",
                DB,
            ],
            env=self.bench.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    @staticmethod
    def latencies_ms(log_dir: Path) -> list[float]:
        """Every transaction's latency (ms) from pgbench's logs: ``client tx time_us script epoch epoch_us [lag]``."""
        values = []
        for path in log_dir.iterdir():
            for line in path.read_text().splitlines():
                fields = line.split()
                if len(fields) >= 6 and fields[2].isdigit():
                    values.append(int(fields[2]) / 1000)
        return values

    def contender(self, phase: str):
        """The work of ``phase``, run once (None: the idle phase)."""
        if phase == "raw_dump":
            out = self.bench.work / "impact-raw"

            def raw():
                shutil.rmtree(out, ignore_errors=True)
                bench_run.sh(
                    [self.bench.bin("pg_dump"), "-d", DB, "-Fd", "-j2", "-Z", "gzip:1", "-f", str(out)], self.bench.env
                )

            return raw
        if phase in ("pgdr_backup", "pgdr_standby"):
            from pgdr.logical.backup import take_backup

            db, primary, store, layout = self.bench.pgdr_parts(DB)

            def pgdr():
                work = Path(tempfile.mkdtemp(dir=self.bench.work))
                try:
                    if phase == "pgdr_standby":
                        take_backup(db, self.standby, store, layout, work, primary=primary)
                    else:
                        take_backup(db, primary, store, layout, work)
                finally:
                    shutil.rmtree(work, ignore_errors=True)

            return pgdr
        if phase in ("pgdr_basebackup", "pgdr_basebackup_standby"):
            from pgdr.logical.standby import BackupSource
            from pgdr.physical.basebackup import take_base_backup
            from pgdr.storage.backends import S3Store

            primary = self.bench.pgdr_parts(DB)[1].with_dbname("postgres")
            standby = self.standby.with_dbname("postgres")
            source = BackupSource(standby, primary, 0.0) if phase == "pgdr_basebackup_standby" else None
            store = S3Store(self.bench.s3, bench_run.BUCKET)

            def base():
                work = Path(tempfile.mkdtemp(dir=self.bench.work))
                try:
                    take_base_backup(SERVER, primary, store, self.layout, work, self.archive.url, source=source)
                finally:
                    shutil.rmtree(work, ignore_errors=True)

            return base
        return None

    def phase(self, phase: str, r: int) -> dict:
        """Run one phase: the load, and its contender over and over until the load ends."""
        self.bench.settle()
        log_dir = self.bench.work / "impact-logs" / f"{r}-{phase}"
        shutil.rmtree(log_dir, ignore_errors=True)
        work = self.contender(phase)
        load = self.load(log_dir)
        runs, stop = [], threading.Event()

        def repeat():
            time.sleep(2)  # the load reaches its rate first
            while not stop.is_set() and load.poll() is None:
                t = time.perf_counter()
                work()
                runs.append(time.perf_counter() - t)

        worker = threading.Thread(target=repeat) if work else None
        if worker:
            worker.start()
        _, stderr = load.communicate()
        stop.set()
        if worker:
            worker.join()
        if load.returncode != 0:
            raise RuntimeError(f"pgbench failed: {stderr[-2000:]}")
        latencies = self.latencies_ms(log_dir)
        return {
            "tps": round(len(latencies) / self.seconds, 1),
            "p50_ms": round(percentile(latencies, 0.50), 2),
            "p99_ms": round(percentile(latencies, 0.99), 2),
            "contender_runs": len(runs),
            "contender_s": [round(x, 1) for x in runs],
        }

    def blocks_read(self, phase: str) -> int:
        """Blocks (read + hit) the source database serves for one run of ``phase``'s contender, with no load."""
        work = self.contender(phase)
        sql = f"SELECT blks_read + blks_hit FROM pg_stat_database WHERE datname = '{DB}'"
        self.bench.psql("SELECT pg_stat_force_next_flush()", DB)
        before = int(self.bench.psql(sql))
        work()
        time.sleep(1.5)  # backends flush their statistics at most once a second
        self.bench.psql("SELECT pg_stat_force_next_flush()", DB)
        return int(self.bench.psql(sql)) - before

    def close(self) -> None:
        self.replica.destroy()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="about 200 MB, 1 round, 20 s a phase")
    parser.add_argument("--scale", type=int, help="pgbench scale (overrides --quick)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--seconds", type=int, help="length of each phase (default 60; 20 with --quick)")
    parser.add_argument("--rate", type=int, default=200, help="the load's transactions per second (pgbench -R)")
    parser.add_argument("--output", type=Path, help="default: results/latest.json (quick.json with --quick)")
    args = parser.parse_args(argv)
    scale = args.scale or (14 if args.quick else 135)
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (20 if args.quick else 60)
    output = args.output or ROOT / "bench" / "results" / ("quick.json" if args.quick else "latest.json")
    work = bench_run.fresh_workdir("bench-impact")

    bench = bench_run.Bench(work, scale, rounds)
    impact = None
    try:
        print(f"Creating pgbench data at scale {scale}...", flush=True)
        size = bench.create_pgbench(DB, scale)
        print(f"  {DB}: {size:.0f} MB; making a streaming replica...", flush=True)
        impact = Impact(bench, seconds, args.rate)
        results: dict[str, list[dict]] = {phase: [] for phase in PHASES}
        for r in range(rounds):
            for phase in PHASES if r % 2 == 0 else (PHASES[0], *reversed(PHASES[1:])):
                results[phase].append(impact.phase(phase, r))
                got = results[phase][-1]
                print(f"  round {r + 1} {phase}: {got['tps']} tps, p50 {got['p50_ms']} ms, p99 {got['p99_ms']} ms")
            bench.empty_bucket()
        print("Blocks read on the source, one run each, no load...", flush=True)
        blocks = {phase: impact.blocks_read(phase) for phase in ("raw_dump", "pgdr_backup")}
        bench.settle()
    finally:
        if impact:
            impact.close()
        bench.close()

    med = {
        phase: {key: round(statistics.median(run[key] for run in runs), 2) for key in ("tps", "p50_ms", "p99_ms")}
        for phase, runs in results.items()
    }
    idle_p99 = med["idle"]["p99_ms"]
    raw_rise = med["raw_dump"]["p99_ms"] - idle_p99
    report = {
        "db_size_mb": round(size),
        "pgbench_scale": scale,
        "rounds": rounds,
        "phase_seconds": seconds,
        "load": f"pgbench TPC-B-like, 4 clients, -R {args.rate}",
        "medians": med,
        # pgdr's rise of p99 over idle against the raw pg_dump's (goal <= 1.10)
        "p99_rise_vs_raw_dump": round((med["pgdr_backup"]["p99_ms"] - idle_p99) / raw_rise, 3)
        if raw_rise > 0
        else None,
        # the primary's p99 while the backup runs on the standby, against idle (goal <= 1.05)
        "standby_p99_vs_idle": round(med["pgdr_standby"]["p99_ms"] / idle_p99, 3),
        # the same for base backups: on the primary, and read on the standby
        "basebackup_p99_vs_idle": round(med["pgdr_basebackup"]["p99_ms"] / idle_p99, 3),
        "basebackup_standby_p99_vs_idle": round(med["pgdr_basebackup_standby"]["p99_ms"] / idle_p99, 3),
        "blocks_read": blocks,
        "blocks_vs_raw_dump": round(blocks["pgdr_backup"] / blocks["raw_dump"], 3),
        "runs": results,
        "machine": f"{os.cpu_count()} cores",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    data = json.loads(output.read_text()) if output.exists() else {}
    data["prod_impact"] = report
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
