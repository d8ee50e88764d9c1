"""Scaling run: how each phase of a whole-server recovery grows with the data, and the RTO it extrapolates to.

    .venv/bin/python bench/scaling.py                    # about 0.5, 2 and 8 GB (pgbench scales 34, 135, 540)
    .venv/bin/python bench/scaling.py --scales 7 14 34   # a quicker look

For each size, a fresh embedded server: the pgbench data is loaded before its WAL is archived (the load's WAL is
not what a recovery replays, and archiving 8 GB of it would take minutes), then ``archive_command`` is set to
barman-cloud's (a reload), a full pgdr base backup is taken, a little WAL written after it, and the server is
recovered once with ``recover-server``'s own code (plan, one pass of download + check + extract, replay to the end of
the archive, heartbeat proof, the default (quick) proof as a non-superuser, hand-over restart), phase by phase.
In the same round the peer in its best mode: ``barman-cloud-backup --lz4 -J 2``, then ``barman-cloud-restore`` and
the same recovery step (no proof).

Each phase is fitted with a line over the sizes (seconds = a + b × GB, least squares), and the lines give the
recovery time of a 100 GB and a 500 GB server of the same shape on this machine: an extrapolation, printed next to
the plan's RTO. Merged into ``bench/results/latest.json`` under ``scaling``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pitr import (  # noqa: E402 - the PITR bench's own set-up, shared
    BUCKET,
    ROOT,
    SERVER,
    archive_endpoint,
    archiver_or_skip,
    archiving_server,
    load_pgbench,
    peer_backup,
    peer_restore_and_recover,
    recover_whole_server,
    run_psql,
    settle_archive,
)

EXTRAPOLATE_GB = (100, 500)
PHASES = ("plan", "restore", "place", "replay", "checks", "hand_over")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=int, nargs="+", default=[34, 135, 540], help="pgbench scales, one per size")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    args = parser.parse_args(argv)

    bin_dir = archiver_or_skip("The scaling run")
    if bin_dir is None:
        return
    sizes = [measure(scale, bin_dir) for scale in args.scales]
    fits = {phase: fit([s["db_size_gb"] for s in sizes], [s["phases_s"][phase] for s in sizes]) for phase in PHASES}
    fits["peer_restore"] = fit([s["db_size_gb"] for s in sizes], [s["peer_restore_s"] for s in sizes])
    extrapolated = {
        f"{gb}_gb": {
            "server_recovery_s": round(sum(a + b * gb for a, b in (fits[p] for p in PHASES))),
            "checks_s": round(fits["checks"][0] + fits["checks"][1] * gb),
            "peer_restore_s": round(fits["peer_restore"][0] + fits["peer_restore"][1] * gb),
        }
        for gb in EXTRAPOLATE_GB
    }
    results = {
        "sizes": sizes,
        "fit_s_per_gb": {k: {"fixed_s": round(a, 2), "s_per_gb": round(b, 2)} for k, (a, b) in fits.items()},
        "extrapolated": extrapolated,
        "includes": "one whole-server recovery per size with recover-server's code (restore: the one pass of "
        "download, SHA-256, zstd, extract and the manifest check; checks: the default proof, quick, pg_amcheck "
        "--checkunique beside the exact row counts and sequences; the bench plan has no suite); the peer: "
        "barman-cloud-restore of its --lz4 -J 2 backup, then the same recovery step, no proof. Extrapolated with a "
        "least-squares line per phase: same data shape, same machine.",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    report = json.loads(args.output.read_text()) if args.output.exists() else {}
    report["scaling"] = results
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")

    print("\nWhole-server recovery by size (one round each; seconds)\n")
    print(f"{'GB':>6} {'total':>8} {'peer':>8} " + " ".join(f"{p:>9}" for p in PHASES))
    for s in sizes:
        print(
            f"{s['db_size_gb']:>6.2f} {s['server_recovery_s']:>8.1f} {s['peer_restore_s']:>8.1f} "
            + " ".join(f"{s['phases_s'][p]:>9.1f}" for p in PHASES)
        )
    for gb, row in extrapolated.items():
        print(f"extrapolated to {gb}: {row}")
    print(f"\nMerged into {args.output} (scaling)")


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Return (a, b) of the least-squares line y = a + b·x (b = 0 for a single size)."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    spread = sum((x - mean_x) ** 2 for x in xs)
    b = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread if spread else 0.0
    return mean_y - b * mean_x, b


def measure(scale: int, bin_dir: Path) -> dict:
    """Load ``scale``, take pgdr's and the peer's base backups, recover both; return the sizes and seconds."""
    from pgdr.physical.archive import WalArchive
    from pgdr.physical.basebackup import take_base_backup
    from pgdr.physical.catalog import BaseBackupCatalog
    from pgdr.storage.backends import S3Store
    from pgdr.storage.layout import PhysicalLayout

    work, moto, s3, access = archive_endpoint(f"bench-scaling-{scale}", BUCKET)
    store = S3Store(s3, BUCKET)
    layout = PhysicalLayout("pitr")
    archive = WalArchive(BUCKET, layout, SERVER, access)
    server, env, pg = archiving_server(work / "postgres", archive, bin_dir, archive_command="/bin/true")

    def psql(sql: str, db: str = "postgres") -> str:
        return run_psql(env, sql, db)

    def settle() -> None:
        settle_archive(pg, env)

    try:
        print(f"Scale {scale}: loading pgbench data (its WAL not archived)...", flush=True)
        t = time.perf_counter()
        load_pgbench(env, scale)
        db_size = int(psql("SELECT pg_database_size('bench')")) / 1e9
        print(f"  {db_size:.2f} GB in {time.perf_counter() - t:.0f}s", flush=True)
        command = archive.archive_command(bin_dir).replace("'", "''")
        psql(f"ALTER SYSTEM SET archive_command = '{command}'")
        psql("SELECT pg_reload_conf()")
        settle()

        folder = work / "pgdr-bb"
        folder.mkdir()
        t = time.perf_counter()
        take_base_backup(SERVER, pg, store, layout, folder, archive.url)
        backup_s = time.perf_counter() - t
        settle()
        peer_backup_s = peer_backup(bin_dir, access, env, server.port, "peer")
        psql("UPDATE pgbench_branches SET bbalance = bbalance + 1", "bench")  # a little WAL to replay
        print(f"  base backups: pgdr {backup_s:.1f}s, peer {peer_backup_s:.1f}s", flush=True)

        settle()
        elapsed, report = recover_whole_server(work / "whole", store, layout, archive, pg)
        raw = report["phase_seconds"]
        phases = {
            "plan": raw.get("plan", 0.0),
            # the one pass (download, SHA-256, zstd, extract, manifest check); a full backup has nothing to combine
            "restore": raw.get("restore_download_check_extract", 0.0)
            + raw.get("restore_combine", 0.0)
            + raw.get("restore_verify_combined", 0.0),
            "place": raw.get("place", 0.0),
            "replay": raw.get("replay", 0.0),
            "checks": raw.get("checks", 0.0),
            "hand_over": raw.get("hand_over", 0.0),
        }
        checks = report["proof"]["databases"]["bench"]["integrity"]["seconds"]
        print(f"  server recovery {elapsed:.1f}s {phases} checks {checks}", flush=True)

        newest = BaseBackupCatalog(store, layout, SERVER).backups()[-1]
        settle()
        peer_restore_s, peer_phases = peer_restore_and_recover(
            bin_dir, access, archive, store, "peer", work / "peer-cluster", newest
        )
        print(f"  peer restore + recovery {peer_restore_s:.1f}s", flush=True)
        return {
            "pgbench_scale": scale,
            "db_size_gb": round(db_size, 3),
            "pgdr_base_backup_s": round(backup_s, 2),
            "peer_base_backup_s": round(peer_backup_s, 2),
            "server_recovery_s": round(elapsed, 2),
            "phases_s": {k: round(v, 2) for k, v in phases.items()},
            "checks_s": {k: round(v, 2) for k, v in checks.items()},
            "peer_restore_s": round(peer_restore_s, 2),
            "peer_phases_s": peer_phases,
        }
    finally:
        server.destroy()
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
