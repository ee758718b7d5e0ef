"""One run per output folder (issue 12, fault 7): a second run is refused, a dead run's lock is taken over."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, tiny_overrides

from diffalign.config import ConfigError
from diffalign.training.run_lock import LOCK_NAME, acquire_run_lock, release_run_lock


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_second_lock_is_refused_and_release_frees_the_folder(tmp_path):
    lock, note = acquire_run_lock(tmp_path)
    assert note is None and json.loads(lock.read_text())["pid"] == os.getpid()
    with pytest.raises(ConfigError, match=rf"train.output_dir={tmp_path} is in use by another run: pid {os.getpid()}"):
        acquire_run_lock(tmp_path)
    release_run_lock(lock)
    assert not lock.exists()
    lock, _ = acquire_run_lock(tmp_path)
    release_run_lock(lock)


def test_stale_locks_are_taken_over_saying_so(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "since": "earlier"}))
    lock, note = acquire_run_lock(tmp_path)
    assert "no longer running" in note and json.loads(lock.read_text())["pid"] == os.getpid()
    release_run_lock(lock)
    path.write_text("")  # a creator killed between creating and writing the file
    lock, note = acquire_run_lock(tmp_path)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    release_run_lock(lock)


TAKE_OVER = """
import sys, time
from diffalign.config import ConfigError
from diffalign.training.run_lock import acquire_run_lock
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
try:
    acquire_run_lock(sys.argv[1])
    print("acquired", flush=True)
    time.sleep(3)
except ConfigError:
    print("refused", flush=True)
"""


def test_racing_takeovers_of_one_stale_lock_give_one_owner(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    start = time.time() + 3
    children = [subprocess.Popen([sys.executable, "-c", TAKE_OVER, str(tmp_path), str(start)], stdout=subprocess.PIPE,
                                 text=True) for _ in range(4)]
    outcomes = sorted(child.communicate(timeout=120)[0].strip() for child in children)
    assert outcomes == ["acquired", "refused", "refused", "refused"]


def test_a_lock_from_another_host_is_refused_with_how_to_clear_it(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere-node-7", "since": "x"}))
    with pytest.raises(ConfigError, match=rf"cannot be checked from this host. If that run is gone, delete {tmp_path}"):
        acquire_run_lock(tmp_path)


def test_two_train_runs_into_one_folder(tmp_path):
    """The second run is refused in one line (exit 2) and writes nothing; the first ends normally; a run killed
    with -9 leaves a stale lock that the next run takes over."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}

    def command(steps):
        return [sys.executable, "-m", "diffalign.cli", "train", str(ROOT / "configs/tiny_dpo.yaml"),
                *tiny_overrides(run, **{"train.max_steps": steps, "train.checkpointing_steps": 1000})]

    first = subprocess.Popen(command(400), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (run / "config.yaml").exists():  # the first run holds the lock and is training
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.5)
        second = subprocess.run(command(2), env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and f"is in use by another run: pid {first.pid}" in err[0], second.stderr[-2000:]
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == first.pid
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = subprocess.run(command(2), env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"took over the lock of {run} left by a run that is no longer running: pid {first.pid}" in third.stdout
    assert not (run / LOCK_NAME).exists()  # released at the end
    assert (run / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_run_releases_the_lock(tmp_path, signum, code):
    """SIGTERM is what slurm, Kubernetes and `timeout` send, SIGINT is Ctrl-C: the run ends (Ctrl-C with one line,
    no traceback), and its lock goes with it."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "diffalign.cli", "train", str(ROOT / "configs/tiny_dpo.yaml"),
               *tiny_overrides(run, **{"train.max_steps": 400, "train.checkpointing_steps": 1000})]
    # A shell's background job (CI may be one) inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: give the child the default disposition, as an interactive terminal does.
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not (run / "config.yaml").exists():
        assert child.poll() is None and time.time() < deadline, child.communicate()
        time.sleep(0.5)
    assert (run / LOCK_NAME).exists()
    child.send_signal(signum)
    _, err = child.communicate(timeout=120)
    assert child.returncode == code
    assert not (run / LOCK_NAME).exists()
    if signum == signal.SIGINT:
        assert "Traceback" not in err and err.rstrip().endswith("diffalign train: interrupted")
