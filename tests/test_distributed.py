"""Two real processes through `accelerate launch` on CPU: DDP keeps their LoRA weights identical."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_overrides
from safetensors.torch import load_file


def launch_two_processes(config: str, run, **extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / config),
        *tiny_overrides(run, **{"train.max_steps": 3, "train.batch_size": 2, "train.checkpointing_steps": 2, **extra}),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


@pytest.mark.parametrize("config", ["tiny_dpo.yaml", "tiny_kto.yaml"])  # KTO all-reduces its reference point
def test_two_process_run_has_two_ranks_with_identical_lora(tmp_path, tiny_model_path, tiny_data_path, config):
    run = tmp_path / "ddp"
    launch_two_processes(config, run, **{"data.cache_dir": str(tmp_path / "features")})
    info = json.loads((run / "run_info.json").read_text())
    assert info["num_processes"] == 2
    # both processes encoded about half of the images, and together every one of them once
    shares = info["data_build"]["images_per_process"]
    assert len(shares) == 2 and all(0.4 <= share / sum(shares) <= 0.6 for share in shares), shares
    (index_file,) = (tmp_path / "features").rglob("index.safetensors")
    index = load_file(str(index_file))
    assert sorted(set(index["source_index"].tolist())) == list(range(64)) and sum(shares) == 64 * 2
    assert len(index["source_index"]) == (64 if config == "tiny_dpo.yaml" else 128)  # KTO: a record per image
    assert len(info["lora_checksums"]) == 2
    assert info["lora_checksums"][0] == info["lora_checksums"][1]
    assert info["global_step"] == 3
    # LoRA "up" matrices start at zero: non-zero ones prove the ranks trained (on different data) and still agree
    weights = load_file(str(run / "pytorch_lora_weights.safetensors"))
    assert max(w.abs().max().item() for k, w in weights.items() if "lora.up" in k) > 0
    # the checkpoint written under DDP is complete and loadable
    assert (run / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()


def test_two_process_resume_from_the_pickle_free_checkpoint_is_exact(tmp_path, tiny_model_path, tiny_data_path):
    """Each rank's RNG state, the optimizer and the EMA reference come back from safetensors and JSON: a resumed
    two-process run ends with the LoRA of the uninterrupted one."""
    extra = {"objective.reference": "ema", "objective.ema_update_every": 1, "train.lr_scheduler": "cosine"}
    full = tmp_path / "full"
    launch_two_processes("tiny_dpo.yaml", full, **extra)
    checkpoint = full / "checkpoint-2"
    assert {p.name for p in checkpoint.iterdir()} >= {"rng_state_0.json", "rng_state_1.json", "optimizer.json",
                                                      "ema_reference.safetensors", "lora_state.safetensors"}
    assert {p.suffix for p in checkpoint.iterdir()} == {".json", ".safetensors"}
    resumed = tmp_path / "resumed"
    shutil.copytree(checkpoint, resumed / "checkpoint-2")
    completed = launch_two_processes("tiny_dpo.yaml", resumed, **extra, **{"train.resume": "latest"})
    assert "resumed from" in completed.stdout
    a = load_file(str(full / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-7, rtol=0)
