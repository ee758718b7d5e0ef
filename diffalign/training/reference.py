"""Reference-model strategies (``objective.reference``): where the reference errors R come from.

- ``lora_disabled``: the policy network itself with its LoRA adapters switched off. No extra memory.
- ``frozen_copy``: a separate frozen copy of the starting weights (the default for full fine-tuning), optionally
  kept on the CPU between passes (``objective.reference_offload``), as the original Diffusion-DPO SDXL run did.
- ``ema``: a reference that follows the policy as an exponential moving average, updated every
  ``objective.ema_update_every`` optimizer steps with ``ref <- d * ref + (1 - d) * policy`` ("Rethinking DPO in
  Diffusion Models", arXiv 2505.18736). With LoRA the average is kept over the LoRA weights and swapped into the
  adapter for the reference pass; with full fine-tuning it is a separate copy of the whole network.
- ``none``: no reference pass at all (MaPO, SFT).

Every reference pass runs under ``torch.no_grad`` on the *unwrapped* module: under DDP, toggling adapters
through the wrapper fails (diffusers #6351) and a second forward through it confuses gradient checkpointing.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Protocol

import torch

from diffalign.training.ema import ExponentialMovingAverage
from diffalign.training.lora import adapters_disabled


class Reference(Protocol):
    """What the trainer and the step procedures use of a reference strategy.

    ``model_for_pass(policy)`` is a context manager giving something called like the denoiser
    (``family.predict(reference_model, ...)``), to run under ``torch.no_grad``; ``update(policy, step)`` runs after
    every applied optimizer step (``step`` counts them from 1). Strategies with state of their own (the EMAs) also
    have ``state_dict()`` / ``load_state_dict(state)``, saved in checkpoints as ``ema_reference.safetensors``.
    """

    name: str

    def model_for_pass(self, policy): ...

    def update(self, policy, step: int) -> None: ...


def unwrap(model):
    return getattr(model, "module", model)


def decay_at(decay, step: int) -> float:
    """An EMA's decay: a constant, or a schedule ``step -> decay`` (DiffusionNFT's old policy ramps it up)."""
    return float(decay(step)) if callable(decay) else decay


class LoraDisabledReference:
    name = "lora_disabled"

    def model_for_pass(self, policy):
        return adapters_disabled(unwrap(policy))

    def update(self, policy, step: int) -> None:
        pass


class FrozenCopyReference:
    """A frozen copy of the network as it was before training; optionally parked on the CPU."""

    name = "frozen_copy"

    def __init__(self, denoiser: torch.nn.Module, device, dtype, offload: bool):
        self.device, self.offload = torch.device(device), offload
        self.model = copy.deepcopy(unwrap(denoiser)).requires_grad_(False).eval()
        self.model.to("cpu" if offload else self.device, dtype=dtype)

    @contextlib.contextmanager
    def model_for_pass(self, policy):
        if self.offload:
            self.model.to(self.device)
        try:
            yield self.model
        finally:
            if self.offload:
                self.model.to("cpu")

    def update(self, policy, step: int) -> None:
        pass


class EmaReference(FrozenCopyReference):
    """Full fine-tuning: a separate copy of the network, moved towards the policy every N optimizer steps."""

    name = "ema"

    def __init__(self, denoiser, device, dtype, offload: bool, decay: float, every: int):
        # fp32 whatever the mixed precision: in bf16 a 0.999-decay update of slowly moving weights rounds away
        super().__init__(denoiser, device, torch.float32, offload)
        self.decay, self.every, self.compute_dtype = decay, every, dtype
        self.ema = ExponentialMovingAverage(dict(self.model.named_parameters()))  # the copy's own parameters

    @contextlib.contextmanager
    def model_for_pass(self, policy):
        autocast = torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)
        with super().model_for_pass(policy) as model, autocast:
            yield model

    @torch.no_grad()
    def update(self, policy, step: int) -> None:
        if step % self.every:
            return
        self.ema.update(dict(unwrap(policy).named_parameters()), decay_at(self.decay, step))

    def state_dict(self) -> dict:
        """The copy's whole state by name (its buffers too, e.g. SD3's positional embedding)."""
        return {k: v.cpu() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


class LoraEmaReference:
    """LoRA training: an EMA of the trainable LoRA weights, swapped into the adapter for the reference pass."""

    name = "ema"

    def __init__(self, denoiser, decay: float, every: int):
        self.decay, self.every = decay, every
        self.ema = ExponentialMovingAverage({n: p.detach().clone() for n, p in self.trainable(denoiser).items()})
        self.shadow = self.ema.shadow  # name -> tensor: what the reference pass swaps into the adapter

    @staticmethod
    def trainable(model) -> dict[str, torch.nn.Parameter]:
        return {name: param for name, param in unwrap(model).named_parameters() if param.requires_grad}

    @contextlib.contextmanager
    def model_for_pass(self, policy):
        """The policy network called with the EMA weights in place of its LoRA weights.

        ``torch.func.functional_call`` swaps the tensors for the call only: the policy's own parameters are never
        written, so a policy forward already in the autograd graph (the reference pass runs after it) still
        backpropagates. Copying the EMA weights into the parameters in place fails there ("a variable needed for
        gradient computation has been modified by an inplace operation")."""
        model = unwrap(policy)

        def call(*args, **kwargs):
            return torch.func.functional_call(model, self.shadow, args, kwargs, strict=False)

        yield call

    @torch.no_grad()
    def update(self, policy, step: int) -> None:
        if step % self.every:
            return
        self.ema.update(self.trainable(policy), decay_at(self.decay, step))

    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)


def build_reference(strategy: str, objective_cfg, lora_enabled: bool, denoiser, device, dtype) -> Reference | None:
    """The reference for ``strategy`` (already validated by the config); None for ``none``.

    Call before training starts: ``frozen_copy`` and ``ema`` copy the weights as they are now.
    """
    if strategy == "none":
        return None
    if strategy == "lora_disabled":
        return LoraDisabledReference()
    if strategy == "frozen_copy":
        if lora_enabled:  # the copy must be of the base weights only, i.e. with the adapter's effect removed
            with adapters_disabled(unwrap(denoiser)):
                return FrozenCopyReference(denoiser, device, dtype, objective_cfg.reference_offload)
        return FrozenCopyReference(denoiser, device, dtype, objective_cfg.reference_offload)
    if strategy == "ema":
        if lora_enabled:
            return LoraEmaReference(denoiser, objective_cfg.ema_decay, objective_cfg.ema_update_every)
        return EmaReference(denoiser, device, dtype, objective_cfg.reference_offload, objective_cfg.ema_decay,
                            objective_cfg.ema_update_every)
    raise RuntimeError(f"unknown reference strategy {strategy!r}: resolve_reference validates objective.reference")
