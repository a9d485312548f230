"""What every launcher shares: printing or running a command, and re-running a run that saved and exited 75."""

import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence

# The run saved its state and asks to be restarted (vlp_jax/preemption.py; kept in sync by tests/unit/test_launch.py,
# so the launchers need no JAX to import).
PREEMPTED_EXIT_CODE = 75


def quoted(command: Sequence[str], env: dict[str, str] | None = None) -> str:
    """The command as one shell line (what --dry-run prints), with its extra environment first."""
    assignments = [f"{key}={shlex.quote(value)}" for key, value in sorted((env or {}).items())]
    return " ".join(assignments + [shlex.quote(part) for part in command])


def execute(command: Sequence[str], dry_run: bool) -> int:
    """Runs `command` (printed first, on stderr), or only prints it on stdout with `dry_run`; its exit code."""
    if dry_run:
        print(quoted(command))
        return 0
    print(f"+ {quoted(command)}", file=sys.stderr, flush=True)
    return subprocess.run(list(command), check=False).returncode


def until_finished(attempt: Callable[[], int], max_restarts: int) -> int:
    """Calls `attempt` (one whole run) again while it exits with PREEMPTED_EXIT_CODE, at most `max_restarts` times
    more; returns the last exit code (75 if restarts ran out)."""
    code = attempt()
    restarts = 0
    while code == PREEMPTED_EXIT_CODE and restarts < max_restarts:
        restarts += 1
        print(f"run preempted after saving (exit {code}): restart {restarts}/{max_restarts}", file=sys.stderr,
              flush=True)
        code = attempt()
    return code


def run_flags(config: str, workdir: str, extra: Sequence[str]) -> list[str]:
    """The vlp_jax.main arguments every launcher passes: config, workdir, --distributed and the user's extras."""
    return [f"--config={config}", f"--workdir={workdir}", "--distributed", *extra]


def split_extra(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """argv before and after a bare `--`: the launcher's own arguments and the flags passed on to vlp_jax.main."""
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1 :]
    return argv, []


def main(parser: Callable, launch: Callable, argv: Sequence[str] | None = None) -> int:
    """A launcher's command line: its own arguments (`parser()`) before a bare `--`, vlp_jax.main's flags after;
    returns `launch(arguments, flags)`, the exit code."""
    own, extra = split_extra(sys.argv[1:] if argv is None else argv)
    return launch(parser().parse_args(own), extra)
