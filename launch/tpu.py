"""Cloud TPU pods with gcloud: create (queued resources), setup (install vlp_jax on every worker), run (every
worker, --distributed, workdir on a bucket; re-run while it exits 75), logs (per worker), stop, delete.

    python -m launch.tpu create --name=vlp --zone=us-central2-b --accelerator=v4-32 [--spot]
    python -m launch.tpu setup  --name=vlp --zone=us-central2-b --source=git+https://github.com/ORG/vlp_jax@REF
    python -m launch.tpu setup  --name=vlp --zone=us-central2-b --wheel=dist/vlp_jax-0.1.0-py3-none-any.whl
    python -m launch.tpu run    --name=vlp --zone=us-central2-b --config=configs/clip.py:base \
                                --workdir=gs://BUCKET/runs/b16 [-- FLAGS for vlp_jax.main]
    python -m launch.tpu logs   --name=vlp --zone=us-central2-b --workers=0,1,2,3 [--lines=50]
    python -m launch.tpu stop   --name=vlp --zone=us-central2-b      # SIGTERM: the run saves and exits 75
    python -m launch.tpu delete --name=vlp --zone=us-central2-b

Every subcommand takes --dry-run (print the gcloud commands, run nothing) and --project. `run` copies the local
config file to every worker (so the run uses exactly the file you edited; it imports `configs.common` from the
installed package) and starts `python3 -m vlp_jax.main` there with its output in ~/vlp_jax_run/run.log.
"""

import argparse
import os
import shlex
import sys

from launch import common

REMOTE_DIR = "vlp_jax_run"  # on every worker, under the home directory: the config, run.log and run.pid


def gcloud(args, *command: str) -> list[str]:
    """A `gcloud compute tpus ...` command for the pod `args.name` in `args.zone`."""
    project = [f"--project={args.project}"] if args.project else []
    return ["gcloud", "compute", "tpus", *command, f"--zone={args.zone}", *project]


def on_workers(args, remote: str, worker: str = "all") -> list[str]:
    """Runs the shell line `remote` on the pod's workers (all, or one index)."""
    return gcloud(args, "tpu-vm", "ssh", args.name, f"--worker={worker}", f"--command={remote}")


def create(args, extra) -> list[list[str]]:
    del extra
    spot = ["--spot"] if args.spot else []
    return [gcloud(args, "queued-resources", "create", args.name, f"--node-id={args.name}",
                   f"--accelerator-type={args.accelerator}", f"--runtime-version={args.runtime_version}", *spot)]


def setup(args, extra) -> list[list[str]]:
    del extra
    if bool(args.source) == bool(args.wheel):
        raise SystemExit("setup: give exactly one of --source=git+URL@REF and --wheel=PATH")
    commands = []
    if args.wheel:
        commands.append(gcloud(args, "tpu-vm", "scp", args.wheel, f"{args.name}:", "--worker=all"))
        package = f"~/{os.path.basename(args.wheel)}"
    else:
        package = shlex.quote(f"vlp_jax @ {args.source}")
    install = f"python3 -m pip install -U {shlex.quote(args.jax)} {package} && mkdir -p ~/{REMOTE_DIR}"
    return commands + [on_workers(args, install)]


def run_command(args, extra) -> tuple[list[str], list[str]]:
    """(copy the config file to every worker, start the run on every worker)."""
    config_path, _, variant = args.config.partition(":")
    remote_config = f"{os.path.basename(config_path)}" + (f":{variant}" if variant else "")
    copy = gcloud(args, "tpu-vm", "scp", config_path, f"{args.name}:~/{REMOTE_DIR}/", "--worker=all")
    flags = " ".join(shlex.quote(f) for f in common.run_flags(remote_config, args.workdir, extra))
    # run.pid lets `stop` signal exactly this process; exec keeps the exit code (75 = saved, run again).
    remote = (f"cd ~/{REMOTE_DIR} && echo $$ > run.pid && exec python3 -m vlp_jax.main {flags} "
              ">> run.log 2>&1")
    return copy, on_workers(args, remote)


def logs(args, extra) -> list[list[str]]:
    del extra
    tail = f"tail -n {args.lines} ~/{REMOTE_DIR}/run.log"
    return [on_workers(args, tail, worker) for worker in args.workers.split(",")]


def stop(args, extra) -> list[list[str]]:
    del extra
    return [on_workers(args, f"kill -TERM $(cat ~/{REMOTE_DIR}/run.pid)")]


def delete(args, extra) -> list[list[str]]:
    del extra
    return [gcloud(args, "queued-resources", "delete", args.name, "--force", "--quiet")]


def launch(args, extra: list[str]) -> int:
    if args.subcommand == "run":
        copy, start = run_command(args, extra)
        if args.dry_run:
            common.execute(copy, dry_run=True)
            return common.execute(start, dry_run=True)
        code = common.execute(copy, dry_run=False)
        if code:
            return code
        return common.until_finished(lambda: common.execute(start, dry_run=False), args.max_restarts)
    for command in SUBCOMMANDS[args.subcommand](args, extra):
        code = common.execute(command, args.dry_run)
        if code:
            return code
    return 0


SUBCOMMANDS = {"create": create, "setup": setup, "run": run_command, "logs": logs, "stop": stop, "delete": delete}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__.split("\n")[0],
                                epilog="Flags after a bare -- go to vlp_jax.main (run).")
    sub = p.add_subparsers(dest="subcommand", required=True)
    for name in SUBCOMMANDS:
        s = sub.add_parser(name)
        s.add_argument("--name", required=True, help="the TPU (and queued resource) name")
        s.add_argument("--zone", required=True)
        s.add_argument("--project", default="")
        s.add_argument("--dry_run", "--dry-run", action="store_true", help="print the commands, run nothing")
        if name == "create":
            s.add_argument("--accelerator", required=True, help="e.g. v4-32, v5litepod-64")
            s.add_argument("--runtime_version", "--runtime-version", default="tpu-ubuntu2204-base")
            s.add_argument("--spot", action="store_true")
        elif name == "setup":
            s.add_argument("--source", default="", help="pip source, e.g. git+https://github.com/ORG/vlp_jax@REF")
            s.add_argument("--wheel", default="", help="a local wheel (python -m build) copied to every worker")
            s.add_argument("--jax", default="jax[tpu]", help="the JAX requirement installed beside it")
        elif name == "run":
            s.add_argument("--config", required=True, help="a local config file[:variant]")
            s.add_argument("--workdir", required=True, help="gs://BUCKET/... (every worker writes there)")
            s.add_argument("--max_restarts", "--max-restarts", type=int, default=100, help="re-runs after exit 75")
        elif name == "logs":
            s.add_argument("--workers", default="0", help="comma-separated worker indices")
            s.add_argument("--lines", type=int, default=50)
    return p


def main(argv: list[str] | None = None) -> int:
    return common.main(parser, launch, argv)


if __name__ == "__main__":
    sys.exit(main())
