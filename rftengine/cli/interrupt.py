"""Ctrl-C and SIGTERM during training: stop after the step in progress with a checkpoint, and
say what was saved and the command that resumes."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from contextlib import contextmanager

from rftengine import distributed
from rftengine.checkpoint import PREFIX, latest_checkpoint
from rftengine.methods.loop import STOP, TrainingInterrupted


def report_interruption(exc: TrainingInterrupted, args) -> None:
    """What a stop by SIGINT/SIGTERM left on disk, and the exact command that resumes it (rank 0
    says it, with the torchrun launch a run of several ranks resumes under)."""
    if not getattr(exc, "main_rank", True):
        return
    name = signal.Signals(exc.signum).name
    latest = latest_checkpoint(exc.output_dir)
    if exc.checkpointed:
        what = f"after step {exc.step}; checkpoint written: {exc.output_dir / f'{PREFIX}{exc.step}'}"
    elif latest is not None:
        what = f"at step {exc.step} with nothing new to save; the newest checkpoint is {latest}"
    else:
        what = "before the first step; nothing was saved"
    print(f"rftengine train: stopped by {name} {what}", file=sys.stderr)
    command = shlex.join(["rftengine", "train", args.config, *args.overrides])
    ranks = getattr(exc, "world_size", 1)
    if ranks > 1:
        command = f"torchrun [the same launch options: {ranks} ranks] $(which rftengine) " + command[len("rftengine "):]
    if latest is not None:
        print(f"resume with: {command} --resume", file=sys.stderr)
    else:
        print(f"start again with: {command}", file=sys.stderr)


@contextmanager
def stop_on_signals():
    """Around training: the first SIGINT or SIGTERM sets `STOP`, so that the training loop
    finishes the step in progress, writes a checkpoint and raises TrainingInterrupted; a second
    one raises KeyboardInterrupt at once (the checkpoint being written, if any, is discarded
    whole). The previous handlers are restored after. Outside the main thread, where handlers
    cannot be installed, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if STOP.signum is not None:
            raise KeyboardInterrupt
        STOP.signum = signum
        if not distributed.is_main_process():
            return  # torchrun signals every rank: rank 0 says it once
        # os.write, not print: the handler may run in the middle of a print to stderr (tqdm).
        os.write(2, f"\nrftengine train: {signal.Signals(signum).name} received: stopping after the current "
                    "step and writing a checkpoint (send it again to abort at once)\n".encode())

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        STOP.signum = None
