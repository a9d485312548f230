"""Preemption: SIGTERM/SIGINT recorded instead of killing the run, agreed on by every process, so the loop
finishes its step, saves and exits with PREEMPTED_EXIT_CODE (the launcher or SLURM reruns the same command)."""

import contextlib
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the run saved itself and should be restarted (e.g. requeued by SLURM)


class Preempted(Exception):
    """Raised after the state was saved because the process was asked to stop (SIGTERM/SIGINT)."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"received {signal_name}: saved step {step}; rerun the same command to resume")
        self.step = step


class Interrupted(Preempted):
    """Raised at once by a signal during a phase with nothing to save (reading or rendering data); whatever the
    phase was writing is staged and removed, never left half-written."""

    def __init__(self, signal_name: str, phase: str):
        Exception.__init__(self, f"received {signal_name} while {phase}: stopped, nothing half-written; rerun the "
                                 "same command to continue")
        self.step = None


def interruptible(function, *args):
    """function(*args), run in a daemon thread while this (the main) thread waits in short joins: a signal handler
    runs only between Python bytecodes of the main thread, so this lets `StopSignal.immediate` interrupt a long C++
    call (an XLA compile) within a fraction of a second. An interrupted call's thread dies with the process."""
    outcome = {}

    def call():
        try:
            outcome["value"] = function(*args)
        except BaseException as error:  # noqa: BLE001 - re-raised in the calling thread
            outcome["error"] = error

    thread = threading.Thread(target=call, name=getattr(function, "__name__", "call"), daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class StopSignal:
    """Records SIGTERM/SIGINT instead of dying, so the loop can finish its step and save; all processes agree."""

    def __init__(self):
        self.received: int | None = None  # set by the handler: the signal this process received
        self.agreed: int | None = None  # set by `requested`: the signal every process stops for
        self._phase: str | None = None  # set by `immediate`: the phase a signal interrupts at once
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        del frame
        self.received = signum
        if self._phase is not None:
            raise Interrupted(signal.Signals(signum).name, self._phase)

    @contextlib.contextmanager
    def immediate(self, phase: str):
        """Within: a signal raises Interrupted at once instead of waiting for the end of a step."""
        self._phase = phase
        try:
            yield
        finally:
            self._phase = None

    def requested(self) -> bool:
        """Whether any process received a signal. Multi-process: a collective that every process calls once per
        step, so a signal sent to one process stops all of them after the same step."""
        signum = self.received or 0  # read once: a signal arriving during the collective counts at the next step
        if jax.process_count() > 1:
            signum = int(np.max(multihost_utils.process_allgather(np.array(signum))))  # max over [processes]
        self.agreed = signum or None
        return self.agreed is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __enter__(self) -> "StopSignal":
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()
