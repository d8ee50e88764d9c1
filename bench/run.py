"""pgdr's backup and restore against the raw PostgreSQL tools and against the seeds' method.

    make bench                        # about 2 GB of pgbench data (scale 135), 5 rounds
    make bench ARGS=--quick           # about 200 MB (scale 14), 5 rounds: the CI smoke run
    make bench ARGS="--partitions 8"  # pgbench_accounts in 8 partitions

All contenders run on the same machine, against the same embedded PostgreSQL 18 and the same
local S3 endpoint (moto's server over HTTP), alternating round by round, each after a CHECKPOINT
and a sync; medians are reported. The raw restore is also timed section by section (pre-data,
data, post-data), which shows what parallel jobs can win on the data at hand.

1. raw backup: ``pg_dump -Fd -j<J> -Z gzip:1`` (this build of pg_dump has no zstd or lz4) and a
   parallel boto3 upload of the files;
2. pgdr backup: :func:`pgdr.logical.backup.take_backup` (what the ``back_up`` task runs), with the plan's
   default compression, the same ``gzip:1``;
3. raw restore: parallel boto3 download and ``pg_restore -j<J>`` into a new database;
4. pgdr restore: :func:`verify_checksums`, :func:`download_backup` and :func:`restore_dump` (what
   ``check_checksums`` and ``restore_backup`` of pgdr_verify_restore run);
5. the seeds' method: ``pg_dump | gzip`` to one file and upload; download and ``gunzip | psql``;
   and pgdr's backup and restore again with client-side encryption (AES-256-GCM, a master key as
   a connection would hold it), against pgdr's unencrypted ones (``encrypted_*_ratio``);
6. peak RSS of a pgdr worker process (backup then restore) at two database sizes;
7. integrity checks and GX validation of a restored database with 100 tables;
8. the parse time of each DAG file (with Airflow already imported, as the DAG processor has it).
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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from pgdr.local.embedded import EmbeddedServer  # noqa: E402
from pgdr.postgres.binaries import bundled_bin_dir, free_port  # noqa: E402

BUCKET = "pgdr-bench"
JOBS = 2


def sh(cmd: str | list[str], env: dict, **kwargs) -> None:
    subprocess.run(cmd, env=env, check=True, shell=isinstance(cmd, str), **kwargs)


class Bench:
    def __init__(self, work: Path, scale: int, rounds: int):
        self.work, self.scale, self.rounds = work, scale, rounds
        self.server = EmbeddedServer(work / "postgres").start()
        from pgdr.storage.encryption import master_keys_from, new_master_key

        self.keys = master_keys_from("bench-key", new_master_key(), {}, "bench")
        self.env = {
            **os.environ,
            "PGPASSWORD": self.server.password,
            "PGHOST": "127.0.0.1",
            "PGPORT": str(self.server.port),
            "PGUSER": "postgres",
        }
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request log lines

        self.s3_port = free_port()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self.s3_port, verbose=False)
        self.moto.start()
        import boto3
        from botocore.config import Config

        self.s3 = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{self.s3_port}",
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
            config=Config(max_pool_connections=16, retries={"max_attempts": 3, "mode": "standard"}),
        )
        self.s3.create_bucket(Bucket=BUCKET)

    def bin(self, name: str) -> str:
        return str(bundled_bin_dir() / name)

    def psql(self, sql: str, db: str = "postgres") -> str:
        return subprocess.run(
            [self.bin("psql"), "-X", "-q", "-t", "-A", "-d", db, "-c", sql],
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    def create_pgbench(self, name: str, scale: int, partitions: int = 0) -> float:
        self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self.psql(f"CREATE DATABASE {name}")
        sh(
            [self.bin("pgbench"), "-i", "-q", "-s", str(scale), f"--partitions={partitions}", name],
            self.env,
            capture_output=True,
        )
        return int(self.psql(f"SELECT pg_database_size('{name}')")) / 1e6

    def settle(self) -> None:
        """Start every contender from the same state: no dirty buffers, no pending writeback.

        Without this the first contender of a round pays for the previous restore's 2 GB of
        writes still being flushed (a checkpoint, the kernel's writeback).
        """
        self.psql("CHECKPOINT")
        os.sync()

    def fresh_db(self, name: str) -> None:
        self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self.psql(f"CREATE DATABASE {name}")
        self.settle()

    # -- contenders --------------------------------------------------------------------------------
    def raw_backup(self, db: str, prefix: str) -> float:
        out = self.work / "raw-dump"
        shutil.rmtree(out, ignore_errors=True)
        self.settle()
        t = time.perf_counter()
        sh([self.bin("pg_dump"), "-d", db, "-Fd", f"-j{JOBS}", "-Z", "gzip:1", "-f", str(out)], self.env)
        with ThreadPoolExecutor(JOBS) as pool:
            list(pool.map(lambda p: self.s3.upload_file(str(p), BUCKET, f"{prefix}/{p.name}"), out.iterdir()))
        return time.perf_counter() - t

    def raw_restore(self, prefix: str, target: str) -> float:
        out = self.work / "raw-restore"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        self.fresh_db(target)
        t = time.perf_counter()
        keys = [o["Key"] for o in self.s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")["Contents"]]
        with ThreadPoolExecutor(JOBS) as pool:
            list(pool.map(lambda k: self.s3.download_file(BUCKET, k, str(out / k.rsplit("/", 1)[1])), keys))
        self.pg_restore(out, target)
        return time.perf_counter() - t

    def pg_restore(self, dump_dir: Path, target: str, *options: str) -> None:
        """The raw tools' restore: ``pg_restore -j`` of a directory archive into ``target``."""
        sh(
            [self.bin("pg_restore"), "-d", target, f"-j{JOBS}", "--no-owner", "--no-acl", *options, str(dump_dir)],
            self.env,
        )

    def restore_sections(self, target: str) -> dict[str, float]:
        """Time the raw restore's sections apart (the archive the last raw_restore downloaded).

        Where a restore's time goes tells what parallel jobs can win: ``data`` is one COPY per
        table, ``post_data`` one index or constraint build per job.
        """
        out = self.work / "raw-restore"
        self.fresh_db(target)
        times = {}
        for section in ("pre-data", "data", "post-data"):
            t = time.perf_counter()
            self.pg_restore(out, target, f"--section={section}")
            times[section.replace("-", "_")] = round(time.perf_counter() - t, 2)
        return times

    def pgdr_parts(self, db: str, encrypted: bool = False):
        from pgdr.plan import parse_plan
        from pgdr.postgres.client import PgEndpoint
        from pgdr.storage.backends import S3Store
        from pgdr.storage.layout import BackupLayout

        encryption = ", encryption: {key_conn_id: bench_key}" if encrypted else ""
        plan = parse_plan(
            f"storage: {{s3: {{type: s3, bucket: {BUCKET}, aws_conn_id: x}}}}\ndefaults: {{dump_jobs: "
            f"{JOBS}{encryption}}}\ndatabases: [{{name: {db}, conn_id: x}}]\n",
            Path("bench.yaml"),
        )
        endpoint = PgEndpoint("127.0.0.1", self.server.port, "postgres", db, self.server.password)
        return plan.databases[0], endpoint, S3Store(self.s3, BUCKET), BackupLayout(prefix="pgdr")

    def pgdr_backup(self, db: str, encrypted: bool = False):
        from pgdr.logical.backup import take_backup

        pdb, endpoint, store, layout = self.pgdr_parts(db, encrypted)
        work = Path(tempfile.mkdtemp(dir=self.work))
        self.settle()
        t = time.perf_counter()
        result = take_backup(pdb, endpoint, store, layout, work, keys=self.keys if encrypted else None)
        elapsed = time.perf_counter() - t
        shutil.rmtree(work, ignore_errors=True)
        return elapsed, result.manifest

    def pgdr_restore(self, db: str, manifest, target: str) -> float:
        from pgdr.logical.restore import download_backup, restore_dump, verify_checksums
        from pgdr.storage.encryption import unlock_backup

        _pdb, endpoint, store, _layout = self.pgdr_parts(db)
        self.fresh_db(target)
        work = Path(tempfile.mkdtemp(dir=self.work))
        t = time.perf_counter()
        data_key = unlock_backup(manifest, self.keys) if manifest.encryption else None  # as backup_data_key does
        verify_checksums(manifest, store, workers=JOBS, data_key=data_key)
        download_backup(manifest, store, work / "dump", workers=JOBS, data_key=data_key)
        restore_dump(endpoint.with_dbname(target), work / "dump", JOBS, work)
        elapsed = time.perf_counter() - t
        shutil.rmtree(work, ignore_errors=True)
        return elapsed

    def seed_backup(self, db: str, key: str) -> float:
        path = self.work / "seed.sql.gz"
        self.settle()
        t = time.perf_counter()
        sh(f"{self.bin('pg_dump')} -d {db} | gzip > {path}", self.env)
        self.s3.upload_file(str(path), BUCKET, key)
        return time.perf_counter() - t

    def seed_restore(self, key: str, target: str) -> float:
        path = self.work / "seed-restore.sql.gz"
        self.fresh_db(target)
        t = time.perf_counter()
        self.s3.download_file(BUCKET, key, str(path))
        sh(f"gunzip -c {path} | {self.bin('psql')} -X -q -v ON_ERROR_STOP=1 -d {target} > /dev/null", self.env)
        return time.perf_counter() - t

    # -- the other measurements ----------------------------------------------------------------------
    def peak_rss_mb(self, db: str) -> float:
        """Run a pgdr backup and restore in a child process; return its peak RSS in MB."""
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); import run as b; from pathlib import Path\nbench = "
            "b.Bench.__new__(b.Bench); bench.__dict__.update(b.attach(Path(sys.argv[2]), int(sys.argv[3]), "
            "int(sys.argv[4]), sys.argv[5]))\n_, m = bench.pgdr_backup(sys.argv[6]); "
            "bench.pgdr_restore(sys.argv[6], m, 'rss_restore')\nhwm = [l for l in open('/proc/self/status') if "
            "l.startswith('VmHWM:')][0].split()[1]\nprint(hwm)\n"
        )
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                code,
                str(Path(__file__).parent),
                str(self.work),
                str(self.server.port),
                str(self.s3_port),
                self.server.password,
                db,
            ],
            env=os.environ,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        # The worker process's own peak (VmHWM, kB). Not ru_maxrss: Linux carries the high-water mark
        # across fork and exec, so a child of this (large, moto-hosting) process would report ours.
        # pg_dump and pg_restore are separate programs with their own, small, footprints.
        return int(proc.stdout.strip().splitlines()[-1]) / 1024

    def validation_100_tables(self) -> float:
        from pgdr.checks.integrity import check_integrity
        from pgdr.checks.validation import validate_restored
        from pgdr.logical.backup import take_backup

        self.fresh_db("hundred")
        ddl = [
            "CREATE TABLE t000 (id int PRIMARY KEY, name text NOT NULL)",
            "INSERT INTO t000 SELECT g, 'row ' || g FROM generate_series(1, 1000) g",
        ]
        for i in range(1, 100):
            ddl.append(f"CREATE TABLE t{i:03d} (id int PRIMARY KEY, parent int REFERENCES t000, v numeric)")
            ddl.append(f"INSERT INTO t{i:03d} SELECT g, 1 + g % 1000, g * 0.5 FROM generate_series(1, 1000) g")
        self.psql("; ".join(ddl), "hundred")
        pdb, endpoint, store, layout = self.pgdr_parts("hundred")
        manifest = take_backup(pdb, endpoint, store, layout, Path(tempfile.mkdtemp(dir=self.work))).manifest
        self.pgdr_restore("hundred", manifest, "hundred_restored")
        target = endpoint.with_dbname("hundred_restored")
        import great_expectations  # noqa: F401 - its import (~5-14 s) is a one-off per worker, not per validation

        t = time.perf_counter()
        check_integrity(target, manifest, Path(tempfile.mkdtemp(dir=self.work)), JOBS)
        report = validate_restored(target, manifest)
        elapsed = time.perf_counter() - t
        assert report.ok and len({o.table for o in report.outcomes}) == 100, report.summary()
        return elapsed

    def empty_bucket(self) -> None:
        """Delete every object of the benchmark's bucket (moto keeps them in memory)."""
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.s3.delete_objects(Bucket=BUCKET, Delete={"Objects": keys, "Quiet": True})

    def close(self) -> None:
        self.moto.stop()
        self.server.stop()


def fresh_workdir(name: str) -> Path:
    """An empty work directory ``.pgdr/<name>`` the embedded servers' user may enter."""
    work = ROOT / ".pgdr" / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    work.chmod(0o755)
    return work


def attach(work: Path, pg_port: int, s3_port: int, password: str) -> dict:
    """Rebuild a Bench's state in a child process (for the RSS measurement)."""
    import boto3

    server = EmbeddedServer(work / "postgres", port=pg_port)
    server.password = password
    s3 = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{s3_port}",
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    )
    env = {**os.environ, "PGPASSWORD": password, "PGHOST": "127.0.0.1", "PGPORT": str(pg_port), "PGUSER": "postgres"}
    return {"work": work, "server": server, "s3": s3, "env": env, "s3_port": s3_port}


def dag_parse_times(warm: bool, repeats: int = 3) -> dict[str, float]:
    """Parse each DAG file in a fresh process that has already imported Airflow; the median of ``repeats``.

    ``warm``: Airflow's DAG-authoring modules (the task decorator, cron timetables) are loaded
    too, as they are in a DAG processor that has parsed any DAG before; they cost about 0.2 s
    once per process, whatever the DAG. Cold: only ``airflow.sdk`` is loaded.

    One interpreter imports that, then forks a child per parse (as Airflow's DAG processor does): the child is the
    fresh interpreter the measure asks for, without paying the import of Airflow again for each of the files.
    """
    preload = "import airflow.sdk, pendulum\n"
    if warm:
        preload += (
            "import airflow.providers.standard.decorators.python, "
            "airflow.sdk.definitions.timetables.trigger\nimport airflow.sdk.definitions.timetables.interval, "
            "airflow.sdk.definitions.decorators.setup_teardown\n"
        )
    code = preload + (
        "import os, runpy, sys, time\n"
        "repeats = int(sys.argv[1])\n"
        "for path in sys.argv[2:]:\n"
        "    for _ in range(repeats):\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            t = time.perf_counter(); runpy.run_path(path)\n"
        "            print(path, time.perf_counter() - t, flush=True); os._exit(0)\n"
        "        _, status = os.waitpid(pid, 0)\n"
        "        if status:\n"
        "            sys.exit(f'parsing {path} failed (wait status {status})')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "plugins"), "PGDR_PLAN": str(ROOT / "include" / "pgdr.yaml")}
    paths = [str(path) for path in sorted((ROOT / "dags").glob("*.py"))]
    result = subprocess.run([sys.executable, "-c", code, str(repeats), *paths], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"parsing the DAG files failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    runs: dict[str, list[float]] = {}
    parsed = set(paths)
    for line in result.stdout.splitlines():
        path, _, seconds = line.rpartition(" ")
        if path in parsed:
            runs.setdefault(Path(path).name, []).append(float(seconds))
    return {name: round(statistics.median(times), 3) for name, times in runs.items()}


def round_steps(bench: Bench, results: dict[str, list[float]], r: int) -> list:
    """Return one round's contenders in order: every backup, then every restore of what they wrote.

    Odd rounds run each half in reverse, so that no contender always comes first or last (the
    position in a round showed up to 10 % of difference in a run where the order was fixed).
    """
    made: dict[str, object] = {}

    def pgdr_backup(kind: str):
        def step():
            elapsed, made[kind] = bench.pgdr_backup("bench", encrypted=kind == "encrypted")
            results[f"{kind}_backup"].append(elapsed)

        return step

    def pgdr_restore(kind: str):
        return lambda: results[f"{kind}_restore"].append(bench.pgdr_restore("bench", made[kind], f"{kind}_restored"))

    backups = [
        lambda: results["raw_backup"].append(bench.raw_backup("bench", f"raw/{r}")),
        pgdr_backup("pgdr"),
        pgdr_backup("encrypted"),
        lambda: results["seed_backup"].append(bench.seed_backup("bench", f"seed/{r}.sql.gz")),
    ]
    restores = [
        lambda: results["raw_restore"].append(bench.raw_restore(f"raw/{r}", "raw_restored")),
        pgdr_restore("pgdr"),
        pgdr_restore("encrypted"),
        lambda: results["seed_restore"].append(bench.seed_restore(f"seed/{r}.sql.gz", "seed_restored")),
    ]
    if r % 2:
        backups.reverse()
        restores.reverse()
    return backups + restores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="about 200 MB instead of about 2 GB")
    parser.add_argument("--scale", type=int, help="pgbench scale (overrides --quick)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--partitions",
        type=int,
        default=0,
        help="split pgbench_accounts into this many partitions (pgbench -i --partitions): "
        "tables that parallel jobs can dump and restore side by side",
    )
    parser.add_argument("--output", type=Path, help="default: bench/results/latest.json (quick.json with --quick)")
    parser.add_argument("--load-seconds", type=int, help=argparse.SUPPRESS)  # bench/pitr.py's; not used here
    args = parser.parse_args(argv)
    scale = args.scale or (14 if args.quick else 135)
    output = args.output or ROOT / "bench" / "results" / ("quick.json" if args.quick else "latest.json")
    work = fresh_workdir("bench")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

    bench = Bench(work, scale, args.rounds)
    try:
        print(f"Creating pgbench data at scale {scale}...", flush=True)
        db_size = bench.create_pgbench("bench", scale, args.partitions)
        small_size = bench.create_pgbench("bench_small", max(1, scale // 4), args.partitions)
        print(f"  bench: {db_size:.0f} MB, bench_small: {small_size:.0f} MB", flush=True)
        results: dict[str, list[float]] = {
            k: []
            for k in (
                "raw_backup",
                "pgdr_backup",
                "raw_restore",
                "pgdr_restore",
                "seed_backup",
                "seed_restore",
                "encrypted_backup",
                "encrypted_restore",
            )
        }
        for r in range(args.rounds):
            for step in round_steps(bench, results, r):
                step()
            bench.empty_bucket()  # each round starts with the same (empty) object store
            print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in results.items()), flush=True)
        med = {k: statistics.median(v) for k, v in results.items()}
        sections = bench.restore_sections("sections_restored")
        print(f"  raw restore by section: {sections}", flush=True)
        print("Peak RSS of a pgdr worker at two sizes...", flush=True)
        rss = [round(bench.peak_rss_mb("bench_small"), 1), round(bench.peak_rss_mb("bench"), 1)]
        print("Validation of 100 tables...", flush=True)
        validation = bench.validation_100_tables()
        parse = dag_parse_times(warm=True, repeats=min(3, args.rounds))  # one each in CI's one-round smoke run
        parse_cold = dag_parse_times(warm=False, repeats=min(3, args.rounds))
    finally:
        bench.close()

    report = {
        "backup_ratio": round(med["pgdr_backup"] / med["raw_backup"], 3),
        "restore_ratio": round(med["pgdr_restore"] / med["raw_restore"], 3),
        "seed_speedup": round(
            (med["seed_backup"] + med["seed_restore"]) / (med["pgdr_backup"] + med["pgdr_restore"]), 2
        ),
        "encrypted_backup_ratio": round(med["encrypted_backup"] / med["pgdr_backup"], 3),
        "encrypted_restore_ratio": round(med["encrypted_restore"] / med["pgdr_restore"], 3),
        "peak_rss_mb": rss,
        "peak_rss_db_sizes_mb": [round(small_size), round(db_size)],
        "validation_100_tables_s": round(validation, 2),
        "dag_parse_s": parse,
        "dag_parse_cold_s": parse_cold,
        "db_size_mb": round(db_size),
        "pgbench_scale": scale,
        "pgbench_partitions": args.partitions,
        "rounds": args.rounds,
        "medians_s": {k: round(v, 2) for k, v in med.items()},
        "raw_restore_sections_s": sections,
        "runs_s": {k: [round(x, 2) for x in v] for k, v in results.items()},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    earlier = json.loads(output.read_text()) if output.exists() else {}  # bench/pitr.py and celery_fleet.py add theirs
    output.write_text(json.dumps({**earlier, **report}, indent=2) + "\n")
    targets = {
        "backup_ratio": report["backup_ratio"] <= 1.10,
        "restore_ratio": report["restore_ratio"] <= 1.10,
        "seed_speedup": report["seed_speedup"] >= 3,
        "peak_rss_mb": max(rss) < 300,
        "validation_100_tables_s": validation < 60,
        "dag_parse_s": max(parse.values()) < 0.3,
        "encrypted_backup_ratio": report["encrypted_backup_ratio"] <= 1.10,
        "encrypted_restore_ratio": report["encrypted_restore_ratio"] <= 1.10,
    }
    shape = f", pgbench_accounts in {args.partitions} partitions" if args.partitions else ""
    print(f"\npgdr benchmark: {db_size:.0f} MB of pgbench data{shape}, medians of {args.rounds} rounds\n")
    print(f"{'measure':<26}{'value':>14}  target")
    rows = [
        ("backup_ratio", report["backup_ratio"], "<= 1.10"),
        ("restore_ratio", report["restore_ratio"], "<= 1.10"),
        ("seed_speedup", report["seed_speedup"], ">= 3"),
        ("peak_rss_mb", rss, "< 300, flat"),
        ("validation_100_tables_s", report["validation_100_tables_s"], "< 60"),
        ("dag_parse_s", max(parse.values()), "< 0.3 (max)"),
        ("encrypted_backup_ratio", report["encrypted_backup_ratio"], "<= 1.10"),
        ("encrypted_restore_ratio", report["encrypted_restore_ratio"], "<= 1.10"),
    ]
    for name, value, target in rows:
        print(f"{name:<26}{str(value):>14}  {target}  {'ok' if targets[name] else 'MISSED'}")
    print(f"  (dag_parse_s cold, in an interpreter that has parsed no DAG yet: max {max(parse_cold.values()):.3f}s)")
    for k, v in med.items():
        print(f"  {k:<24}{v:>14.2f}s")
    print(f"\nWritten to {output}")


if __name__ == "__main__":
    main()
