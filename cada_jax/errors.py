"""Exceptions and exit codes that the command line turns into documented exit statuses."""

from __future__ import annotations

# `cada sft`, `cada rl` and `cada pipeline` exit with this status when SIGTERM / SIGINT stopped
# them after a checkpoint was saved, so a scheduler can tell a preempted run (resubmit the same
# command to resume) from a finished one (0) and from a failed one (1).
EXIT_PREEMPTED = 75


class Preempted(RuntimeError):
    """A training stage stopped on a signal after saving its checkpoint; rerun to resume."""
