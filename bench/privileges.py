"""What the privileges phase of a restore costs: owners, grants and settings given back after the checks.

    .venv/bin/python bench/privileges.py              # about 2 GB of pgbench data (scale 135), 3 rounds
    .venv/bin/python bench/privileges.py --quick      # about 200 MB (scale 14)

The database is pgbench's, plus what makes the phase work: an application role granted on every
table, default privileges, database settings, and 1,000 more tables in a schema of their own, each
owned by one of two roles and granted to the application (2,000+ owner and grant statements). Each
round restores pgdr's backup of it the way ``restore_backup`` does (checksums, download,
``pg_restore -j2``), then runs :func:`pgdr.logical.privileges.apply_privileges` (fetching the
table of contents again, as the ``apply_privileges`` task does). Goal: the phase costs under 2 %
of the restore. Results are merged into ``bench/results/latest.json`` under ``privileges``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))

import run as bench_run  # noqa: E402

EXTRA_TABLES = 1000


def add_privileges(bench, db: str) -> None:
    """Give the pgbench database what an application's database has: owners, grants, settings."""
    statements = [
        "DO $$ BEGIN CREATE ROLE bench_app LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        "DO $$ BEGIN CREATE ROLE bench_owner_a NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        "DO $$ BEGIN CREATE ROLE bench_owner_b NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
    ]
    bench.psql("; ".join(statements))
    ddl = [
        "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO bench_app",
        "CREATE SCHEMA many AUTHORIZATION bench_owner_a",
        "GRANT USAGE ON SCHEMA many TO bench_app",
        "ALTER DEFAULT PRIVILEGES FOR ROLE bench_owner_a IN SCHEMA many GRANT SELECT ON TABLES TO bench_app",
        f"ALTER DATABASE {db} SET statement_timeout TO '30s'",
        f"ALTER ROLE bench_app IN DATABASE {db} SET work_mem TO '8MB'",
        f"REVOKE CONNECT ON DATABASE {db} FROM PUBLIC",
        f"GRANT CONNECT ON DATABASE {db} TO bench_app",
    ]
    ddl.append(
        f"DO $$ BEGIN FOR i IN 0..{EXTRA_TABLES - 1} LOOP EXECUTE format('CREATE TABLE many.t%s (id int PRIMARY "
        "KEY, v text)', lpad(i::text, 4, '0')); EXECUTE format('ALTER TABLE many.t%s OWNER TO %I', lpad(i::text, "
        "4, '0'), CASE WHEN i % 2 = 1 THEN 'bench_owner_a' ELSE 'bench_owner_b' END); EXECUTE format('GRANT "
        "SELECT, INSERT ON many.t%s TO bench_app', lpad(i::text, 4, '0')); END LOOP; END $$"
    )
    bench.psql("; ".join(ddl), db)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="scale 14 (about 200 MB) instead of 135 (about 2 GB)")
    parser.add_argument("--scale", type=int, help="pgbench scale (overrides --quick)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, help="default: bench/results/latest.json (quick.json with --quick)")
    args = parser.parse_args(argv)
    scale = args.scale or (14 if args.quick else 135)
    output = args.output or ROOT / "bench" / "results" / ("quick.json" if args.quick else "latest.json")

    from pgdr.logical.privileges import apply_privileges, read_toc
    from pgdr.logical.restore import fetch_toc
    from pgdr.postgres.client import PgEndpoint

    work = Path(tempfile.mkdtemp(prefix="pgdr-bench-privileges-"))
    work.chmod(0o755)
    bench = bench_run.Bench(work, scale, args.rounds)
    try:
        db_size = bench.create_pgbench("bench", scale)
        add_privileges(bench, "bench")
        _elapsed, manifest = bench.pgdr_backup("bench")
        _pdb, _endpoint, store, _layout = bench.pgdr_parts("bench")
        restores, phases, applied = [], [], None
        for n in range(args.rounds):
            target = f"restored_{n}"
            restores.append(bench.pgdr_restore("bench", manifest, target))
            scratch = Path(tempfile.mkdtemp(dir=work))
            t = time.perf_counter()
            fetch_toc(manifest, store, scratch / "dump")
            applied = apply_privileges(
                PgEndpoint("127.0.0.1", bench.server.port, "postgres", target, bench.server.password),
                read_toc(scratch / "dump"),
                scratch,
            )
            phases.append(time.perf_counter() - t)
            shutil.rmtree(scratch, ignore_errors=True)
            bench.psql(f"DROP DATABASE {target} WITH (FORCE)")
            print(f"round {n + 1}: restore {restores[-1]:.2f}s, privileges phase {phases[-1]:.3f}s", flush=True)
        restore_s, phase_s = statistics.median(restores), statistics.median(phases)
        results = {
            "privileges_share": round(phase_s / restore_s, 4),
            "privileges": {
                "db_size_mb": round(db_size),
                "pgbench_scale": scale,
                "rounds": args.rounds,
                "extra_tables": EXTRA_TABLES,
                "restore_s": round(restore_s, 2),
                "phase_s": round(phase_s, 3),
                "share": round(phase_s / restore_s, 4),
                "goal": "share < 0.02",
                "applied": {
                    k: v
                    for k, v in applied.to_dict().items()
                    if k in ("owners", "grants", "default_privileges", "database_properties")
                },
                "runs_s": {"restore": [round(x, 2) for x in restores], "phase": [round(x, 3) for x in phases]},
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        }
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    report = json.loads(output.read_text()) if output.exists() else {}
    report.update(results)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    share = results["privileges_share"]
    print(
        f"\nprivileges phase: {phase_s:.3f}s of a {restore_s:.1f}s restore ({db_size:.0f} MB): {share:.2%}  (goal < "
        f"2 %: {'ok' if share < 0.02 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
