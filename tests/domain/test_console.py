"""The console of the local commands: the terminal gets the phase lines, the log file every record."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import logging, subprocess, sys
from pathlib import Path
from pgdr.local.console import Console, detail, say

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
log = Path(sys.argv[1])
with Console(log, verbose=sys.argv[2] == "verbose"):
    say("Running pgdr_backup")
    logging.getLogger("airflow").info("2026-12-02T10:00:00Z [info] a structured record")
    print("Done. Returned value was: {'a': 1}")
    subprocess.run([sys.executable, "-c", "import sys; print('from a child'); print('child stderr', file=sys.stderr)"])
    detail("pgdr_backup: success in 1.0s")
print("after the console")
"""


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_records_go_to_the_log_and_the_phase_lines_to_the_terminal(tmp_path, mode):
    log = tmp_path / "logs" / "run.log"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(log), mode],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT / "plugins"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    text = log.read_text()
    for record in (
        "a structured record",
        "Returned value was",
        "from a child",
        "child stderr",
        "==> Running pgdr_backup",
        "    pgdr_backup: success in 1.0s",
    ):
        assert record in text, text
    assert "after the console" not in text and (log.stat().st_mode & 0o777) == 0o600
    terminal = result.stdout + result.stderr
    assert "==> Running pgdr_backup\n" in result.stdout and "    pgdr_backup: success in 1.0s\n" in result.stdout
    assert result.stdout.rstrip().endswith("after the console")
    if mode == "quiet":
        assert result.stdout == "==> Running pgdr_backup\n    pgdr_backup: success in 1.0s\nafter the console\n"
        assert result.stderr == ""
    else:
        for record in ("a structured record", "Returned value was", "from a child", "child stderr"):
            assert record in terminal


def test_a_failed_tasks_error_and_last_lines_are_found_between_dag_tests_markers(tmp_path):
    from pgdr.local.console import task_excerpt

    log = tmp_path / "run.log"
    log.write_text(
        "old run [DAG TEST] starting task_id=plan_restore map_index=-1 [x]\nOLD ERROR\n2026-12-02T10:00:00Z [info] "
        "[DAG TEST] starting task_id=plan_restore map_index=-1 [airflow]\n2026-12-02T10:00:01Z [error] Task failed "
        "with exception [task]\nTraceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n'
        "pgdr.errors.BackupNotFound: inner cause\nTraceback (most recent call "
        "last):\nairflow.sdk.exceptions.AirflowFailException: 'backup' is in the future.\nGive the moment the data "
        "was last good.\n2026-12-02T10:00:02Z [info] ::endgroup:: [task]\n2026-12-02T10:00:03Z [info] [DAG TEST] "
        "end task task_id=plan_restore map_index=-1 [airflow]\n2026-12-02T10:00:04Z [info] [DAG TEST] starting "
        "task_id=write_report map_index=-1 [airflow]\n"
    )
    since = len("old run [DAG TEST] starting task_id=plan_restore map_index=-1 [x]\nOLD ERROR\n")
    error, lines = task_excerpt(log, since, "plan_restore", -1, lines=3)
    assert error == "'backup' is in the future.\nGive the moment the data was last good."
    assert lines == [
        "airflow.sdk.exceptions.AirflowFailException: 'backup' is in the future.",
        "Give the moment the data was last good.",
        "2026-12-02T10:00:02Z [info] ::endgroup:: [task]",
    ]
    assert task_excerpt(log, since, "write_report") == ("", [])
    assert task_excerpt(log, since, "never_ran") == ("", [])
    assert task_excerpt(tmp_path / "missing.log", 0, "plan_restore") == ("", [])
