"""The one exponential moving average in diffalign: named tensors, updated in place.

    >>> import torch
    >>> model = torch.nn.Linear(1, 1, bias=False).requires_grad_(False)
    >>> _ = model.weight.fill_(1.0)
    >>> ema = ExponentialMovingAverage({name: p.clone() for name, p in model.named_parameters()})
    >>> _ = model.weight.fill_(3.0)
    >>> ema.update(dict(model.named_parameters()), decay=0.75)   # shadow <- decay * shadow + (1 - decay) * source
    >>> ema.shadow["weight"].item()
    1.5

It serves the ``ema`` reference (arXiv 2505.18736, "Rethinking DPO in Diffusion Models"), Self-NPO's teacher
(G-U-N/Diffusion-NPO) and the toy base's pre-training. The shadow can be a LoRA's weights alone (swapped into the
policy for the reference pass with ``torch.func.functional_call``) or the parameters of a separate copy of the
network.

Why not diffusers' ``training_utils.EMAModel``: its ``get_decay`` returns 0 on the first update (the shadow
becomes a copy of the model), then warms up as ``(1 + k) / (10 + k)`` capped by ``decay``, where k counts
updates after ``update_after_step``; it keeps one shadow per parameter of a whole module, in order. The references
of the DPO papers use a *constant* decay from the first update, every ``objective.ema_update_every`` optimizer
steps, over named tensors (a LoRA's weights only, or a full copy), so a checkpoint stores them by name. The caller
chooses the decay of each update: constant for the references, ``min(decay, (1 + s) / (10 + s))`` (s counted from
0) for the toy base, which is EMAModel's warmup except on the first update (0.1 here, 0 there).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class ExponentialMovingAverage:
    """Shadow tensors moved towards a source by ``shadow.lerp_(source, 1 - decay)``.

    Args:
        shadow: name -> tensor, updated in place (a dict of clones, or a copied module's parameters).
    """

    def __init__(self, shadow: Mapping[str, torch.Tensor]):
        self.shadow = dict(shadow)

    @torch.no_grad()
    def update(self, source: Mapping[str, torch.Tensor], decay: float) -> None:
        """shadow[name] <- decay * shadow[name] + (1 - decay) * source[name] for every shadow name.

        Args:
            source: name -> tensor with at least the shadow's names; cast to each shadow's device and dtype.
            decay: in [0, 1]; 0 copies the source.
        """
        for name, tensor in self.shadow.items():
            tensor.lerp_(source[name].detach().to(tensor.device, tensor.dtype), 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow on the CPU, by name (for a checkpoint)."""
        return {name: tensor.detach().cpu() for name, tensor in self.shadow.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for name, value in state.items():
            self.shadow[name].copy_(value)
