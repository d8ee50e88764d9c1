"""What a local command shows its operator: one line a phase on the terminal, every log record in a file.

``make demo``, ``make ui`` and ``python -m pgdr`` run Airflow in their own process, and Airflow
logs every task's structured records (and a JSON of each task's return value) to stdout: more than
a thousand lines for one demo. Under :class:`Console` the process's stdout and stderr (file
descriptors 1 and 2, so subprocesses and libraries are caught too) go to a log file, and the
command speaks to the terminal through :meth:`Console.say` and :meth:`Console.detail` only: the
``==>`` lines the README shows. ``--verbose`` streams the records to the terminal as well (through
``tee -i``, which Ctrl-C does not stop). When a DAG run fails, :func:`task_excerpt` picks the
failing task's own lines out of the file, so the terminal shows what went wrong and where the rest is.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

# dag.test() brackets each task's records with these lines (airflow.sdk.definitions.dag._run_task).
_TASK_START = "[DAG TEST] starting task_id={task_id} map_index={map_index} "
_TASK_END = "[DAG TEST] end task task_id={task_id} map_index={map_index} "
# The last line of a traceback: the exception's class and message (which may run on over more lines).
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|NotFound|Mismatch|Refused|Failed)\w*: ")
_RECORD_START = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:")  # a structured log record's timestamp


def default_log_path(folder: Path, command: str) -> Path:
    """Return ``<folder>/<command>-<UTC time>-<pid>.log``: one file a run, never shared by two."""
    return folder / f"{command}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{os.getpid()}.log"


class Console:
    """Route the process's output to ``log_path`` and keep the terminal for the command's own lines.

    :param log_path: the file every log record goes to (appended; created mode 0600: records may
        name hosts and databases, never passwords, but they are the operator's to share).
    :param verbose: also stream every record to the terminal.
    """

    def __init__(self, log_path: Path, verbose: bool = False):
        self.log_path, self.verbose = log_path, verbose
        self._lock = threading.RLock()  # the progress thread speaks too, and so does a Ctrl-C handler
        self._saved: tuple[int, int] | None = None
        self._terminal = None
        self._tee: subprocess.Popen | None = None

    def __enter__(self) -> Console:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        self._terminal = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            if self.verbose:
                # -i: Ctrl-C reaches the whole process group; tee must outlive it to pass on the last lines.
                self._tee = subprocess.Popen(
                    ["tee", "-i", "-a", str(self.log_path)],
                    stdin=subprocess.PIPE,
                    stdout=self._saved[0],
                    stderr=self._saved[1],
                )
                target = self._tee.stdin.fileno()
            else:
                target = log_fd
            os.dup2(target, 1)
            os.dup2(target, 2)
        finally:
            os.close(log_fd)
        global _active
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        if self._tee is not None:
            self._tee.stdin.close()
            try:
                self._tee.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._tee.kill()
        self._terminal.close()

    def _write(self, text: str) -> None:
        with self._lock:
            if self.verbose:  # fd 1 is the tee: the terminal and the log file, in order
                print(text, flush=True)
                return
            self._terminal.write(text + "\n")
            self._terminal.flush()
            # The log file keeps the command's own lines too, in order and with the time, as its records have.
            stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            print("\n".join(f"{stamp} [pgdr] {line}" for line in text.splitlines() or [""]), flush=True)

    def say(self, text: str) -> None:
        """A phase line: ``==> text``."""
        self._write(f"==> {text}")

    def detail(self, text: str) -> None:
        """A line under the last phase, indented."""
        self._write(f"    {text}")

    def plain(self, text: str = "") -> None:
        """A line as it is (the break-glass command's own wording)."""
        self._write(text)


_active: Console | None = None


def say(text: str) -> None:
    """A phase line (``==> text``) on the active console's terminal, or on stdout where none is active."""
    _active.say(text) if _active else print(f"==> {text}", flush=True)


def detail(text: str) -> None:
    """An indented line under the last phase."""
    _active.detail(text) if _active else print(f"    {text}", flush=True)


def plain(text: str = "") -> None:
    """A line as it is."""
    _active.plain(text) if _active else print(text, flush=True)


def task_excerpt(
    log_path: Path, since: int, task_id: str, map_index: int = -1, lines: int = 10
) -> tuple[str, list[str]]:
    """Return the error and the last ``lines`` log lines of one task run by ``dag.test()`` since byte ``since``.

    :return: ``(error, lines)``: the message of the task's last exception, all its lines ("" when
        none is found), and the task's last log lines, each cut to 300 characters.
    """
    try:
        with open(log_path, "rb") as stream:
            stream.seek(since)
            text = stream.read().decode("utf-8", errors="replace")
    except OSError:
        return "", []
    start_mark = _TASK_START.format(task_id=task_id, map_index=map_index)
    end_mark = _TASK_END.format(task_id=task_id, map_index=map_index)
    begin = text.rfind(start_mark)
    if begin < 0:
        return "", []
    end = text.find(end_mark, begin)
    end = text.rfind("\n", begin, end) if end >= 0 else len(text)  # the end marker's line is not the task's
    span = text[begin:end].splitlines()[1:]
    error = ""
    found = [number for number, line in enumerate(span) if _EXCEPTION_LINE.match(line)]
    if found:
        message = [span[found[-1]].split(": ", 1)[1]]
        for line in span[found[-1] + 1 :]:
            if _RECORD_START.match(line):
                break
            message.append(line)
        error = "\n".join(message).strip()
    return error, [line if len(line) <= 300 else line[:297] + "..." for line in span[-lines:]]
