"""``make demo`` as a newcomer runs it: the lines the README shows on the terminal, the records in a file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
# A log record (structlog's console form), the JSON a task returns, or a traceback: never on the terminal.
RECORD = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d|\[(info|warning|error|debug)\s*\]|Returned value was|^Traceback ")


def _demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    for folder in (tmp_path, state):
        folder.chmod(0o755)  # the embedded server runs as an unprivileged user when tests run as root
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PGDR_"))}
    env.update(PGDR_STATE_DIR=str(state), PYTHONPATH=str(ROOT / "plugins"))
    result = subprocess.run(
        [sys.executable, "-m", "pgdr.local.demo", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    result.lines = [line for line in result.stdout.splitlines() if line.strip()]
    return result


def _log_file(result) -> Path:
    (path,) = re.findall(r"log records of every task go to (\S+)", result.lines[0])
    return Path(path)


def test_make_demo_prints_the_phases_and_keeps_the_records_in_a_file(tmp_path):
    result = _demo(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stderr.strip() == "", result.stderr[-3000:]
    # The shape the README shows: "==>" phase lines, each followed by indented details; nothing else.
    assert all(line.startswith(("==> ", "    ")) for line in result.lines), result.stdout
    assert not [line for line in result.lines if RECORD.search(line)], result.stdout
    assert len(result.lines) <= 70, result.stdout
    phases = [line[4:] for line in result.lines if line.startswith("==> ")]
    expected = [
        "pgdr demo: the log records of every task go to",
        "Starting the embedded PostgreSQL 18 server",
        "Running pgdr_backup",
        "Newest backup of 'shop'",
        "Running pgdr_verify_restore",
        "Verification of 'shop' backup",
        "Running pgdr_drill",
        "DR drill",
        "Done in",
    ]
    pitr = not any("Point-in-time recovery is skipped" in phase for phase in phases)
    if pitr:
        expected[6:6] = ["Running pgdr_basebackup", "Running pgdr_verify_pitr"]
        expected[-1:-1] = ["Running pgdr_restore", "Restored 'shop' as of"]
    position = 0
    for wanted in expected:  # in this order, others may stand between them
        found = [i for i, phase in enumerate(phases) if i >= position and phase.startswith(wanted)]
        assert found, f"{wanted!r} missing after phase {position}:\n{result.stdout}"
        position = found[0] + 1
    for dag_id in ("pgdr_backup", "pgdr_verify_restore", "pgdr_drill"):
        assert re.search(rf"^    {dag_id}: success in \d+\.\ds$", result.stdout, re.M), result.stdout
    assert re.search(r"^    report +: \S+drill\.html$", result.stdout, re.M), result.stdout
    assert "VERIFIED" in result.stdout and "DR drill" in result.stdout and ": PASS" in result.stdout
    # ...and every record is in the file the first line names.
    log = _log_file(result).read_text()
    assert "[DAG TEST] starting task_id=plan_restore" in log or not pitr
    assert "[DAG TEST] end task task_id=write_verification" in log or "write_verification" not in log
    assert "Done. Returned value was" in log and "==> Running pgdr_backup" in log


def test_a_failing_demo_names_the_task_its_error_and_the_log_file(tmp_path):
    """A plan the embedded pg_dump cannot serve (zstd): the demo stops at the backup, says which task failed
    and why, shows that task's last log lines and where the whole log is, and exits non-zero."""
    plan = (ROOT / "include" / "pgdr.yaml").read_text().replace("compression: gzip:1", "compression: zstd:3")
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "pgdr.yaml").write_text(plan)
    result = _demo(tmp_path, "--plan", str(tmp_path / "include" / "pgdr.yaml"))
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert all(line.startswith(("==> ", "    ")) for line in result.lines), result.stdout
    assert re.search(r"^    pgdr_backup: failed in", result.stdout, re.M), result.stdout
    failed = re.search(r"^    task (\S+) failed: (.*)$", result.stdout, re.M)
    assert failed and failed.group(1).endswith("back_up[0]"), result.stdout
    assert "has no zstd compression" in failed.group(2), result.stdout
    assert "    the last log lines of" in result.stdout and "      | " in result.stdout
    log = _log_file(result)
    assert f"    the whole log: {log}" in result.stdout and log.exists()
    assert "==> The demo stopped: pgdr_backup did not succeed" in result.stdout
    assert "Running pgdr_verify_restore" not in result.stdout
