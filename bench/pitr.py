"""Point-in-time recovery benchmarks: base backups, incrementals, PITR restore, and the RPO achieved under load.

    make bench                 # after bench/run.py: about 2 GB of pgbench data (scale 135)
    make bench ARGS=--quick    # about 200 MB (scale 14): the CI smoke run

An embedded PostgreSQL 18 archives its WAL with barman-cloud (``archive_command``) to moto's S3
server over HTTP, with ``archive_timeout = 60s``, as ``make demo`` configures it. Each contender
starts after the archive has caught up, a CHECKPOINT and a sync; medians are reported, and the
results are merged into the same JSON file as bench/run.py's.

1. full base backup: raw ``pg_basebackup -Ft -X none -c fast -Z gzip:1 --manifest-checksums=SHA256``
   to local disk plus a parallel boto3 upload (how pgdr took it until 2026-12), against
   :func:`pgdr.physical.basebackup.take_base_backup` (``basebackup_ratio``, goal <= 1.10; now the tar on stdout,
   zstd and the manifest check in one pass: :mod:`pgdr.physical.tarstream`);
2. incremental base backup after 1 % of pgbench_accounts' rows changed, against a full one: the newest rows
   (``incremental_speedup``, goal >= 10), and every hundredth row, about every other page
   (``incremental_speedup_spread``, reported);
3. PITR restore to a ready, promoted scratch cluster (one pass of download, SHA-256, zstd, extract and the check
   against PostgreSQL's manifest; combine; recover to the end of the archive) against the seeds' restore,
   ``gunzip | psql`` of a plain dump into a new database (``pitr_restore_speedup_vs_seed``, goal >= 3);
   Beside both, in the same rounds (order alternated), the best peer in its best mode: ``barman-cloud-backup --lz4
   --immediate-checkpoint -J 2`` (``basebackup_vs_barman``, goal <= 1.0), and its restore, ``barman-cloud-restore``
   then the same recovery step as pgdr's (``pitr_restore_vs_barman``, goal <= 1.0);
4. whole-server recovery onto "this host" with ``recover-server``'s code (plan, place, replay to the
   end of the archive, proof, hand-over restart): ``server_recovery_s`` with the default proof (``quick``:
   ``pg_amcheck --checkunique`` of every page, counts, sequences, the plan's suites), against the peer's
   counterpart, item 3's barman-cloud-restore and replay, which proves nothing (``server_recovery_vs_peer``, goal
   <= 1.2); in the same rounds (order alternated) with ``recovery_proof: thorough`` (``--heapallindexed`` and
   pgdr's baseline expectations, as ``pgdr_verify_pitr`` proves each chain): ``server_recovery_thorough_vs_peer``
   (reported);
5. one database as of a moment (the incident restore's point-in-time path): the server recovered to the end
   of the archive, the database dumped from it and restored into another server, streamed from the worker's
   disk while the evidence copy is uploaded (``database_as_of_s``), against the path before, through the bucket
   (``database_as_of_vs_bucket``, goal <= 0.6), and about the least any logical path could take here, ``pg_dump |
   pg_restore`` overlapped with nothing stored or checked (``database_as_of_floor_vs_bucket``, reported);
6. under a steady pgbench write load (2 clients at full speed, the server's own limit): every
   5 s, the data a server loss would cost at that moment: now minus the last commit in the newest
   archived WAL segment (``rpo_achieved_s``, goal <= 60), and the time since the archiver last
   shipped a segment (``wal_archive_lag_s``).
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
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from pgdr.local.embedded import EmbeddedServer  # noqa: E402
from pgdr.postgres.binaries import bundled_bin_dir, free_port  # noqa: E402

BUCKET = "pgdr-bench-pitr"
SERVER = "bench"
KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="about 200 MB instead of about 2 GB")
    parser.add_argument("--scale", type=int, help="pgbench scale (overrides --quick)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--load-seconds", type=int, help="length of the write load for the RPO (default 150, 40 with --quick)"
    )
    parser.add_argument("--output", type=Path, help="default: bench/results/latest.json (quick.json with --quick)")
    parser.add_argument("--partitions", type=int, default=0, help=argparse.SUPPRESS)  # bench/run.py's; not used here
    args = parser.parse_args(argv)
    scale = args.scale or (14 if args.quick else 135)
    load_s = args.load_seconds or (40 if args.quick else 150)
    output = args.output or ROOT / "bench" / "results" / ("quick.json" if args.quick else "latest.json")

    from pgdr.physical.archive import WalArchive
    from pgdr.physical.basebackup import take_base_backup
    from pgdr.physical.catalog import BaseBackupCatalog
    from pgdr.postgres.client import PgEndpoint
    from pgdr.storage.backends import S3Store
    from pgdr.storage.layout import PhysicalLayout

    bin_dir = archiver_or_skip("PITR benchmarks")
    if bin_dir is None:
        return
    work, moto, s3, access = archive_endpoint("bench-pitr", BUCKET)
    store = S3Store(s3, BUCKET)
    layout = PhysicalLayout("pitr")
    archive = WalArchive(BUCKET, layout, SERVER, access)
    server, env, pg = archiving_server(work / "postgres", archive, bin_dir)
    # The seeds restore onto a server of their own: a 2 GB COPY into the archiving server would put 2 GB of
    # WAL into the archive, which every later PITR restore would then replay.
    seed_server = EmbeddedServer(work / "postgres-seed").start()
    seed_env = {**env, "PGPASSWORD": seed_server.password, "PGPORT": str(seed_server.port)}
    catalog = BaseBackupCatalog(store, layout, SERVER)

    def psql(sql: str, db: str = "postgres", on=None) -> str:
        return run_psql(on or env, sql, db)

    def settle() -> float:
        return settle_archive(pg, env)

    def raw_basebackup(i: int) -> float:
        out = work / "raw-bb"
        shutil.rmtree(out, ignore_errors=True)
        settle()
        t = time.perf_counter()
        subprocess.run(
            [
                str(bundled_bin_dir() / "pg_basebackup"),
                "-D",
                str(out),
                "-Ft",
                "-X",
                "none",
                "-c",
                "fast",
                "-Z",
                "gzip:1",
                "--manifest-checksums=SHA256",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: s3.upload_file(str(p), BUCKET, f"raw/{i}/{p.name}"), sorted(out.iterdir())))
        return time.perf_counter() - t

    def peer_basebackup(r: int) -> float:
        settle()
        return peer_backup(bin_dir, access, env, server.port, f"peer-{r}")

    def peer_restore(r: int, name: str) -> tuple[float, dict]:
        settle()
        return peer_restore_and_recover(bin_dir, access, archive, store, name, work / f"peer-cluster-{r}", newest)

    def pgdr_basebackup(parent=None) -> tuple[float, object]:
        folder = work / "pgdr-bb"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        settle()
        t = time.perf_counter()
        record = take_base_backup(SERVER, pg, store, layout, folder, archive.url, parent)
        return time.perf_counter() - t, record

    try:
        print(f"Creating pgbench data at scale {scale}...", flush=True)
        load_pgbench(env, scale)
        db_size = int(psql("SELECT pg_database_size('bench')")) / 1e6
        catch_up = settle()
        print(f"  {db_size:.0f} MB; the archive caught up with the load's WAL in {catch_up:.1f}s", flush=True)

        runs: dict[str, list[float]] = {
            "raw_basebackup": [],
            "pgdr_full": [],
            "pgdr_incremental": [],
            "pitr_restore": [],
            "seed_restore": [],
            "barman_lz4_backup": [],
            "barman_lz4_restore": [],
        }
        records = []
        for r in range(args.rounds):
            runs["raw_basebackup"].append(raw_basebackup(r))
            if r % 2:  # the peer first in odd rounds: neither always finds the other's pages in the cache
                runs["barman_lz4_backup"].append(peer_basebackup(r))
            elapsed, record = pgdr_basebackup()
            runs["pgdr_full"].append(elapsed)
            records.append(record)
            if not r % 2:
                runs["barman_lz4_backup"].append(peer_basebackup(r))
            # 1 % of the rows, the newest ones (as an application's recent data changes): 1 % of the pages.
            # Scattered over the table (WHERE aid % 100 = 0) the same 1 % touches every other page: see the README.
            psql(
                f"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid > {scale * 100000 * 99 // 100}", "bench"
            )
            elapsed, _ = pgdr_basebackup(catalog.get(record.backup_id))
            runs["pgdr_incremental"].append(elapsed)
            print(
                f"  round {r + 1}: raw {runs['raw_basebackup'][-1]:.1f}s, pgdr full {runs['pgdr_full'][-1]:.1f}s, "
                f"barman-cloud-backup --lz4 -J 2 {runs['barman_lz4_backup'][-1]:.1f}s, "
                f"incremental {runs['pgdr_incremental'][-1]:.1f}s",
                flush=True,
            )
        peer_stored_mb = sum(o.size for o in store.list("peer/") if "/base/" in o.key) / 1e6 / args.rounds

        print("PITR restore against the seeds' gunzip | psql...", flush=True)
        seed = work / "seed.sql.gz"
        subprocess.run(f"{bundled_bin_dir() / 'pg_dump'} -d bench | gzip > {seed}", shell=True, env=env, check=True)
        s3.upload_file(str(seed), BUCKET, "seed/bench.sql.gz")
        seed.unlink()
        newest = [e for e in catalog.backups() if e.record.kind == "full"][-1]  # the newest full one, and
        psql("UPDATE pgbench_branches SET bbalance = bbalance + 1", "bench")  # a little WAL to replay after it
        phases: list[dict] = []
        peer_phases: list[dict] = []
        peer_own_phases: list[dict] = []
        runs["barman_lz4_restore_own_replay"] = []
        for r in range(args.rounds):
            if r % 2:
                seconds, timings = peer_restore(r, f"peer-{args.rounds - 1}")
                runs["barman_lz4_restore"].append(seconds)
                peer_phases.append(timings)
            settle()
            seconds, timings = peer_restore_own_replay(
                bin_dir, access, archive, f"peer-{args.rounds - 1}", work / f"peer-own-{r}", newest
            )
            runs["barman_lz4_restore_own_replay"].append(seconds)
            peer_own_phases.append(timings)
            settle()
            cluster, seconds, timings = recover_scratch(work / f"cluster-{r}", catalog, newest, store, archive)
            runs["pitr_restore"].append(seconds)
            phases.append(timings)
            cluster.destroy()
            if not r % 2:
                seconds, timings = peer_restore(r, f"peer-{args.rounds - 1}")
                runs["barman_lz4_restore"].append(seconds)
                peer_phases.append(timings)
            psql("DROP DATABASE IF EXISTS seed_restored WITH (FORCE)", on=seed_env)
            psql("CREATE DATABASE seed_restored", on=seed_env)
            psql("CHECKPOINT", on=seed_env)
            os.sync()
            t = time.perf_counter()
            s3.download_file(BUCKET, "seed/bench.sql.gz", str(seed))
            subprocess.run(
                f"gunzip -c {seed} | {bundled_bin_dir() / 'psql'} -X -q -v ON_ERROR_STOP=1 -d seed_restored > "
                "/dev/null",
                shell=True,
                env=seed_env,
                check=True,
            )
            runs["seed_restore"].append(time.perf_counter() - t)
            seed.unlink()
            print(
                f"  round {r + 1}: PITR restore {runs['pitr_restore'][-1]:.1f}s {phases[-1]}, barman-cloud-restore "
                f"and the same recovery {runs['barman_lz4_restore'][-1]:.1f}s {peer_phases[-1]}, with its own "
                f"restore_command {runs['barman_lz4_restore_own_replay'][-1]:.1f}s {peer_own_phases[-1]}, seed "
                f"restore {runs['seed_restore'][-1]:.1f}s",
                flush=True,
            )
        psql("DROP DATABASE IF EXISTS seed_restored WITH (FORCE)", on=seed_env)
        chain_tip = catalog.backups()[-1]  # an incremental one: the chain full -> incremental, combined
        settle()
        cluster, seconds, timings = recover_scratch(work / "cluster-chain", catalog, chain_tip, store, archive)
        chain_restore = {
            "seconds": round(seconds, 2),
            "chain": [e.backup_id for e in catalog.chain(chain_tip)],
            **timings,
        }
        cluster.destroy()
        print(f"  an incremental chain: {chain_restore}", flush=True)

        print("Whole-server recovery onto this host (python -m pgdr recover-server's code)...", flush=True)
        server_phases, server_checks = {"quick": [], "thorough": []}, {"quick": [], "thorough": []}
        before_checks = {"quick": "server_recovery_before_checks", "thorough": "server_recovery_thorough_before_checks"}
        for key in ("server_recovery", "server_recovery_thorough", *before_checks.values(), "peer_as_server"):
            runs[key] = []
        peer_server_phases = []
        for r in range(args.rounds):
            for level in ("peer", "quick", "thorough") if r % 2 == 0 else ("thorough", "quick", "peer"):
                settle()
                if level == "peer":
                    elapsed, timings = peer_restore_as_server(
                        bin_dir,
                        access,
                        archive,
                        store,
                        f"peer-{args.rounds - 1}",
                        work / f"peer-server-{r}",
                        newest,
                        pg,
                    )
                    runs["peer_as_server"].append(elapsed)
                    peer_server_phases.append(timings)
                    print(
                        f"  round {r + 1}, the peer restored and replayed as a server: {elapsed:.1f}s {timings}",
                        flush=True,
                    )
                    continue
                elapsed, report = recover_whole_server(work / f"whole-{r}-{level}", store, layout, archive, pg, level)
                runs["server_recovery" if level == "quick" else "server_recovery_thorough"].append(elapsed)
                phase = report["phase_seconds"]
                server_phases[level].append(phase)
                runs[before_checks[level]].append(elapsed - phase["checks"] - phase["hand_over"])
                checked = report["proof"]["databases"]["bench"]["integrity"]["seconds"]
                server_checks[level].append({k: round(v, 2) for k, v in checked.items()})
                print(
                    f"  round {r + 1}, {level} proof: {elapsed:.1f}s {phase} checks {server_checks[level][-1]}",
                    flush=True,
                )

        print("A database as of a moment: restored beside the upload, against through the bucket...", flush=True)
        seed_pg = PgEndpoint("127.0.0.1", seed_server.port, "postgres", "postgres", seed_server.password)
        as_of = measure_database_as_of(args.rounds, work, catalog, newest, store, archive, seed_pg, settle)
        runs["database_as_of"] = as_of["streamed_total"]
        runs["database_as_of_via_bucket"] = as_of["via_bucket_total"]
        runs["database_as_of_floor"] = as_of["floor_total"]

        # The same 1 % of the rows spread over the table (every hundredth row: about every other page), each round on
        # the newest backup (after the recoveries above, so that they met the chain they always met).
        print("Incremental base backups after 1 % of the rows changed, spread over the table...", flush=True)
        runs["pgdr_incremental_spread"] = []
        for r in range(args.rounds):
            psql("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 100 = 0", "bench")
            elapsed, _ = pgdr_basebackup(catalog.backups()[-1])
            runs["pgdr_incremental_spread"].append(elapsed)
            print(f"  round {r + 1}: incremental (spread) {elapsed:.2f}s", flush=True)

        print(f"RPO under a steady write load for {load_s}s...", flush=True)
        rpo, lag, load_tps = measure_rpo(server, env, archive, store, load_s)
    finally:
        server.destroy()
        seed_server.destroy()
        moto.stop()

    med = {k: statistics.median(v) for k, v in runs.items()}
    results = {
        "basebackup_ratio": round(med["pgdr_full"] / med["raw_basebackup"], 3),
        "incremental_speedup": round(med["pgdr_full"] / med["pgdr_incremental"], 2),
        "incremental_speedup_spread": round(med["pgdr_full"] / med["pgdr_incremental_spread"], 2),
        "pitr_restore_speedup_vs_seed": round(med["seed_restore"] / med["pitr_restore"], 2),
        "basebackup_vs_barman": round(med["pgdr_full"] / med["barman_lz4_backup"], 3),
        "pitr_restore_vs_barman": round(med["pitr_restore"] / med["barman_lz4_restore"], 3),
        # the names for the same two ratios (the peer: barman-cloud in its best mode, --lz4 -J 2)
        "basebackup_vs_peer": round(med["pgdr_full"] / med["barman_lz4_backup"], 3),
        "pitr_restore_vs_peer": round(med["pitr_restore"] / med["barman_lz4_restore"], 3),
        "basebackup_stored_vs_peer": round(records[-1].size / 1e6 / peer_stored_mb, 3),
        "server_recovery_s": round(med["server_recovery"], 2),
        # the goal (#28): within 1.2x the peer's restore + replay; pgdr's also proves every database
        "server_recovery_vs_peer": round(med["server_recovery"] / med["barman_lz4_restore"], 3),
        "server_recovery_vs_peer_as_server": round(med["server_recovery"] / med["peer_as_server"], 3),
        # the peer replaying with its own restore_command (barman-cloud-wal-restore --parallel --spool-dir)
        "server_recovery_vs_peer_own_replay": round(med["server_recovery"] / med["barman_lz4_restore_own_replay"], 3),
        "server_recovery_thorough_s": round(med["server_recovery_thorough"], 2),
        "server_recovery_thorough_vs_peer": round(med["server_recovery_thorough"] / med["barman_lz4_restore"], 3),
        "server_recovery_before_checks_vs_peer": round(
            med["server_recovery_before_checks"] / med["barman_lz4_restore"], 3
        ),
        "server_recovery_thorough_before_checks_vs_peer": round(
            med["server_recovery_thorough_before_checks"] / med["barman_lz4_restore"], 3
        ),
        "database_as_of_s": round(med["database_as_of"], 2),
        "database_as_of_vs_bucket": round(med["database_as_of"] / med["database_as_of_via_bucket"], 3),
        "database_as_of_floor_vs_bucket": round(med["database_as_of_floor"] / med["database_as_of_via_bucket"], 3),
        "rpo_achieved_s": round(statistics.median(rpo), 1),
        "wal_archive_lag_s": round(statistics.median(lag), 1),
        "pitr": {
            "db_size_mb": round(db_size),
            "pgbench_scale": scale,
            "rounds": args.rounds,
            "archive_timeout_s": 60,
            "medians_s": {k: round(v, 2) for k, v in med.items()},
            "runs_s": {k: [round(x, 2) for x in v] for k, v in runs.items()},
            "full_base_backup_stored_mb": round(records[-1].size / 1e6, 1),
            "barman_lz4_backup_stored_mb": round(peer_stored_mb, 1),
            "barman_lz4_restore_phases_s": peer_phases,
            "barman_lz4_restore_own_replay_phases_s": peer_own_phases,
            "barman_peer_own_replay": "barman_lz4_restore_own_replay: the same barman-cloud-restore, then the replay "
            "with the peer's own restore_command in its best configuration (barman-cloud-wal-restore --parallel 8 "
            "--spool-dir, CloudNativePG's), started for every file PostgreSQL asks for",
            "barman_peer": "barman-cloud-backup --lz4 --immediate-checkpoint -J 2 (its best mode; its default is "
            "uncompressed), restored with barman-cloud-restore, then pgdr's recovery step (restore_command, replay to "
            "the end of the archive, promotion); no checksum check of the stored backup, unlike pgdr's",
            "pitr_restore_phases_s": phases,
            "pitr_restore_incremental_chain": chain_restore,
            "server_recovery_phases_s": server_phases,
            "server_recovery_checks_s": server_checks,
            "peer_as_server_phases_s": peer_server_phases,
            "server_recovery_includes": "plan, one pass of download + SHA-256 + zstd + extract with every file "
            "checked against PostgreSQL's manifest, move into the data "
            "directory, replay to the end of the archive, heartbeat proof, the proof of the bench database as a "
            "non-superuser, hand-over restart in its own configuration. Proof quick (server_recovery, the default): "
            "pg_amcheck --checkunique beside exact row counts and sequences (the bench plan has no suite); thorough "
            "(server_recovery_thorough, as pgdr_verify_pitr): pg_amcheck --heapallindexed --checkunique beside the "
            "counts, sequences and pgdr's baseline expectations. server_recovery_before_checks and "
            "server_recovery_thorough_before_checks: each depth's rounds up to its proof",
            "database_as_of_phases_s": as_of["phases"],
            "database_as_of_includes": "recovery of the server to the end of the archive in a scratch cluster, then "
            "pg_dump -Fd -j 2 of the bench database and pg_restore -j 2 into another server; streamed: pg_restore "
            "reads the dump from the worker's disk while it is uploaded (SHA-256) as the evidence copy; via the "
            "bucket (the path before): upload, SHA-256 check of the stored files, download, then pg_restore; floor: "
            "pg_dump -Fc --compress=none | pg_restore, overlapped, nothing stored or checked (about the least of any "
            "logical path)",
            "incremental_workload": "UPDATE of the newest 1 % of pgbench_accounts' rows (1 % of its pages)",
            "incremental_spread_workload": "UPDATE of every hundredth row of pgbench_accounts (1 % of its rows, "
            "about every other page), each round on the newest base backup: the chain one longer every round (an "
            "incremental's cost is the changed blocks and the checkpoint, not its chain's length)",
            "rpo_samples_s": [round(x, 1) for x in rpo],
            "rpo_max_s": round(max(rpo), 1),
            "wal_archive_lag_samples_s": [round(x, 1) for x in lag],
            "load_tps": round(load_tps),
            "archive_catch_up_after_load_s": round(catch_up, 1),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    report = json.loads(output.read_text()) if output.exists() else {}
    report.update(results)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\npgdr PITR benchmark: {db_size:.0f} MB of pgbench data, medians of {args.rounds} rounds\n")
    rows = [
        ("basebackup_ratio", "<= 1.10", results["basebackup_ratio"] <= 1.10),
        ("incremental_speedup", ">= 10", results["incremental_speedup"] >= 10),
        ("incremental_speedup_spread", "(reported)", True),
        ("pitr_restore_speedup_vs_seed", ">= 3", results["pitr_restore_speedup_vs_seed"] >= 3),
        ("basebackup_vs_barman", "<= 1.0", results["basebackup_vs_barman"] <= 1.0),
        ("pitr_restore_vs_barman", "<= 1.0", results["pitr_restore_vs_barman"] <= 1.0),
        ("basebackup_vs_peer", "<= 1.0", results["basebackup_vs_peer"] <= 1.0),
        ("basebackup_stored_vs_peer", "<= 1.0", results["basebackup_stored_vs_peer"] <= 1.0),
        ("pitr_restore_vs_peer", "<= 0.9", results["pitr_restore_vs_peer"] <= 0.9),
        ("rpo_achieved_s", "<= 60", results["rpo_achieved_s"] <= 60),
        ("wal_archive_lag_s", "(reported)", True),
        ("server_recovery_s", "(reported)", True),
        ("server_recovery_vs_peer", "<= 1.2", results["server_recovery_vs_peer"] <= 1.2),
        ("server_recovery_thorough_vs_peer", "(reported)", True),
        ("server_recovery_before_checks_vs_peer", "(reported)", True),
        ("server_recovery_thorough_before_checks_vs_peer", "(reported)", True),
        ("server_recovery_vs_peer_as_server", "(reported)", True),
        ("server_recovery_vs_peer_own_replay", "(reported)", True),
        ("database_as_of_s", "(reported)", True),
        ("database_as_of_vs_bucket", "<= 0.6", results["database_as_of_vs_bucket"] <= 0.6),
        ("database_as_of_floor_vs_bucket", "(reported)", True),
    ]
    for name, target, ok in rows:
        print(f"{name:<40}{results[name]:>10}  {target}  {'ok' if ok else 'MISSED'}")
    for k, v in med.items():
        print(f"  {k:<28}{v:>10.2f}s")
    print(f"\nMerged into {output}")


def run_psql(env: dict, sql: str, db: str = "postgres") -> str:
    """Run ``sql`` with psql on the server of ``env`` (libpq variables); return its unaligned output."""
    return subprocess.run(
        [str(bundled_bin_dir() / "psql"), "-X", "-q", "-t", "-A", "-d", db, "-c", sql],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def settle_archive(pg, env: dict) -> float:
    """Archive everything written so far, then checkpoint and sync; return the seconds the archive needed."""
    from pgdr.physical.heartbeat import switch_and_wait_archived

    t = time.perf_counter()
    switch_and_wait_archived(pg, 3600)
    run_psql(env, "CHECKPOINT")
    os.sync()
    return time.perf_counter() - t


PEER_URL = f"s3://{BUCKET}/peer"


def peer_args(access) -> list[str]:
    return ["--cloud-provider", "aws-s3", "--endpoint-url", access.endpoint_url]


def peer_backup(bin_dir: Path, access, env: dict, port: int, name: str) -> float:
    """barman-cloud-backup in its best mode (lz4, two upload jobs), streamed from the data directory of the server on
    ``port`` to S3 as backup ``name``; return its seconds."""
    t = time.perf_counter()
    run_peer(
        bin_dir / "barman-cloud-backup",
        *peer_args(access),
        *("--lz4", "--immediate-checkpoint", "-J", "2", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"),
        *("-n", name, PEER_URL, SERVER),
        env={**env, **access.environment()},
    )
    return time.perf_counter() - t


def peer_restore_and_recover(
    bin_dir: Path, access, archive, store, name: str, directory: Path, newest
) -> tuple[float, dict]:
    """barman-cloud-restore of the peer's backup ``name`` into a scratch cluster at ``directory``, then pgdr's
    recovery step (the same restore_command, replay to the end of the archive, promotion); return the seconds and
    each step's."""
    from pgdr.physical.cluster import ScratchCluster
    from pgdr.physical.recovery import recover_cluster

    cluster = ScratchCluster(directory, newest.record.pg_version)
    t = time.perf_counter()
    restored = barman_restore(bin_dir, access, name, cluster.data_dir)
    recovery = recover_cluster(cluster, archive, store, None)
    elapsed = time.perf_counter() - t
    cluster.destroy()
    return elapsed, {"barman_cloud_restore": round(restored, 2), "recover": round(recovery.replay_seconds, 2)}


def peer_restore_own_replay(bin_dir: Path, access, archive, name: str, directory: Path, newest) -> tuple[float, dict]:
    """barman-cloud-restore of the peer's backup ``name`` into a scratch cluster at ``directory``, then the replay with
    the peer's own restore_command in its best configuration (CloudNativePG's: barman-cloud-wal-restore fetching ahead
    into a spool, ``--parallel`` and ``--spool-dir``, started for every file PostgreSQL asks for, none known to be
    absent); return the seconds and each step's. :func:`peer_restore_and_recover` gives the peer pgdr's restore_command
    instead (the same replay as pgdr's, so that only the restores differ)."""
    import shlex

    from pgdr.physical.archive import WAL_PREFETCH
    from pgdr.physical.cluster import ScratchCluster

    cluster = ScratchCluster(directory, newest.record.pg_version)
    t = time.perf_counter()
    restored = barman_restore(bin_dir, access, name, cluster.data_dir)
    cluster.environment = {**cluster.environment, **archive.access.environment()}
    own = " ".join(
        shlex.quote(str(part))
        for part in (
            bin_dir / "barman-cloud-wal-restore",
            *peer_args(access),
            "--parallel",
            WAL_PREFETCH,
            "--spool-dir",
            cluster.spool_dir,
            archive.url,
            archive.server,
        )
    )
    cluster.configure(f"{own} %f %p", None, ())  # the list pgdr's restore_command reads is not read by this one
    try:
        recovery = cluster.start(None, 3600)
        elapsed = time.perf_counter() - t
    finally:
        cluster.drop_spool()
        cluster.destroy()
    return elapsed, {"barman_cloud_restore": round(restored, 2), "recover": round(recovery.replay_seconds, 2)}


def barman_restore(bin_dir: Path, access, name: str, data_dir: Path) -> float:
    """``barman-cloud-restore`` of the peer's backup ``name`` into ``data_dir``; return the seconds it took."""
    t = time.perf_counter()
    run_peer(
        bin_dir / "barman-cloud-restore",
        *peer_args(access),
        *(PEER_URL, SERVER, name, str(data_dir)),
        env={**os.environ, **access.environment()},
    )
    return time.perf_counter() - t


def run_peer(tool: Path, *args: str, env: dict[str, str]) -> None:
    """Run one of barman-cloud's tools; fail with its own words."""
    result = subprocess.run([str(tool), *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{tool.name} failed (exit {result.returncode}): {result.stderr[-2000:]}")


def archiver_or_skip(what: str) -> Path | None:
    """Return barman-cloud's bin directory, or ``None`` after saying why ``what`` is skipped (not installed, or not
    runnable by the server's OS user)."""
    from pgdr.errors import PgdrError
    from pgdr.physical.archive import archiver_bin_dir, check_archiver_runs_as_server_user

    try:
        bin_dir = archiver_bin_dir()
        check_archiver_runs_as_server_user(bin_dir, 65534 if os.geteuid() == 0 else None)
    except PgdrError as err:
        print(f"{what} skipped: {err}")
        return None
    return bin_dir


def archiving_server(directory: Path, archive, bin_dir: Path, **settings: str):
    """Start an embedded server at ``directory`` that archives its WAL into ``archive`` (``archive_timeout = 60s``,
    plus ``settings``); return it, an environment for its client tools (libpq variables) and its endpoint."""
    from pgdr.postgres.client import PgEndpoint

    server = EmbeddedServer(
        directory,
        settings={**archive.server_settings(60, bin_dir), **settings},
        environment=archive.access.environment(),
    ).start()
    env = {
        **os.environ,
        "PGPASSWORD": server.password,
        "PGHOST": "127.0.0.1",
        "PGPORT": str(server.port),
        "PGUSER": "postgres",
    }
    return server, env, PgEndpoint("127.0.0.1", server.port, "postgres", "postgres", server.password)


def load_pgbench(env: dict, scale: int) -> None:
    """Create the database ``bench`` on the server of ``env`` (libpq variables) with pgbench's tables at ``scale``."""
    subprocess.run([str(bundled_bin_dir() / "psql"), "-X", "-q", "-c", "CREATE DATABASE bench"], env=env, check=True)
    subprocess.run(
        [str(bundled_bin_dir() / "pgbench"), "-i", "-q", "-s", str(scale), "bench"],
        env=env,
        check=True,
        capture_output=True,
    )


class MotoProcess:
    """moto's S3 server in a process of its own, as a real S3 endpoint is: in the bench's process (a thread) its
    serving took the GIL from pgdr's own upload and download (a 93 MB base backup read in 5.7-6.8 s instead of
    1.4 s), while barman-cloud, a process of its own, never met it."""

    def __init__(self, port: int) -> None:
        import socket

        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on port {port}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def archive_endpoint(name: str, bucket: str):
    """Return a fresh working directory ``.pgdr/<name>`` that the server's OS user may enter, and moto's S3 server
    (a process of its own) on a free port with ``bucket`` in it: ``(work, moto, s3 client, ArchiveAccess for
    barman-cloud)``."""
    import boto3
    from pgdr.physical.archive import ArchiveAccess

    work = ROOT / ".pgdr" / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    work.chmod(0o755)
    port = free_port()
    moto = MotoProcess(port)
    endpoint_url = f"http://127.0.0.1:{port}"
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    )
    s3.create_bucket(Bucket=bucket)
    return work, moto, s3, ArchiveAccess(endpoint_url, "us-east-1", "bench", "bench")


def peer_restore_as_server(
    bin_dir: Path, access, archive, store, name: str, root: Path, newest, pg
) -> tuple[float, dict]:
    """barman-cloud-restore of the peer's backup ``name`` into ``root/data``, then the replay a whole-server recovery
    runs there (:class:`RecoveredServer`: the backup's own configuration, so ``fsync`` on, as a server that will
    serve runs; the same restore_command, replay to the end of the archive, promotion); stop it and remove it.
    Return the seconds and each step's.

    This is the peer's restore + replay of a lost server, like for like: :func:`peer_restore_and_recover` replays in
    a scratch cluster (``fsync`` off), which no server that goes on to serve may do.
    """
    from pgdr.physical.archive import archiver_bin_dir
    from pgdr.physical.server_recovery import RecoveredServer

    root.mkdir(parents=True)
    root.chmod(0o755)
    data_dir = root / "data"
    uid, gid = (65534, 65534) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
    t = time.perf_counter()
    restored = barman_restore(bin_dir, access, name, data_dir)
    server = RecoveredServer(
        root / "control", newest.record.pg_version, login=pg.user, target_dir=data_dir, uid=uid, gid=gid
    )
    server.environment = dict(archive.access.environment())
    server.prepare(
        archive.restore_command(server.spool_dir, archiver_bin_dir(), newest.record.wal_segment_size),
        None,
        False,
        "the bench's peer, replayed as a whole-server recovery",
        archive.archived_names(store),
    )
    t1 = time.perf_counter()
    try:
        server.recover(None, False, 3600)
        replayed = time.perf_counter() - t1
        elapsed = time.perf_counter() - t
    finally:  # a failed replay leaves no server running behind the bench
        server.drop_spool()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    return elapsed, {"barman_cloud_restore": round(restored, 2), "replay": round(replayed, 2)}


def recover_whole_server(root: Path, store, layout, archive, pg, proof: str = "quick") -> tuple[float, dict]:
    """Recover the bench server to the end of its archive into ``root/data`` with :class:`ServerRecovery`, as
    ``recover-server`` does on a new host (``proof`` included: a plan's ``recovery_proof``); stop it and remove it.
    Return the seconds and the report.
    """
    from types import SimpleNamespace

    from pgdr.physical.server_recovery import ServerRecovery
    from pgdr.postgres.binaries import server_bin_dir_for

    root.mkdir(parents=True)
    root.chmod(0o755)
    database = SimpleNamespace(name="bench", dbname="bench", dump_jobs=2, rto=timedelta(hours=1))
    plan = SimpleNamespace(database=lambda name: database)
    server = SimpleNamespace(name=SERVER, databases=("bench",), recovery_proof=proof)
    res = SimpleNamespace(
        plan=plan,
        archive=lambda _server, _target=None, _pruning=False: (store, layout, archive),
        server=lambda _server: pg,
    )
    recovery = ServerRecovery(
        server, res, None, root / "data", port=free_port(), os_user="nobody" if os.geteuid() == 0 else None
    )
    t = time.perf_counter()
    report = recovery.run(say=lambda _text: None)
    elapsed = time.perf_counter() - t
    user = {"user": 65534, "group": 65534, "extra_groups": []} if os.geteuid() == 0 else {}
    subprocess.run(
        [str(server_bin_dir_for(180000) / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "-w", "stop"],
        capture_output=True,
        **user,
    )
    shutil.rmtree(root, ignore_errors=True)  # the data directory and its recovery's control directory beside it
    return elapsed, report


def recover_scratch(root: Path, catalog, entry, store, archive) -> tuple[object, float, dict]:
    """Recover ``entry`` (and its chain) to the end of the archive in a new scratch cluster at ``root``; return the
    running cluster (the caller destroys it), the seconds it took, and its phases' seconds (``recover``: the replay).
    """
    from pgdr.physical.cluster import ScratchCluster
    from pgdr.physical.recovery import prepare_data_directory, recover_cluster

    cluster = ScratchCluster(root, entry.record.pg_version)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        Path(tmp).chmod(0o755)
        prepared = prepare_data_directory(catalog, entry, store, Path(tmp), cluster.data_dir, archive)
        recovery = recover_cluster(cluster, archive, store, None)
    seconds = time.perf_counter() - t
    return (
        cluster,
        seconds,
        {**{k: round(v, 2) for k, v in prepared.timings.items()}, "recover": round(recovery.replay_seconds, 2)},
    )


def measure_database_as_of(rounds: int, work: Path, catalog, newest, store, archive, target, settle) -> dict:
    """Time a point-in-time restore of one database: the server recovered to the end of the archive in a scratch
    cluster, then the database dumped from it and restored into ``target``'s server, both ways, in alternating order
    on the same recovered cluster: streamed (``take_backup``'s ``beside_upload``, as ``dump_moment`` does now) and
    through the bucket (stored, checked, downloaded, restored: the path before). Return the totals and phases.

    Beside them, last in each round, about the floor of any logical path on this machine: ``pg_dump -Fc |
    pg_restore``, the dump and the restore overlapped in one pipe, uncompressed, with nothing stored and nothing
    checked (``floor``)."""
    from pgdr.logical.backup import take_backup
    from pgdr.logical.restore import download_backup, restore_dump, verify_checksums
    from pgdr.plan import parse_plan
    from pgdr.postgres.client import connect, connection_args, identifier, passfile_env
    from pgdr.storage.layout import BackupLayout

    config = work / "as-of-plan.yaml"
    db = parse_plan(
        f"storage: {{s: {{type: local, path: {work}}}}}\ndatabases: [{{name: bench, conn_id: x, dump_jobs: 2}}]\n",
        config,
    ).databases[0]
    out: dict = {"streamed_total": [], "via_bucket_total": [], "floor_total": [], "phases": []}

    def fresh(name: str):
        with connect(target.with_dbname("postgres")) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {identifier(name)} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {identifier(name)}")
        return target.with_dbname(name)

    def via_bucket(source, r: int) -> float:
        into = fresh("as_of_via_bucket")
        folder = work / f"as-of-bucket-{r}"
        (folder / "work").mkdir(parents=True)
        t = time.perf_counter()
        manifest = take_backup(db, source, store, BackupLayout(f"as-of/bucket-{r}"), folder / "work").manifest
        verify_checksums(manifest, store, workers=2)
        download_backup(manifest, store, folder / "dump", workers=2)
        restore_dump(into, folder / "dump", 2, folder)
        elapsed = time.perf_counter() - t
        shutil.rmtree(folder)
        return elapsed

    def streamed(source, r: int) -> float:
        into = fresh("as_of_streamed")
        folder = work / f"as-of-streamed-{r}"
        (folder / "restore").mkdir(parents=True)
        (folder / "work").mkdir()
        t = time.perf_counter()
        take_backup(
            db,
            source,
            store,
            BackupLayout(f"as-of/streamed-{r}"),
            folder / "work",
            beside_upload=lambda dump, _counts: restore_dump(into, dump, 2, folder / "restore"),
        )
        elapsed = time.perf_counter() - t
        shutil.rmtree(folder)
        return elapsed

    def floor(source, r: int) -> float:
        into = fresh("as_of_floor")
        folder = work / f"as-of-floor-{r}"
        bin_dir = bundled_bin_dir()
        with passfile_env(source, folder / "dump") as dump_env, passfile_env(into, folder / "restore") as restore_env:
            t = time.perf_counter()
            dump = subprocess.Popen(
                [str(bin_dir / "pg_dump"), *connection_args(source), "-Fc", "--compress=none"],
                env=dump_env,
                stdout=subprocess.PIPE,
            )
            restore = subprocess.run(
                [str(bin_dir / "pg_restore"), *connection_args(into), "--exit-on-error"],
                env=restore_env,
                stdin=dump.stdout,
                capture_output=True,
                text=True,
            )
            dump.stdout.close()
            if dump.wait() != 0 or restore.returncode != 0:
                raise RuntimeError(f"pg_dump | pg_restore failed: {restore.stderr[-2000:]}")
            elapsed = time.perf_counter() - t
        shutil.rmtree(folder, ignore_errors=True)
        return elapsed

    for r in range(rounds):
        settle()
        cluster, recover_s, _timings = recover_scratch(work / f"as-of-cluster-{r}", catalog, newest, store, archive)
        source = cluster.endpoint("bench")
        order = [("streamed", streamed), ("via_bucket", via_bucket)]
        timed = {name: run(source, r) for name, run in (order if r % 2 == 0 else order[::-1])}
        timed["floor"] = floor(source, r)
        cluster.destroy()
        out["streamed_total"].append(recover_s + timed["streamed"])
        out["via_bucket_total"].append(recover_s + timed["via_bucket"])
        out["floor_total"].append(recover_s + timed["floor"])
        out["phases"].append({"recover": round(recover_s, 2), **{k: round(v, 2) for k, v in timed.items()}})
        print(f"  round {r + 1}: {out['phases'][-1]}", flush=True)
    with connect(target.with_dbname("postgres")) as conn:
        for name in ("as_of_via_bucket", "as_of_streamed", "as_of_floor"):
            conn.execute(f"DROP DATABASE IF EXISTS {identifier(name)} WITH (FORCE)")
    return out


def measure_rpo(server, env, archive, store, seconds: int) -> tuple[list[float], list[float], float]:
    """Run pgbench for ``seconds`` and sample, every 5 s (every second on a short load), what a server loss
    at that moment would cost.

    The data safe at moment X is what the archive holds at X: up to the last commit in the newest
    archived segment that has one (read with pg_waldump). RPO(X) = X minus that commit's time.
    """
    import psycopg

    period = min(5.0, max(1.0, seconds / 10))
    load = subprocess.Popen(
        [str(bundled_bin_dir() / "pgbench"), "-c", "2", "-j", "2", "-T", str(seconds), "-n", "bench"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    rpo, lag = [], []
    stop = threading.Event()
    time.sleep(min(20, seconds / 3))  # let the load settle
    with psycopg.connect(**server.dsn(), autocommit=True) as conn:
        while load.poll() is None and not stop.is_set():
            now = datetime.now(UTC)
            last_wal, last_time = conn.execute(
                "SELECT last_archived_wal, last_archived_time FROM pg_stat_archiver"
            ).fetchone()
            committed = last_archived_commit(last_wal, archive, store)
            if committed and last_time:
                rpo.append((now - committed).total_seconds())
                lag.append((now - last_time).total_seconds())
            time.sleep(period)
    out, _ = load.communicate()
    tps = next((float(line.split("=")[1].split()[0]) for line in out.splitlines() if line.startswith("tps")), 0.0)
    if not rpo:
        raise RuntimeError(f"no RPO sample was taken during the load:\n{out[-2000:]}")
    return rpo, lag, tps


def last_archived_commit(last_wal: str | None, archive, store, look_back: int = 8) -> datetime | None:
    """Return the time of the newest commit the archive holds, up to ``last_wal`` (``pg_stat_archiver``'s).

    The newest archived segment may hold no commit (a segment a backup switched away from), so up to
    ``look_back`` segments before it on the same timeline are read, newest first, as the product's recoverable
    window reads them (:func:`pgdr.physical.recovery.newest_commit`).
    """
    from pgdr.physical.archive import archived_segment
    from pgdr.physical.recovery import newest_commit

    newest = archived_segment(last_wal)
    if newest is None:
        return None
    candidates = [s for s in archive.segments(store) if s.name[:8] == newest[:8] and s.name <= newest]
    return newest_commit(archive, store, candidates[-look_back:])


if __name__ == "__main__":
    main()
