"""Offline tiny LoRAs: random (non-zero) adapter weights for a base model, saved exactly as training saves them.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from diffalign.guidance import load_pipeline
    >>> run = build_tiny_lora(Path(tempfile.mkdtemp()) / "lora", base="tiny:sd15", seed=1)
    >>> sorted(path.name for path in run.iterdir())
    ['pytorch_lora_weights.safetensors']
    >>> pipe = load_pipeline("tiny:sd15", lora=str(run))

Kept apart from the tiny model specs because it builds on the families and the LoRA code of training.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffalign.config import LoraConfig, ModelConfig
from diffalign.families import load_components
from diffalign.offline.specs import resolve_model_spec
from diffalign.training.lora import attach_lora, save_lora


def build_tiny_lora(out_dir: str | Path, base: str = "tiny:sd15", seed: int = 0, rank: int = 4,
                    alpha: float = 4.0, std: float = 0.05) -> Path:
    """A LoRA with random weights for ``base``, in the file format its family's pipeline loads.

    Args:
        out_dir: the run folder to write (``pytorch_lora_weights.safetensors`` inside).
        base: ``model.pretrained`` of the base: a ``tiny:<model>`` spec, a local folder or a hub id.
        seed: seeds the adapter weights (``torch.manual_seed``).
        rank, alpha: the LoRA's rank and alpha, on the family's default attention projections.
        std: the standard deviation of every LoRA weight (A and B both non-zero, so the adapter changes outputs).

    Returns:
        The folder holding the weights file.
    """
    components = load_components(ModelConfig(pretrained=resolve_model_spec(base)))
    torch.manual_seed(seed)
    attach_lora(components.denoiser, LoraConfig(rank=rank, alpha=alpha), components.family.lora_targets(components.denoiser))
    with torch.no_grad():
        for name, param in components.denoiser.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, std)
    return save_lora(components.family, components.denoiser, out_dir).parent
