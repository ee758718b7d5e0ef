"""GPU speed settings of the denoiser: attention backend, ``torch.compile``, a quantised frozen base.

- ``train.attention`` (``sdpa`` | ``xformers``): PyTorch's scaled-dot-product attention is diffusers' default
  (``AttnProcessor2_0`` on the UNets, the transformers' own SDPA processors); ``xformers`` goes through diffusers'
  ``enable_xformers_memory_efficient_attention`` and needs the xformers package and a CUDA device.
- ``train.compile`` (``off`` | ``denoiser`` | ``blocks``): ``blocks`` compiles each repeated block (diffusers'
  regional compilation: the UNet's ``BasicTransformerBlock``s, SD3's ``JointTransformerBlock``s, FLUX's double and
  single blocks), so compile time is one block's whatever the depth; ``denoiser`` compiles the whole forward.
  ``CompileWatch`` counts graphs and warns when the count still grows after warm-up (a recompile per step costs
  more than it saves).
- ``model.quantize`` (``none`` | ``int8`` | ``fp8`` | ``nf4``): the frozen base weights of a LoRA run are stored
  quantised and dequantised in each matmul (QLoRA, Dettmers et al. 2023, arXiv 2305.14314); the LoRA stays fp32 and
  is saved as usual, so it loads into the unquantised base. ``int8`` (weight-only) and ``fp8`` (weight-only, Ada /
  Hopper) go through torchao's ``quantize_``: PyTorch-native tensor subclasses that peft's LoRA layers wrap and
  ``torch.compile`` traces, and int8 runs on CPU, so it is tested here. ``nf4`` goes through bitsandbytes' 4-bit
  linear layers, QLoRA's reference implementation and peft's best-supported 4-bit path; it needs CUDA. The
  reference pass (adapters disabled) runs on the same quantised base.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings

import torch

from diffalign.errors import ConfigError
from diffalign.logs import get_logger

logger = get_logger(__name__)

ATTENTION = ("sdpa", "xformers")
COMPILE = ("off", "denoiser", "blocks")
QUANTIZE = ("none", "int8", "fp8", "nf4")
# Repeated blocks per denoiser class, for the models whose diffusers class declares none (SD3's transformer).
REPEATED_BLOCKS = {"SD3Transformer2DModel": ("JointTransformerBlock",)}
WARM_UP_STEPS = 2  # graphs compiled in the first steps are expected (shapes, grad modes); later ones are not


def check_speed_settings(attention: str, compile_mode: str, device: torch.device, quantize: str = "none",
                         lora: bool = True) -> None:
    """Refuse, before any work, settings that cannot run on ``device``. Raises ``ConfigError`` with what to do."""
    for key, value, choices in (("attention", attention, ATTENTION), ("compile", compile_mode, COMPILE),
                                ("quantize", quantize, QUANTIZE)):
        if value not in choices:
            raise ConfigError(f"{key}={value!r}: choose one of {', '.join(choices)}")
    if attention == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise ConfigError("attention=xformers needs the xformers package: pip install 'diffalign[xformers]' "
                              "(or use attention=sdpa, PyTorch's own fused attention)")
        if device.type != "cuda":
            raise ConfigError(f"attention=xformers runs on CUDA devices only, not {device.type}; use attention=sdpa")
    if quantize == "none":
        return
    if not lora:
        raise ConfigError(f"model.quantize={quantize} quantises the frozen base of a LoRA run; full fine-tuning "
                          "trains those weights (set lora.enabled=true or model.quantize=none)")
    if quantize in ("int8", "fp8") and importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"model.quantize={quantize} needs torchao: pip install 'diffalign[quantize]'")
    if quantize == "fp8" and (device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9)):
        raise ConfigError("model.quantize=fp8 needs a CUDA GPU with fp8 support (compute capability 8.9+: Ada, "
                          "Hopper); use model.quantize=int8 elsewhere")
    if quantize == "nf4":
        if device.type != "cuda":
            raise ConfigError("model.quantize=nf4 runs bitsandbytes' 4-bit layers, on CUDA only; use "
                              "model.quantize=int8 on this device")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("model.quantize=nf4 needs bitsandbytes: pip install 'diffalign[bitsandbytes]'")


# ---------------------------------------------------------------------------------------------- attention
def set_attention(denoiser: torch.nn.Module, attention: str) -> None:
    """Route every attention of ``denoiser`` to ``attention`` (checked by ``check_speed_settings``). ``sdpa`` is
    what diffusers builds (``AttnProcessor2_0``, ``JointAttnProcessor2_0``, ``FluxAttnProcessor``: each calls
    ``F.scaled_dot_product_attention``), so only xformers changes anything."""
    if attention == "xformers":
        denoiser.enable_xformers_memory_efficient_attention()


def attention_backends(denoiser: torch.nn.Module) -> set[str]:
    """The class names of the attention processors ``denoiser`` runs (one per distinct processor)."""
    return {type(processor).__name__ for processor in denoiser.attn_processors.values()}


# ---------------------------------------------------------------------------------------------- compile
def compile_denoiser(denoiser: torch.nn.Module, mode: str) -> int:
    """Compile ``denoiser`` in place (``train.compile``); returns how many modules were compiled.

    ``blocks`` compiles every module whose class is one of the denoiser's repeated blocks (its diffusers
    ``_repeated_blocks``, or ``REPEATED_BLOCKS``); ``denoiser`` the whole module. In place (``Module.compile``), so
    peft adapters, gradient checkpointing and the state-dict keys are unchanged. Raises ``ConfigError`` when the
    denoiser has no known repeated blocks.
    """
    if mode == "off":
        return 0
    if mode == "denoiser":
        denoiser.compile()
        return 1
    names = tuple(getattr(denoiser, "_repeated_blocks", None) or REPEATED_BLOCKS.get(type(denoiser).__name__, ()))
    blocks = [module for module in denoiser.modules() if type(module).__name__ in names]
    if not blocks:
        raise ConfigError(f"compile=blocks: {type(denoiser).__name__} has no known repeated blocks; use "
                          "compile=denoiser")
    for block in blocks:
        block.compile()
    return len(blocks)


class CompileWatch:
    """Counts the graphs ``torch.compile`` builds for training steps and warns once when the count still grows
    after this process's first ``WARM_UP_STEPS`` steps (a resumed run warms up again). Graphs built while
    ``outside_steps`` is open (validation images) are not counted."""

    def __init__(self, enabled: bool):
        self.enabled, self.warned, self.baseline, self.steps, self.excluded = enabled, False, None, 0, 0

    @staticmethod
    def total() -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    def graphs(self) -> int:
        return self.total() - self.excluded

    @contextlib.contextmanager
    def outside_steps(self):
        before = self.total() if self.enabled else 0
        try:
            yield
        finally:
            if self.enabled:
                self.excluded += self.total() - before

    def after_step(self, step: int) -> dict[str, float]:
        """Metrics for optimizer step ``step`` (``compile_graphs``), and the warning when graphs keep coming."""
        if not self.enabled:
            return {}
        graphs, self.steps = self.graphs(), self.steps + 1
        if self.steps == WARM_UP_STEPS:
            self.baseline = graphs
        elif self.baseline is not None and graphs > self.baseline and not self.warned:
            self.warned = True
            logger.warning(f"torch.compile built {graphs - self.baseline} new graph(s) after its {WARM_UP_STEPS}-step "
                           f"warm-up (by step {step}): recompiles cost more than they save. Run with "
                           "TORCH_LOGS=recompiles to see why, or set train.compile=off")
        return {"compile_graphs": float(graphs)}


# ---------------------------------------------------------------------------------------------- quantisation
def to_device_quantized(denoiser: torch.nn.Module, quantize: str, device, dtype: torch.dtype | None) -> None:
    """Move ``denoiser`` (on the CPU) to ``device`` in ``dtype``, its frozen Linear weights stored quantised; call
    before the LoRA is attached, so peft wraps the quantised layers.

    Layer by layer: each Linear is moved and quantised on its own (torchao ``quantize_``; bitsandbytes quantises
    NF4 weights as they move to CUDA), so the device never holds the whole unquantised base (FLUX's 23.8 GB in
    bf16 would not fit the 24 GB card quantising is for). torchao's layers ignore autocast, so each gets a
    pre-hook casting its input to the weight's dtype, as autocast casts a Linear's input.
    """
    cast = {"dtype": dtype} if dtype is not None else {}
    if quantize == "none":
        denoiser.to(device, **cast)
        return
    if quantize == "nf4":
        replace_with_nf4(denoiser.to(**cast))
        denoiser.to(device)  # Params4bit quantises as it moves
        return
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig() if quantize == "int8" else Float8WeightOnlyConfig()
    for layer in [module for module in denoiser.modules() if isinstance(module, torch.nn.Linear)]:
        quantize_(layer.to(device, **cast), config)
        layer.register_forward_pre_hook(cast_input_to_weight)
    denoiser.to(device, **cast)  # the rest: norms, convolutions, embeddings
    # peft warns that merge() needs a requantisation hook: diffalign never merges the LoRA into the base.
    warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated")


def cast_input_to_weight(layer: torch.nn.Module, args: tuple):
    """Forward pre-hook: the input in the (quantised) weight's dtype, as autocast would give a Linear."""
    x = args[0]
    return (x.to(layer.weight.dtype), *args[1:]) if x.dtype != layer.weight.dtype else None


def replace_with_nf4(module: torch.nn.Module) -> None:
    """Every ``nn.Linear`` of ``module`` (on the CPU) -> bitsandbytes ``Linear4bit`` (NF4, compute in the
    weight's dtype); the weights are quantised when the module moves to CUDA."""
    import bitsandbytes as bnb

    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=child.weight.dtype, quant_type="nf4",
                                      device=child.weight.device)
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, name, layer)
        else:
            replace_with_nf4(child)
