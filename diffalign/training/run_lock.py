"""One run per output folder: ``train.output_dir/.diffalign.lock`` holds the pid and host of the run using it.

Two runs writing one folder end with the config of one and the weights of the other, and their checkpoint
rotations delete each other's files. So the main process of a run creates the lock file atomically
(``O_CREAT | O_EXCL``) before it writes anything, and removes it when the run ends, however it ends.

- A second run finds the lock and is refused with a ``ConfigError`` that names the holder.
- A lock left by a dead process (killed with -9, a lost node) is taken over, saying so. A process counts as the
  same one only if its pid *and* its start time (Linux ``/proc/<pid>/stat``) match, so a recycled pid does not
  keep a stale lock alive.
- A lock from another host cannot be checked from here: the run is refused, and the message says to delete the
  file if that run is known to be gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from diffalign.config import ConfigError

LOCK_NAME = ".diffalign.lock"


def process_start_time(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux); None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the parenthesised command name


def process_alive(pid: int, start_time: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    current = process_start_time(pid)
    return start_time is None or current is None or current == start_time


def lock_owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start_time": process_start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}


def acquire_run_lock(output_dir: str | Path) -> tuple[Path, str | None]:
    """Create the lock of ``output_dir`` for this process. Returns the lock path and a note when a stale lock
    was taken over. Raises ``ConfigError`` when a live run (or one on another host) holds the folder."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path, note = output_dir / LOCK_NAME, None
    for _ in range(3):  # a stale lock is removed and creation retried; another run may win that race
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_lock(path)
            if holder is None:  # being written by its creator right now: give it a moment
                time.sleep(0.5)
                holder = read_lock(path)
            if holder is None:  # still unreadable: its creator died between creating and writing it
                note = f"took over the unreadable lock file {path}"
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            where = (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}"
                     f" ({holder.get('command') or 'unknown command'})")
            if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
                if process_alive(holder["pid"], holder.get("start_time")):
                    raise ConfigError(f"train.output_dir={output_dir} is in use by another run: {where}. Choose "
                                      "another train.output_dir, or wait for that run to end") from None
                note = f"took over the lock of {output_dir} left by a run that is no longer running: {where}"
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            raise ConfigError(f"train.output_dir={output_dir} is locked by {where}, which cannot be checked from "
                              f"this host. If that run is gone, delete {path}") from None
        with os.fdopen(fd, "w") as handle:
            json.dump(lock_owner(), handle)
        return path, note
    raise ConfigError(f"train.output_dir={output_dir}: could not take the lock {path}; another run keeps taking it")


def read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def release_run_lock(path: Path) -> None:
    """Remove the lock if this process still holds it."""
    holder = read_lock(path)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
