"""What a command-line run tells the pgdr tasks it runs in its own process.

``python -m pgdr restore`` (:mod:`pgdr.local.cli`) runs the ``pgdr_restore`` DAG in-process. It
says who runs it, for the restore report, and that its operator pressed Ctrl-C, so that no retry
or later task does more work. Both travel as environment variables of that process.
"""

VIA_ENV_VAR = "PGDR_RESTORE_VIA"  # e.g. "the command line (python -m pgdr restore) as root@host"
STOP_REQUESTED_ENV_VAR = "PGDR_STOP_REQUESTED"  # set once the operator asked the run to stop
