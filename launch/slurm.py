"""A SLURM batch job for a vlp_jax run: writes the sbatch script from launch/slurm.sbatch and submits it.

    python -m launch.slurm --nodes=2 --gpus_per_node=8 --time=04:00:00 --config=configs/clip.py:base \
        --workdir=/shared/runs/b16 [--partition=P] [--account=A] [--dry-run] [-- FLAGS for vlp_jax.main]

One task per accelerator (tasks per node = --gpus_per_node, one GPU each), `srun python -m vlp_jax.main
--distributed` (jax.distributed finds the SLURM job by itself), SIGTERM --signal_seconds before the time limit so
the run saves and exits 75, and then the job requeues itself and resumes from the workdir. `--dry-run` prints the
script and the sbatch command.
"""

import argparse
import os
import shlex
import string
import sys

from launch import common

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm.sbatch")


def script(args, extra: list[str]) -> str:
    """The sbatch script for these arguments."""
    config_path, _, variant = args.config.partition(":")
    config = os.path.abspath(config_path) + (f":{variant}" if variant else "")  # srun's tasks may start elsewhere
    directives = [f"#SBATCH --partition={args.partition}"] * bool(args.partition)
    directives += [f"#SBATCH --account={args.account}"] * bool(args.account)
    directives += [f"#SBATCH {d}" for d in args.sbatch]
    with open(TEMPLATE, encoding="utf-8") as f:
        template = string.Template(f.read())
    return template.substitute(
        job_name=args.job_name, nodes=args.nodes, tasks_per_node=args.gpus_per_node, time=args.time,
        gpu_line="#SBATCH --gpus-per-task=1\n" if args.gpus else "",
        signal_seconds=args.signal_seconds, log_dir=args.logs or os.path.join(args.workdir, "logs"),
        extra_directives="\n".join(directives), python=args.python,
        run_flags=" ".join(shlex.quote(f) for f in common.run_flags(config, args.workdir, extra)),
    )


def launch(args, extra: list[str]) -> int:
    text = script(args, extra)
    path = args.script or os.path.join(args.workdir, "vlp_jax.sbatch")
    command = ["sbatch", path]
    if args.dry_run:
        print(f"# {path}\n{text}")
        print(common.quoted(command))
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    os.makedirs(args.logs or os.path.join(args.workdir, "logs"), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return common.execute(command, dry_run=False)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__.split("\n")[0],
                                epilog="Flags after a bare -- go to vlp_jax.main.")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus_per_node", "--gpus-per-node", type=int, required=True,
                   help="accelerators per node = tasks per node")
    p.add_argument("--no_gpus", "--no-gpus", dest="gpus", action="store_false",
                   help="no --gpus-per-task line (CPU-only nodes)")
    p.add_argument("--time", required=True, help="time limit, e.g. 04:00:00")
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True, help="a directory every node can reach")
    p.add_argument("--job_name", "--job-name", default="vlp_jax")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--sbatch", action="append", default=[], help="extra #SBATCH directive, e.g. --sbatch=--qos=high")
    p.add_argument("--signal_seconds", "--signal-seconds", type=int, default=300,
                   help="SIGTERM this long before the time limit (enough for one step and a save)")
    p.add_argument("--logs", default="", help="job output directory; default <workdir>/logs")
    p.add_argument("--script", default="", help="where the sbatch script is written; default <workdir>/vlp_jax.sbatch")
    p.add_argument("--python", default="python", help="the Python that has vlp_jax installed, on the nodes")
    p.add_argument("--dry_run", "--dry-run", action="store_true", help="print the script and command, submit nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    return common.main(parser, launch, argv)


if __name__ == "__main__":
    sys.exit(main())
