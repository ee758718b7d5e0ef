"""One run per output folder: ``train.output_dir/.diffalign.lock`` names the pid and host of the run using it.

Two runs writing one folder end with the config of one and the weights of the other, and their checkpoint
rotations delete each other's files. So the main process of a run takes the lock before it writes anything and
gives it back when the run ends, however it ends (an error, Ctrl-C, SIGTERM: see ``terminate_as_exit``).

The lock is an exclusive ``flock`` on the file, held for the life of the run. The kernel drops it when the
process dies, even by kill -9, so there is no stale-lock guessing and no race between two runs taking over the
same stale file: one gets the flock, the other is refused.

- A second run finds the flock held and is refused with a ``ConfigError`` naming the holder (from the file).
- A file left by a dead process on this host (its flock gone) is taken over, saying so.
- A file written by a run on another host, whose flock this host may not see on a network file system, is
  refused; the message says to delete the file if that run is known to be gone. A run that ends removes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import torch

from diffalign.errors import ConfigError
from diffalign.logs import get_logger

logger = get_logger(__name__)
LOCK_NAME = ".diffalign.lock"
_HELD: dict[Path, int] = {}  # lock path -> the open descriptor carrying this process's flock


def describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}"
            f" ({holder.get('command') or 'unknown command'})")


def acquire_run_lock(output_dir: str | Path) -> tuple[Path, str | None]:
    """Lock ``output_dir`` for this process. Returns the lock path and a note when a dead run's lock was taken
    over. Raises ``ConfigError`` when a live run, or a run on another host, holds the folder."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = read_lock(path) or {}
            raise ConfigError(f"train.output_dir={output_dir} is in use by another run: {describe(holder)}. Choose "
                              "another train.output_dir, or wait for that run to end") from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # the holder removed the file as we opened it: lock the new one
            os.close(fd)
            continue
        holder = parse_lock(os.read(fd, 1 << 16))
        note = None
        if holder is not None:
            if holder.get("host") != socket.gethostname():
                os.close(fd)
                raise ConfigError(f"train.output_dir={output_dir} is locked by {describe(holder)}, which cannot be "
                                  f"checked from this host. If that run is gone, delete {path}")
            note = f"took over the lock of {output_dir} left by a run that is no longer running: {describe(holder)}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(lock_owner()).encode(), 0)
        _HELD[path] = fd
        return path, note


def lock_owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:300]}


def parse_lock(data: bytes) -> dict | None:
    try:
        holder = json.loads(data)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def read_lock(path: Path) -> dict | None:
    try:
        return parse_lock(path.read_bytes())
    except OSError:
        return None


def release_run_lock(path: Path) -> None:
    """Remove the lock file, then drop the flock (in that order, so a waiting run locks a fresh file)."""
    fd = _HELD.pop(path, None)
    if fd is None:
        return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.close(fd)


def lock_output_dir(accelerator, output_dir: Path) -> Path | None:
    """The main process takes the run folder's lock; every process learns whether it did (see ``run_lock``)."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock, note = acquire_run_lock(output_dir)
            if note:
                logger.info(note)
        except ConfigError as caught:
            error = caught
    refused = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), reduction="sum")
    if error is not None:
        raise error
    if refused.item():
        raise ConfigError(f"train.output_dir={output_dir} is in use by another run (see the main process's message)")
    return lock


@contextlib.contextmanager
def terminate_as_exit():
    """SIGTERM (what slurm, Kubernetes and ``timeout`` send) becomes ``SystemExit(143)``, so ``finally`` blocks run
    and the run folder's lock is released, as on Ctrl-C or an error. Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
