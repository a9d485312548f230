"""N processes of one distributed run on this machine (CPU or GPUs), to try multi-process runs before a cluster.

    python -m launch.local --processes=2 --config=configs/clip.py:tiny --workdir=/tmp/run [--dry-run] [-- FLAGS]

Each process gets the coordinator flags (process 0 listens on localhost:--port) and its own devices: on CPU
`--devices-per-process` fake host devices, on GPU its own CUDA_VISIBLE_DEVICES. Output goes to
<logs>/process<i>.log. A run that saved and exited 75 (all processes preempted) is started again, until it ends;
if one process fails the others are stopped. SIGTERM/SIGINT to the launcher are passed on (the run saves, exits 75)
and the launcher then stops too.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from launch import common

STOP_GRACE_S = 120  # how long processes get to save and exit after SIGTERM before they are killed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(index: int, platform: str, devices: int) -> dict[str, str]:
    """The environment added for process `index`: its devices."""
    if platform == "cpu":
        return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(index * devices + d) for d in range(devices))}


def commands(args, extra: list[str]) -> list[tuple[list[str], dict[str, str]]]:
    """(argv, added environment) of each process."""
    result = []
    for index in range(args.processes):
        argv = [args.python, "-m", "vlp_jax.main", *common.run_flags(args.config, args.workdir, ()),
                f"--coordinator_address=localhost:{args.port}", f"--num_processes={args.processes}",
                f"--process_id={index}", *extra]
        result.append((argv, process_env(index, args.platform, args.devices_per_process)))
    return result


class Processes:
    """One attempt: the processes of a run, their logs, and stopping them all when one fails or a signal comes."""

    def __init__(self, specs, logs: str):
        os.makedirs(logs, exist_ok=True)
        self.logs = [os.path.join(logs, f"process{i}.log") for i in range(len(specs))]
        self.children = []
        for (argv, env), path in zip(specs, self.logs, strict=True):
            with open(path, "a", encoding="utf-8") as log:
                self.children.append(subprocess.Popen(argv, env={**os.environ, **env}, stdout=log,
                                                      stderr=subprocess.STDOUT))

    def signal_all(self, signum: int) -> None:
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signum)

    def wait(self) -> int:
        """0 when every process finished, 75 when all saved after a preemption, else the first failure's code."""
        first_failure = None
        while None in [child.poll() for child in self.children]:  # polls every child: their return codes are set
            failed = [c.returncode for c in self.children if c.returncode not in (None, 0, common.PREEMPTED_EXIT_CODE)]
            if failed:  # the others would wait for it in their next collective: stop them
                first_failure = failed[0]
                self.signal_all(signal.SIGTERM)
                self.stop_within(STOP_GRACE_S)
            time.sleep(0.2)
        codes = [child.returncode for child in self.children]
        for code, path in zip(codes, self.logs, strict=True):
            print(f"{path}: exit {code}", file=sys.stderr, flush=True)
        failed = [c for c in codes if c not in (0, common.PREEMPTED_EXIT_CODE)]
        if first_failure is not None or failed:
            return first_failure if first_failure is not None else failed[0]
        return common.PREEMPTED_EXIT_CODE if common.PREEMPTED_EXIT_CODE in codes else 0

    def stop_within(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        for child in self.children:
            try:
                child.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def launch(args, extra: list[str]) -> int:
    if args.port == 0:
        args.port = free_port()
    specs = commands(args, extra)
    if args.dry_run:
        for argv, env in specs:
            print(common.quoted(argv, env))
        return 0
    stopped = []

    def attempt() -> int:
        if stopped:
            return stopped[0]
        processes = Processes(specs, args.logs or os.path.join(args.workdir, "logs"))

        def forward(signum, frame):
            del frame
            stopped.append(common.PREEMPTED_EXIT_CODE)
            processes.signal_all(signal.SIGTERM)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return processes.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    return common.until_finished(attempt, args.max_restarts)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__.split("\n")[0],
                                epilog="Flags after a bare -- go to vlp_jax.main.")
    p.add_argument("--processes", type=int, default=2, help="processes of the run")
    p.add_argument("--config", required=True, help="e.g. configs/clip.py:tiny")
    p.add_argument("--workdir", required=True)
    p.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--devices_per_process", "--devices-per-process", type=int, default=1)
    p.add_argument("--port", type=int, default=0, help="coordinator port; 0 = a free one")
    p.add_argument("--logs", default="", help="log directory; default <workdir>/logs")
    p.add_argument("--max_restarts", "--max-restarts", type=int, default=100, help="re-runs after exit 75")
    p.add_argument("--python", default=sys.executable, help="the Python that has vlp_jax installed")
    p.add_argument("--dry_run", "--dry-run", action="store_true", help="print the commands, run nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    return common.main(parser, launch, argv)


if __name__ == "__main__":
    sys.exit(main())
