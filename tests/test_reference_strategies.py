"""Every documented reference strategy trains with LoRA and with full fine-tuning, on every family (issue 12,
fault 3: LoRA with an EMA reference crashed at step 1, because the EMA weights were copied into the LoRA in place
after the policy forward)."""

import math

import pytest
import torch
from conftest import ROOT, tiny_overrides
from safetensors.torch import load_file

from diffalign.config import load_config
from diffalign.families import load_components
from diffalign.training.trainer import train

FAMILIES = ["sd15", "sd2v", "sdxl", "sd3", "flux"]
# (lora.enabled, objective.reference): lora_disabled needs adapters; "none" is the reference-free objectives'
# strategy, trained with every family in test_objective_training.py.
STRATEGIES = [(True, "lora_disabled"), (True, "frozen_copy"), (True, "ema"), (False, "frozen_copy"), (False, "ema")]


@pytest.mark.parametrize("lora, reference", STRATEGIES, ids=[f"{'lora' if on else 'full'}-{r}" for on, r in STRATEGIES])
@pytest.mark.parametrize("family", FAMILIES)
def test_reference_strategy_trains(tmp_path, family, lora, reference):
    cfg = load_config(ROOT / "configs" / "tiny_dpo.yaml", tiny_overrides(tmp_path / "run", **{
        "model.pretrained": f"tiny:{family}", "lora.enabled": lora, "objective.reference": reference,
        "objective.ema_update_every": 1, "objective.ema_decay": 0.5, "train.max_steps": 2, "train.batch_size": 2,
        "train.checkpointing_steps": 1, "train.lr_warmup_steps": 0, "train.learning_rate": 1e-3 if lora else 1e-4}))
    # full fine-tune: the base weights, to see them move (a LoRA's B starts at zero instead)
    initial = None if lora else dict(load_components(cfg.model).denoiser.named_parameters())
    result = train(cfg)
    assert result.global_step == 2 and result.skipped_steps == 0 and math.isfinite(result.metrics["loss"])
    trained = {name: p for name, p in result.denoiser.named_parameters() if p.requires_grad}
    if lora:  # LoRA B starts at zero: a non-zero B means the policy really trained
        assert max(p.abs().max().item() for name, p in trained.items() if "lora_B" in name) > 0
    else:
        assert any(not torch.equal(initial[name], p.detach().cpu()) for name, p in trained.items())
    checkpoint = result.output_dir / "checkpoint-1"
    if reference == "ema":  # the EMA moved from its start and was saved with the checkpoint
        ema = load_file(str(checkpoint / "ema_reference.safetensors"))
        if lora:
            assert max(v.abs().max().item() for k, v in ema.items() if "lora_B" in k) > 0
        else:
            assert any(not torch.equal(initial[k], v) for k, v in ema.items() if k in initial)
    else:
        assert not (checkpoint / "ema_reference.safetensors").exists()

