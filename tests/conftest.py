"""Shared fixtures: a per-session cache for tiny models, tiny data and features, and small train configs."""

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

# Before diffalign is imported anywhere: tiny models and feature caches go to a throwaway folder, not ~/.cache.
os.environ.setdefault("DIFFALIGN_CACHE", tempfile.mkdtemp(prefix="diffalign-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from diffalign.offline.specs import resolve_model_spec

    return resolve_model_spec("tiny:sd15")


@pytest.fixture(scope="session")
def tiny_data_path() -> str:
    from diffalign.offline.specs import resolve_data_spec

    return resolve_data_spec("tiny:pairs")


def tiny_overrides(output_dir, **extra) -> list[str]:
    """A short tiny DPO run: small enough for the fast suite."""
    values = {
        "train.output_dir": str(output_dir),
        "train.max_steps": 6,
        "train.batch_size": 4,
        "train.learning_rate": 1e-3,
        "train.checkpointing_steps": 3,
        "log.every_n_steps": 1,
        "log.validation_every_n_steps": 0,
        "log.report_to": "none",
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def assert_cached_and_uncached_train_alike(config: str, tmp_path, **extra) -> None:
    """Two DPO steps (with a validation grid) with and without the feature cache: the same batches, latents,
    conditioning and dropout draws either way, so the same errors."""
    from diffalign.config import load_config
    from diffalign.training.trainer import train

    metrics = {}
    for cache in ("true", "false"):
        cfg = load_config(ROOT / "configs" / config, tiny_overrides(
            tmp_path / f"run-{cache}", **{"data.cache": cache, "data.cache_dir": str(tmp_path / "features"),
                                          "data.prompt_dropout": 0.5, "train.max_steps": 2, "train.batch_size": 2,
                                          "log.validation_every_n_steps": 2, **extra}))
        result = train(cfg)
        assert result.global_step == 2 and result.skipped_steps == 0
        assert result.lora_path.is_file() and result.grid_path.is_file()
        metrics[cache] = result.metrics
    for name in ("policy_mse_w", "policy_mse_l", "loss"):
        assert metrics["true"][name] == pytest.approx(metrics["false"][name], rel=1e-4, abs=1e-6), name


def kill_and_resume(command, full: Path, killed: Path, checkpoint: str) -> subprocess.CompletedProcess:
    """Run ``command(run, **overrides)`` (a ``diffalign train`` command line) to the end into ``full``; run it again
    into ``killed`` and SIGKILL it once ``checkpoint`` exists there; then resume it with ``train.resume=latest``.
    Every part runs in a fresh process with one thread, so the arithmetic is the same. Returns the resumed run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command(full), cwd=ROOT, env=env, check=True, capture_output=True)
    child = subprocess.Popen(command(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / checkpoint).is_dir() and time.time() < deadline:
        assert child.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not (killed / "pytorch_lora_weights.safetensors").exists()
    resumed = subprocess.run(command(killed, **{"train.resume": "latest"}), cwd=ROOT, env=env, check=True,
                             capture_output=True, text=True)
    assert "resumed from" in resumed.stdout
    return resumed
