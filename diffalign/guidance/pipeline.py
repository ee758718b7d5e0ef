"""``load_pipeline``: a stock diffusers pipeline whose denoiser picks its LoRA adapters at every call.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from diffalign.offline.lora import build_tiny_lora
    >>> dpo, npo = (build_tiny_lora(Path(tempfile.mkdtemp()) / "lora", seed=seed) for seed in (1, 2))
    >>> pipe = load_pipeline("tiny:sd15", lora=str(dpo), npo=str(npo))   # a hub id or folder in real use
    >>> image = pipe("a fox in the snow", guidance_scale=7.5, num_inference_steps=2).images[0]
    >>> image.size
    (32, 32)

NPO-guided CFG (Diffusion-NPO): the pipeline's CFG batch is [negative/unconditional; conditional]. The
conditional half runs with theta_pos = base + positive LoRA; the negative half with
theta_neg = base + NPO LoRA + (1 - merge_weight) * positive LoRA, so that
``eps = eps_neg + s * (eps_pos - eps_neg)`` is computed by the pipeline's own guidance line.
FLUX runs no CFG batch (its guidance is an embedded value), so there NPO guidance is FluxPipeline's *true CFG*:
pass ``true_cfg_scale > 1`` and a ``negative_prompt``, and each step calls the transformer twice, the conditional
branch with theta_pos and the negative one with theta_neg, combined as ``neg + true_cfg_scale * (cond - neg)``
(the Diffusion-NPO authors' recipe for distilled models). A FLUX call with an NPO LoRA but no true CFG is refused.
Timestep segments: at each call only the LoRA whose [t_lo, t_hi) holds t is active (part of theta_pos and,
scaled like the positive LoRA, of theta_neg); outside every interval the base runs. t is in the family's training
timesteps (t = 1000 sigma for flow models), also where the pipeline passes sigma itself (FLUX).

All adapters live on one copy of the base weights and are switched per call (``set_adapters``), so memory is
one model plus small LoRAs, not one model per branch. The pipeline's loop is untouched: any scheduler, any
guidance scale, negative prompts and ``num_images_per_prompt`` work as usual.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

import diffalign.offline  # noqa: F401  (registers the tiny: model specs that resolve_pretrained reads)
from diffalign.errors import ConfigError, MissingFile, ModelError
from diffalign.families import detect_family, resolve_pretrained
from diffalign.guidance.samplers import set_scheduler
from diffalign.guidance.segments import Segment, parse_segments
from diffalign.training.lora import LORA_WEIGHT_NAME
from diffalign.training.speed import check_speed_settings, compile_denoiser, set_attention


def lora_file(path: str | Path) -> Path:
    """A run folder, checkpoint folder or .safetensors file -> the LoRA weight file, or a clear error."""
    path = Path(path)
    candidate = path / LORA_WEIGHT_NAME if path.is_dir() else path
    if not candidate.is_file():
        raise MissingFile(f"no LoRA at {path}: expected a run folder holding {LORA_WEIGHT_NAME} "
                                "or a .safetensors LoRA file")
    return candidate


def check_lora_fits(denoiser: torch.nn.Module, path: Path, prefix: str) -> None:
    """Refuse a LoRA trained for another base: every LoRA module must exist here with matching shapes.

    (diffusers would otherwise skip unknown keys with a warning, and sample the base model silently.)
    """
    modules = dict(denoiser.named_modules())
    checked = 0
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            if not key.startswith(f"{prefix}.") or not key.endswith(("lora.down.weight", "lora_A.weight")):
                continue
            module_path = key[len(prefix) + 1 :].rsplit(".lora", 1)[0]
            module = modules.get(module_path)
            if module is None:
                raise ModelError(f"LoRA {path} does not fit this base model: it adapts '{module_path}', which "
                                 "this denoiser does not have. It was trained for a different base.")
            weight = getattr(module, "base_layer", module).weight
            rank, fan_in = handle.get_slice(key).get_shape()[:2]
            if fan_in != weight.shape[1]:
                raise ModelError(f"LoRA {path} does not fit this base model: '{module_path}' takes {weight.shape[1]} "
                                 f"inputs here but {fan_in} in the LoRA. It was trained for a different base.")
            checked += 1
    if checked == 0:
        raise ModelError(f"LoRA {path} holds no '{prefix}.*' LoRA weights in the diffusers format; for kohya files "
                         "load them with pipe.load_lora_weights directly")


@dataclass
class AdapterRouter:
    """Decides which adapters (with which weights) are active for a denoiser call, and records it."""

    positive: str | None = None
    positive_scale: float = 1.0
    npo: str | None = None
    npo_scale: float = 1.0
    merge_weight: float = 0.0
    segments: list[tuple[str, Segment]] = field(default_factory=list)
    # The family's ``pipeline_timestep_scale``: the denoiser's timestep times this is t in training units.
    timestep_scale: float = 1.0
    # (t, branch, adapters) of recent calls, for inspection and tests; bounded so long sessions stay small
    trace: deque = field(default_factory=lambda: deque(maxlen=10_000))
    record: bool = True
    # Per-call state: the cache context the pipeline opened around the current denoiser call ("cond"/"uncond"),
    # and whether the running pipeline call does true CFG (sequential branches, FLUX).
    context: str | None = field(default=None, init=False, repr=False)
    true_cfg: bool = field(default=False, init=False, repr=False)

    def training_t(self, timestep) -> float:
        value = timestep_value(timestep)
        if self.timestep_scale == 1.0:
            return value
        # sigma reached the denoiser as float32 t / 1000: rounding undoes that noise, so the first step's t is
        # exactly 1000 (a segment reaching the top holds it) and t matches the scheduler's timesteps.
        return round(value * self.timestep_scale, 3)

    def positive_adapters(self, t: float) -> dict[str, float]:
        adapters = {}
        if self.positive:
            adapters[self.positive] = self.positive_scale
        for name, segment in self.segments:
            if segment.contains(t):
                adapters[name] = segment.scale
        return adapters

    def negative_adapters(self, t: float) -> dict[str, float]:
        adapters = {name: (1.0 - self.merge_weight) * weight for name, weight in self.positive_adapters(t).items()}
        if self.npo:
            adapters[self.npo] = self.npo_scale
        return {name: weight for name, weight in adapters.items() if weight != 0.0}

    def log(self, t: float, branch: str, adapters: dict[str, float]) -> None:
        if self.record:
            self.trace.append((t, branch, dict(adapters)))


def activate(denoiser, adapters: dict[str, float]) -> None:
    if adapters:
        denoiser.enable_adapters()
        denoiser.set_adapters(list(adapters), list(adapters.values()))
    else:
        denoiser.disable_adapters()


def split_batch(value, half: int, index: int):
    """The ``index``-th half of every batch-shaped tensor in an argument (recursing into dicts)."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == 2 * half:
        return value[index * half : (index + 1) * half]
    if isinstance(value, dict):
        return {key: split_batch(item, half, index) for key, item in value.items()}
    return value


def join_outputs(first, second):
    if isinstance(first, tuple):
        return (torch.cat([first[0], second[0]]), *first[1:])
    return type(first)(sample=torch.cat([first.sample, second.sample]))


def timestep_value(timestep) -> float:
    return float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)


def denoiser_inputs(args: tuple, kwargs: dict):
    """(sample, timestep) of a denoiser call: positional for the UNet pipelines (``unet(sample, t, ...)``), by
    keyword for the transformer ones (``transformer(hidden_states=..., timestep=...)``)."""
    sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
    if sample is None or timestep is None:
        raise TypeError("adapter routing could not find the denoiser's sample and timestep arguments")
    return sample, timestep


def sequential_branch(router: AdapterRouter) -> str | None:
    """The branch of a true-CFG denoiser call ("conditional"/"negative"), None for a batched or unguided call.

    The branch comes from the name of the cache context the pipeline opens around each call
    (``transformer.cache_context("cond")`` / ``("uncond")`` in FluxPipeline), which ``label_branches`` captures:
    the pipeline's own label of each call, unlike a per-call counter it cannot drift when the call order changes,
    a callback calls the transformer, or a step is skipped. Under true CFG an unlabelled call is refused, since
    guessing its branch could run the NPO LoRA in the conditional branch silently.
    """
    if router.context == "uncond":
        return "negative"
    if router.context == "cond":
        return "conditional"
    if router.true_cfg and router.npo:
        raise ModelError("true CFG with an NPO LoRA: the pipeline called its denoiser outside a 'cond'/'uncond' "
                         "cache context, so the negative branch cannot be told apart")
    return None


def label_branches(denoiser, router: AdapterRouter) -> None:
    """Record the name of every cache context opened on the denoiser while it is open (see ``sequential_branch``).

    diffusers hands the name only to stateful cache hooks (``hooks._set_cache_context``): without one registered it
    is not readable from the model, so the instance's ``cache_context`` is wrapped instead (the original still runs,
    so diffusers' caches keep working).
    """
    original = getattr(denoiser, "cache_context", None)
    if original is None:
        return

    @contextlib.contextmanager
    def labelled_context(name, *args, **kwargs):
        previous, router.context = router.context, name
        try:
            with original(name, *args, **kwargs):
                yield
        finally:
            router.context = previous

    denoiser.cache_context = labelled_context


def runs_true_cfg(arguments: dict) -> bool:
    """FluxPipeline's own ``do_true_cfg`` rule, from the bound arguments of a call."""
    has_negative = arguments.get("negative_prompt") is not None or (
        arguments.get("negative_prompt_embeds") is not None
        and arguments.get("negative_pooled_prompt_embeds") is not None)
    return arguments["true_cfg_scale"] > 1 and has_negative


def guard_true_cfg(pipe, router: AdapterRouter) -> None:
    """For pipelines with true CFG (FLUX): refuse a call that would drop the NPO LoRA, and flag true-CFG calls.

    ``pipe(...)`` looks ``__call__`` up on the class, so the pipeline gets a subclass of the same name whose
    ``__call__`` checks the arguments and then runs the stock one unchanged.
    """
    cls = type(pipe)
    signature = inspect.signature(cls.__call__)

    def __call__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        true_cfg = runs_true_cfg(bound.arguments)
        if router.npo and not true_cfg:
            raise ConfigError(f"{cls.__name__} runs no CFG batch: NPO guidance needs true CFG, so pass "
                              'true_cfg_scale > 1 and a negative prompt (e.g. true_cfg_scale=4.0, negative_prompt=""; '
                              "on the command line, --true-cfg 4)")
        router.true_cfg = true_cfg
        try:
            return cls.__call__(self, *args, **kwargs)
        finally:
            router.true_cfg = False

    __call__.__doc__, __call__.__signature__ = cls.__call__.__doc__, signature  # help() and inspect see the stock one
    pipe.__class__ = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                 "__qualname__": cls.__qualname__})


def install_router(pipe, denoiser_name: str, router: AdapterRouter) -> None:
    """Wrap the denoiser's forward so each call runs with the adapters the router picks."""
    denoiser = getattr(pipe, denoiser_name)
    original = denoiser.forward
    label_branches(denoiser, router)
    if "true_cfg_scale" in inspect.signature(type(pipe).__call__).parameters:
        guard_true_cfg(pipe, router)

    @functools.wraps(original)
    def routed_forward(*args, **kwargs):
        sample, timestep = denoiser_inputs(args, kwargs)
        t = router.training_t(timestep)
        positive = router.positive_adapters(t)
        negative = router.negative_adapters(t)
        branch = sequential_branch(router)
        if branch is not None:  # true CFG: the pipeline calls each branch separately, with its own inputs
            adapters = negative if branch == "negative" else positive
            router.log(t, branch, adapters)
            activate(denoiser, adapters)
            return original(*args, **kwargs)
        guided = getattr(pipe, "do_classifier_free_guidance", False) and sample.shape[0] % 2 == 0
        if not guided or negative == positive:  # one call serves both halves
            router.log(t, "both" if guided else "conditional", positive)
            activate(denoiser, positive)
            return original(*args, **kwargs)
        # The CFG batch is [negative; conditional] in every diffusers pipeline we route: split every batch-shaped
        # argument (sample, timestep, text states, SDXL's added conditioning) into its two halves.
        half = sample.shape[0] // 2
        outputs = []
        for index, (branch, adapters) in enumerate((("negative", negative), ("conditional", positive))):
            router.log(t, branch, adapters)
            activate(denoiser, adapters)
            outputs.append(original(*[split_batch(a, half, index) for a in args],
                                    **{k: split_batch(v, half, index) for k, v in kwargs.items()}))
        return join_outputs(*outputs)

    denoiser.forward = routed_forward
    pipe.adapter_router = router


def load_pipeline(base: str, lora: str | None = None, npo: str | None = None, npo_merge_weight: float = 0.0,
                  segments=None, lora_scale: float = 1.0, npo_scale: float = 1.0, scheduler: str | None = None,
                  torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                  compile: str = "off", attention: str = "sdpa"):
    """A stock diffusers pipeline for ``base`` (hub id, folder or tiny:<family>) with diffalign's adapter routing.

    Args:
        base: a hub id, a local diffusers folder, or ``tiny:<name>`` (built offline on first use).
        lora: the positive LoRA (run folder or file), used in the conditional branch.
        npo: a negative LoRA from ``npo`` or ``self_npo`` training, used in the negative/unconditional branch.
            FLUX has no CFG batch: sample with true CFG (``true_cfg_scale > 1`` and a ``negative_prompt``), whose
            negative branch carries it; a FLUX call without true CFG raises ``ConfigError``.
        npo_merge_weight: m in theta_neg = base + npo + (1 - m) * positive (0 = the authors' default).
        segments: a segments.yaml path or list (see ``guidance.segments``): per-timestep-interval LoRAs, the
            intervals in training timesteps (t = 1000 sigma for flow models, FLUX included, although FluxPipeline
            passes sigma to its transformer: the router converts with the family's ``pipeline_timestep_scale``).
        lora_scale, npo_scale: adapter weights of the positive and the NPO LoRA.
        scheduler: replace the pipeline's scheduler by name, one of ``SAMPLERS`` (ddim, dpm, euler, euler_a, pndm,
            ddpm, unipc; for flow-matching models such as SD3 and FLUX: flow_euler).
        torch_dtype, device: as ``DiffusionPipeline.from_pretrained`` and ``pipe.to`` take them.
        compile, attention: ``train.compile`` and ``train.attention`` for sampling (``training.speed``): off,
            denoiser or blocks; sdpa or xformers (CUDA only, refused elsewhere before anything loads).

    Returns:
        the diffusers pipeline; ``pipe.adapter_router`` (an ``AdapterRouter``) when any adapter is loaded.

    Raises:
        ``ConfigError`` (bad merge weight, segments or scheduler; at call time, an NPO LoRA on FLUX without true
        CFG), ``MissingFile`` (no LoRA at a path; also a ``FileNotFoundError``), ``ModelError`` (a LoRA trained
        for another base).
    """
    from diffusers import DiffusionPipeline  # heavy (seconds): imported when a pipeline is built

    if not 0.0 <= npo_merge_weight <= 1.0:
        raise ConfigError(f"npo_merge_weight must be in [0, 1], got {npo_merge_weight}")
    target = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_speed_settings(attention, compile, target)
    path = resolve_pretrained(base)
    family = detect_family(path)
    # Fail on bad LoRA paths and segment specs before loading multi-GB weights.
    named_files = [("positive", lora_file(lora))] if lora else []
    if npo:
        named_files.append(("npo", lora_file(npo)))
    parsed_segments = parse_segments(segments) if segments is not None else []
    named_files += [(f"segment_{i}", lora_file(segment.lora)) for i, segment in enumerate(parsed_segments)]

    pipe = DiffusionPipeline.from_pretrained(path, **({"torch_dtype": torch_dtype} if torch_dtype else {}))
    family.configure_pipeline(pipe)
    denoiser_name = family.denoiser_subfolder
    denoiser = getattr(pipe, denoiser_name)
    for name, file in named_files:
        check_lora_fits(denoiser, file, denoiser_name)
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
    if scheduler:
        set_scheduler(pipe, scheduler)
    router = AdapterRouter(
        positive="positive" if lora else None, positive_scale=lora_scale,
        npo="npo" if npo else None, npo_scale=npo_scale, merge_weight=npo_merge_weight,
        timestep_scale=family.pipeline_timestep_scale,
        segments=[(f"segment_{i}", segment) for i, segment in enumerate(parsed_segments)],
    )
    if named_files:
        install_router(pipe, denoiser_name, router)
    set_attention(denoiser, attention)
    compile_denoiser(denoiser, compile)  # blocks: the router's per-call adapter switch stays outside the graphs
    if device is not None:
        pipe.to(device)
    return pipe
