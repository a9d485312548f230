"""Launchers for vlp_jax runs: Cloud TPU pods (`launch.tpu`), SLURM (`launch.slurm`), several processes on one
machine (`launch.local`). Each is `python -m launch.<name> --help`; `--dry-run` prints the exact commands."""
