"""Command line: `python -m vlp_jax.main --config=configs/clip.py:tiny [--workdir=DIR] [--mode=train|eval]`.

`--mode=eval` evaluates the workdir's latest checkpoint, or `--checkpoint=PATH` (a run's workdir or one of its
checkpoints/<step> directories), and writes <workdir>/eval/step_<N>.json and .png.

Intentionally short: it parses flags and calls importable functions, so a notebook can drive the same code.
Override any config value with `--config.a.b=value`.
"""

import os
import sys

from absl import app, flags, logging

from vlp_jax import cli

cli.define_config_flag()
flags.DEFINE_string("workdir", None, "Run directory; default workdir/<config>-<variant>.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train: train and evaluate; eval: evaluate only.")
flags.DEFINE_string(
    "checkpoint", None, "--mode=eval only: a run directory (its latest checkpoint) or a checkpoints/<step> directory; "
    "the report goes to --workdir, by default that run's directory."
)
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host TPU pods, SLURM).")
flags.DEFINE_string("coordinator_address", None, "--distributed where not auto-detected: process 0's host:port.")
flags.DEFINE_integer("num_processes", None, "--distributed where not auto-detected: how many processes.")
flags.DEFINE_integer("process_id", None, "--distributed where not auto-detected: this process's index.")
flags.DEFINE_bool("debug", False, "Show the traceback of a run-time error (otherwise one line and an exit code).")
flags.DEFINE_bool("library_logs", False, "Keep the INFO logs of orbax, jax and grain (otherwise WARNING and above).")
FLAGS = flags.FLAGS


def default_workdir(config_arg: str) -> str:
    """configs/clip.py:tiny -> workdir/clip-tiny (no variant = base)."""
    path, _, variant = config_arg.partition(":")
    return os.path.join("workdir", f"{os.path.splitext(os.path.basename(path))[0]}-{variant or 'base'}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.checkpoint and FLAGS.mode != "eval":
        raise app.UsageError(
            f"--checkpoint={FLAGS.checkpoint} is only read with --mode=eval; to warm-start training from another "
            "run, use --config.init_from=RUN_DIR"
        )
    import jax  # imported after flag parsing so --help stays fast

    from vlp_jax import preemption, train
    from vlp_jax.evaluate import run

    if FLAGS.distributed:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    logging.set_verbosity(logging.INFO)
    if not FLAGS.library_logs:
        cli.quiet_library_logs()
    workdir = FLAGS.workdir or (None if FLAGS.checkpoint else default_workdir(FLAGS["config"].config_filename))
    logging.info("process %d/%d, workdir %s", jax.process_index(), jax.process_count(), workdir or FLAGS.checkpoint)
    try:
        if FLAGS.mode == "eval":
            cli.report_errors(run.evaluate_checkpoint, FLAGS.config, workdir, FLAGS.checkpoint, debug=FLAGS.debug)
        else:
            cli.report_errors(train.train_and_evaluate, FLAGS.config, workdir, debug=FLAGS.debug)
    except preemption.Interrupted as stop:
        logging.warning("%s", stop)
        logging.flush()
        # An interrupted compile still runs in a daemon thread (preemption.interruptible); leaving through the
        # interpreter's shutdown could abort when it returns, so the process ends here, its files all closed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(preemption.PREEMPTED_EXIT_CODE)
    except preemption.Preempted as stop:
        logging.warning("%s", stop)
        sys.exit(preemption.PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
