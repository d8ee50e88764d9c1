"""Break-glass: ``python -m pgdr`` restores with no Airflow services at all (no scheduler, no API
server, a fresh empty AIRFLOW_HOME), running the same pgdr_restore DAG in its own process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from conftest import backup_into_local_store, source_row_counts
from pgdr.records import VerificationRecord
from support import write_plan

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def metadata_cache(tmp_path_factory):
    """Where the break-glass runs of this session keep the empty Airflow metadata database they copy."""
    return tmp_path_factory.mktemp("pgdr-cache")


@pytest.fixture
def breakglass(tmp_path, pg_server, metadata_cache):
    """A plan with a verified backup of shop, a connections file, and a runner with no Airflow around it."""
    root = tmp_path / "backups"
    backup_id = backup_into_local_store(root, pg_server)
    from pgdr.logical.catalog import BackupCatalog
    from pgdr.storage.backends import LocalFolderStore
    from pgdr.storage.layout import BackupLayout

    BackupCatalog(LocalFolderStore(root), BackupLayout(), "shop").record_verification(
        VerificationRecord.from_dict({"backup_id": backup_id, "status": "verified"})
    )
    connections = tmp_path / "connections.json"
    connections.write_text(
        json.dumps(
            {
                "pgdr_shop": json.loads(pg_server.connection_uri("shop")),
                "pgdr_live": json.loads(pg_server.connection_uri("shop_cli_live")),
                "pgdr_restore": json.loads(pg_server.restore_connection_uri()),
            }
        )
    )
    plan = write_plan(
        tmp_path / "plan.yaml",
        [{"name": "shop", "conn_id": "pgdr_shop"}, {"name": "live", "conn_id": "pgdr_live", "dbname": "shop_cli_live"}],
        {"local": {"type": "local", "path": str(root)}},
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PGDR"))}  # no Airflow, no plan
    env["PYTHONPATH"] = str(ROOT / "plugins")
    env["PGDR_CACHE_DIR"] = str(metadata_cache)
    env["PGDR_LOG_DIR"] = str(tmp_path / "logs")  # not the temporary directory: each run writes a log file

    def command(*args: str) -> list[str]:
        return [sys.executable, "-m", "pgdr", "--plan", str(plan), "--connections", str(connections), *args]

    def command_after(subcommand: str, *args: str) -> list[str]:  # the options after the subcommand, as most type them
        return [sys.executable, "-m", "pgdr", subcommand, "--plan", str(plan), "--connections", str(connections), *args]

    def run(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run(command(*args), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        result.output = result.stdout + result.stderr
        return result

    run.command, run.command_after, run.env = command, command_after, env
    return run, root, backup_id


def _sql(server, statement, db="postgres"):
    with psycopg.connect(**server.dsn(db), autocommit=True) as conn:
        cur = conn.execute(statement)
        return cur.fetchall() if cur.description else None


def test_list_reads_the_store_without_airflow(breakglass):
    run, _root, backup_id = breakglass
    result = run("list", "--database", "shop")
    assert result.returncode == 0, result.output
    assert backup_id in result.stdout and "verified" in result.stdout and "MB stored (gzip:1)" in result.stdout
    # --plan and --connections after the subcommand work the same
    after = subprocess.run(
        run.command_after("list", "--database", "shop"), env=run.env, capture_output=True, text=True, timeout=120
    )
    assert after.returncode == 0 and after.stdout == result.stdout, after.stdout + after.stderr


def test_restore_new_database_and_replace_without_airflow_services(breakglass, pg_server, tmp_path):
    run, root, backup_id = breakglass
    run.env["PGDR_CACHE_DIR"] = str(tmp_path / "cache")  # none yet: the first run builds the metadata database
    built = "the private metadata database was built from Airflow's models"
    try:
        declared = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
        result = run(
            "restore",
            "--database",
            "shop",
            "--target-name",
            "shop_cli_copy",
            "--incident",
            "INC-9",
            "--declared",
            declared.isoformat(),
        )
        assert result.returncode == 0, result.output[-4000:]
        assert built in result.stdout and len(list((tmp_path / "cache").glob("airflow-metadata-*.sqlite"))) == 1
        assert "ok restore_backup success in" in result.stdout and "pgdr_restore success" in result.stdout
        assert "Restore plan:" in result.stdout and backup_id in result.stdout
        assert source_row_counts(pg_server, "shop_cli_copy") == source_row_counts(pg_server, "shop")
        (report,) = [json.loads(p.read_text()) for p in (root / "v1/shop" / backup_id / "restores").glob("*.json")]
        assert report["status"] == "restored" and report["via"].startswith("the command line (python -m pgdr restore)")
        assert report["incident"]["id"] == "INC-9" and report["incident"]["declared_at"] == declared.isoformat()
        assert report["incident"]["mttr_seconds"] >= 300

        # replace, on a live database of its own; shop's backup serves it (same schema and rows)
        _sql(pg_server, "CREATE DATABASE shop_cli_live TEMPLATE shop")
        (root / "v1/live").mkdir(parents=True)
        _copy_as(root, "shop", "live", backup_id)
        _sql(pg_server, "INSERT INTO audit.events (actor, action) VALUES ('after-backup', 'marker')", "shop_cli_live")
        result = run(
            "restore", "--database", "live", "--backup", "latest", "--mode", "replace", "--confirm", "shop_cli_live"
        )
        assert result.returncode == 0, result.output[-4000:]
        assert built not in result.stdout  # it started from the copy the first run kept
        assert "ok swap_into_place success" in result.stdout
        kept = [
            r[0]
            for r in _sql(pg_server, "SELECT datname FROM pg_database WHERE datname LIKE 'shop_cli_live_pre_restore_%'")
        ]
        assert len(kept) == 1
        assert _sql(pg_server, "SELECT count(*) FROM audit.events WHERE actor = 'after-backup'", "shop_cli_live") == [
            (0,)
        ]
        _sql(pg_server, f'ALTER DATABASE "{kept[0]}" WITH ALLOW_CONNECTIONS true')
        assert _sql(pg_server, "SELECT count(*) FROM audit.events WHERE actor = 'after-backup'", kept[0]) == [(1,)]
    finally:
        for (name,) in _sql(pg_server, "SELECT datname FROM pg_database WHERE datname LIKE 'shop\\_cli\\_%'"):
            _sql(pg_server, f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
            _sql(pg_server, f'DROP DATABASE "{name}" WITH (FORCE)')


def _copy_as(root: Path, database: str, other: str, backup_id: str) -> None:
    """File shop's backup as a backup of ``other`` too (its manifest names its own keys)."""
    import shutil

    source, target = root / "v1" / database / backup_id, root / "v1" / other / backup_id
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["database"] = other
    for entry in manifest["files"]:
        entry["key"] = entry["key"].replace(f"v1/{database}/", f"v1/{other}/", 1)
    (target / "manifest.json").write_text(json.dumps(manifest))
    (target / "verification.json").unlink(missing_ok=True)


@pytest.mark.parametrize(
    "args, message, status",
    [
        (["--mode", "replace", "--confirm", "shopp"], "(you typed 'shopp')", 1),
        (["--tables", "sales.nope"], "Not a table of backup", 1),
        (["--backup", "2999-01-01T00:00:00Z"], "is in the future", 1),
        (["--declared", "1h ago"], "incident_declared_at must be a UTC time", 1),
    ],
    ids=["wrong-confirmation", "unknown-table", "future-time", "declared-not-a-time"],
)
def test_a_wrong_field_gets_the_forms_own_error(breakglass, pg_server, args, message, status):
    run, _root, _backup_id = breakglass
    before = {r[0] for r in _sql(pg_server, "SELECT datname FROM pg_database")}
    result = run("restore", "--database", "shop", *args)
    assert result.returncode == status, result.output[-3000:]
    assert message in result.output
    assert {r[0] for r in _sql(pg_server, "SELECT datname FROM pg_database")} == before
    # The process ends without the interpreter's teardown (pgdr.local.cli.exit_now): its log is whole all the same.
    log = Path(re.search(r"log records go to (\S+)", result.output).group(1))
    assert log.parent == Path(run.env["PGDR_LOG_DIR"])  # $PGDR_LOG_DIR, made by the command, not the temporary dir
    assert message in log.read_text() and log.read_text().rstrip().endswith(f"the whole log is {log}")


def test_a_database_not_in_the_plan_is_refused_as_the_form_refuses_it(breakglass):
    run, _root, _backup_id = breakglass
    result = run("restore", "--database", "nope")
    assert result.returncode == 2 and "is not one of" in result.output, result.output[-3000:]


def test_ctrl_c_during_the_restore_leaves_the_live_database_and_no_half_copy(breakglass, pg_server):
    """SIGINT (Ctrl-C) while pg_restore runs: the command stops, the live database is untouched, and
    the half-restored copy is dropped (it was this run's own target)."""
    import signal
    import threading
    import time

    run, _root, _backup_id = breakglass
    before = {r[0] for r in _sql(pg_server, "SELECT datname FROM pg_database")}
    rows = source_row_counts(pg_server, "shop")
    process = subprocess.Popen(
        run.command("restore", "--database", "shop", "--target-name", "shop_cli_half"),
        env=run.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    interrupted = threading.Event()

    def interrupt_when_restoring():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if _sql(
                pg_server,
                "SELECT 1 FROM pg_stat_activity WHERE datname = 'shop_cli_half' AND application_name = 'pgdr'",
            ):
                process.send_signal(signal.SIGINT)
                interrupted.set()
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=interrupt_when_restoring, daemon=True)
    watcher.start()
    output, _ = process.communicate(timeout=300)
    watcher.join(5)
    assert interrupted.is_set(), output[-3000:]
    assert process.returncode == 130 and "stopped by Ctrl-C" in output, output[-3000:]
    time.sleep(1)
    assert {r[0] for r in _sql(pg_server, "SELECT datname FROM pg_database")} == before, output[-3000:]
    assert source_row_counts(pg_server, "shop") == rows


RUNS, BOUND_S = 30, 240  # a pair takes 9-16 s here alone (median 9.3 s); the hang it guards against never ended


# Its own bound (BOUND_S a pair, with every thread's stack of a run that hangs) must trip before pytest-timeout's:
# beside the Celery suite on the other xdist worker the thirty runs took 650 s (340 s alone; 167 s alone since 2026-12).
@pytest.mark.timeout(RUNS // 2 * BOUND_S + 120)
def test_the_command_never_hangs_thirty_runs_in_parallel_pairs(breakglass, pg_server):
    """The progress thread once deadlocked with dag.test() importing Airflow's models (import lock against
    SQLAlchemy's mapper lock): a race, lost on a loaded machine. Thirty runs, two at a time (one with a
    wrong field, one that plans or really restores), each must end, with the right outcome, within a
    generous bound; a run that does not has its threads' stacks dumped into its log (SIGUSR1)."""
    import signal
    import time

    run, _root, _backup_id = breakglass
    problems, took = [], []

    def start(args):  # the wrong-field runs give --plan and --connections after the subcommand
        command = run.command_after(*args) if "2999-01-01T00:00:00Z" in args else run.command(*args)
        return subprocess.Popen(command, env=run.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    try:
        for pair in range(RUNS // 2):
            real = pair % 5 == 4  # every fifth pair restores for real; the others stop after the plan (dry run)
            target = f"shop_cli_stress_{pair}"
            runs = {
                "wrong field": (
                    ["restore", "--database", "shop", "--backup", "2999-01-01T00:00:00Z"],
                    1,
                    "is in the future",
                ),
                "restore" if real else "dry run": (
                    ["restore", "--database", "shop", "--target-name", target, *([] if real else ["--dry-run"])],
                    0,
                    "pgdr_restore success",
                ),
            }
            started = time.monotonic()
            processes = {name: start(args) for name, (args, _status, _text) in runs.items()}
            for name, process in processes.items():
                _args, status, text = runs[name]
                try:
                    output, _ = process.communicate(timeout=max(1, BOUND_S - (time.monotonic() - started)))
                except subprocess.TimeoutExpired:
                    process.send_signal(signal.SIGUSR1)  # faulthandler: every thread's stack into the log
                    time.sleep(2)
                    process.kill()
                    output, _ = process.communicate()
                    log = re.search(r"log records go to (\S+)", output)
                    stacks = Path(log.group(1)).read_text(errors="replace")[-6000:] if log else "(no log path printed)"
                    problems.append(f"pair {pair}, {name}: still running after {BOUND_S}s\n{output[-1500:]}\n{stacks}")
                    continue
                took.append(time.monotonic() - started)
                if process.returncode != status or text not in output:
                    problems.append(
                        f"pair {pair}, {name}: exit {process.returncode}, wanted {status} and "
                        f"{text!r}\n{output[-2000:]}"
                    )
            if real and not problems:
                assert _sql(pg_server, f"SELECT 1 FROM pg_database WHERE datname = '{target}'") == [(1,)]
            assert not problems, "\n\n".join(problems)
    finally:
        for (name,) in _sql(pg_server, "SELECT datname FROM pg_database WHERE datname LIKE 'shop\\_cli\\_stress\\_%'"):
            _sql(pg_server, f'DROP DATABASE "{name}" WITH (FORCE)')
    assert len(took) == RUNS
    print(f"{RUNS} runs in pairs: median {sorted(took)[RUNS // 2]:.1f}s, longest {max(took):.1f}s")


def test_sigusr1_writes_every_threads_stack_to_the_log_and_the_run_goes_on(breakglass):
    """`kill -USR1 <pid>` on a command that seems stuck shows what each thread waits for, in its log file."""
    import signal
    import time

    run, _root, _backup_id = breakglass
    process = subprocess.Popen(
        run.command("restore", "--database", "shop", "--dry-run"),
        env=run.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    first = process.stdout.readline() + process.stdout.readline()
    log = Path(re.search(r"log records go to (\S+)", first).group(1))
    seen = ""
    while "starting the pgdr_restore DAG" not in seen:
        line = process.stdout.readline()
        assert line, seen
        seen += line
    time.sleep(1)  # dag.test() is importing and syncing: the progress thread runs beside it
    process.send_signal(signal.SIGUSR1)
    rest, _ = process.communicate(timeout=300)
    assert process.returncode == 0 and "pgdr_restore success" in rest, first + seen + rest
    text = log.read_text()
    assert re.search(r"^Thread 0x[0-9a-f]+ \(most recent call first\):", text, re.M), text[-3000:]
    assert re.search(r"^Current thread 0x[0-9a-f]+ \(most recent call first\):", text, re.M), text[-3000:]
    assert "in run" in text and "cli.py" in text  # the progress thread's and the main thread's frames
