"""Setting up a run, phase by phase, in the order ``train()`` calls them (torchtune's recipe shape):

- ``build_accelerator``: a fresh ``Accelerator`` (mixed precision, gradient accumulation, trackers);
- ``setup_model`` -> ``ModelSetup``: the denoiser with its LoRA, the dtypes, the reference;
- ``setup_data`` -> ``DataSetup``: the record index and feature cache, the DataLoader, the empty prompt;
- ``setup_optimization`` -> ``Optimization``: optimizer and lr schedule prepared by accelerate, then the resume;
- ``start_run_folder`` and ``log_run_summary``: ``config.yaml``, trackers, the "Running training" block.

The order is part of the numerics: the LoRA's initial weights come from the global RNG seeded just before
``setup_model``, and a resume restores every RNG state at the end of ``setup_optimization``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration
from diffusers.training_utils import cast_training_params

from diffalign.config import Config, resolve_reference, save_config
from diffalign.data import SkipReport
from diffalign.data.build import build_index
from diffalign.data.dataset import IndexedDataset, MicroStepBatches, collate
from diffalign.data.decoding import worker_count
from diffalign.data.stream import StreamData
from diffalign.errors import ConfigError
from diffalign.families import load_components
from diffalign.families.base import DiffusionComponents
from diffalign.logs import get_logger
from diffalign.objectives.base import Objective, get_objective
from diffalign.offline.specs import resolve_data_spec
from diffalign.online.rounds import OnlineRounds
from diffalign.online.settings import trained_steps
from diffalign.training import checkpoint as ckpt
from diffalign.training.checkpoint import TrainingParts
from diffalign.training.lora import attach_lora
from diffalign.training.metrics import flat_hparams
from diffalign.training.optim import (
    build_lr_scheduler,
    build_optimizer,
    effective_learning_rate,
    set_base_learning_rate,
)
from diffalign.training.reference import Reference, build_reference
from diffalign.training.speed import compile_denoiser, set_attention, to_device_quantized
from diffalign.training.steps import StepProcedure

logger = get_logger(__name__)


def build_accelerator(cfg: Config, output_dir: Path) -> Accelerator:
    """A fresh ``Accelerator`` for this run. Raises ``ConfigError`` for fp16 on a CPU."""
    if cfg.train.mixed_precision == "fp16" and PartialState().device.type == "cpu":
        raise ConfigError(
            "train.mixed_precision=fp16 needs a GPU: on CPU accelerate silently ignores it. "
            "Use train.mixed_precision=bf16 or no."
        )
    # accelerate keeps its settings in process-wide singletons; a second train() in one process (a notebook,
    # a sweep, the tests) may use other settings, so start from fresh ones. The process group is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(
        gradient_accumulation_steps=micro_steps_per_update(cfg),
        mixed_precision=cfg.train.mixed_precision,
        log_with=None if cfg.log.report_to == "none" else cfg.log.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )


def micro_steps_per_update(cfg: Config) -> int:
    """Micro-steps (backward passes) per optimizer step: ``train.gradient_accumulation_steps``, times the trained
    steps of a sample for online objectives (each micro-step trains one step of every sample in its batch)."""
    if get_objective(cfg.objective.name).data_kind == "prompts":
        return cfg.train.gradient_accumulation_steps * trained_steps(cfg.online)
    return cfg.train.gradient_accumulation_steps


# ---------------------------------------------------------------------------------------------- model
@dataclass
class ModelSetup:
    components: DiffusionComponents
    denoiser: torch.nn.Module  # not yet prepared by accelerate; its trained parameters in fp32
    reference: Reference | None
    reference_strategy: str  # what objective.reference resolved to
    weight_dtype: torch.dtype  # the mixed-precision dtype of the frozen parts and the inputs


def setup_model(cfg: Config, accelerator: Accelerator, objective: Objective, params: object) -> ModelSetup:
    """Load the model; frozen parts in the mixed-precision dtype, trained parameters in fp32 (a LoRA, or the
    whole denoiser under autocast); then the reference, which copies the weights as they are now."""
    with accelerator.main_process_first():
        components = load_components(cfg.model)
    family, device = components.family, accelerator.device
    check_timesteps(family, components, cfg.train.timesteps)
    if cfg.model.flux_guidance != 1.0 and not family.embedded_guidance(components):
        logger.warning(f"model.flux_guidance={cfg.model.flux_guidance} has no effect: this model takes no guidance "
                       "value (only FLUX.1-dev does)")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    cast = {"dtype": weight_dtype} if weight_dtype != torch.float32 else {}
    for module in components.frozen_modules():
        module.requires_grad_(False).to(device, **cast)
    if components.vae_dtype not in (None, components.vae.dtype):  # a VAE that overflows in fp16 (SDXL's own)
        components.vae.to(dtype=components.vae_dtype)
    denoiser = components.denoiser
    if cfg.lora.enabled:
        to_device_quantized(denoiser, cfg.model.quantize, device, cast.get("dtype"))  # peft wraps what it finds
        attach_lora(denoiser, cfg.lora, family.lora_targets(denoiser))
    else:  # full fine-tune: fp32 master weights, autocast does the mixed precision
        denoiser.to(device).requires_grad_(True)
    cast_training_params(denoiser, dtype=torch.float32)
    if cfg.train.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    # Some objectives set their reference from their own hyperparameters (Self-NPO: the teacher's EMA decay).
    reference_cfg = dataclasses.replace(cfg.objective, **objective.reference_settings(params))
    strategy = resolve_reference(cfg)
    set_attention(denoiser, cfg.train.attention)  # before a reference copy is taken: it attends the same way
    reference = build_reference(strategy, reference_cfg, cfg.lora.enabled, denoiser, device, weight_dtype)
    compile_denoiser(denoiser, cfg.train.compile)  # after the reference copies it: the copy stays eager
    return ModelSetup(components, denoiser, reference, strategy, weight_dtype)


def check_timesteps(family, components, timestep_cfg) -> None:
    """Fail before any work when ``train.timesteps`` does not fit this model: an interval past its schedule, or a
    weighting its noise schedule does not define (min_snr on flow matching)."""
    try:
        timesteps = family.sample_timesteps(components, 1, torch.Generator().manual_seed(0), timestep_cfg)
        family.timestep_weights(components, timesteps, timestep_cfg)
    except ValueError as error:
        raise ConfigError(str(error)) from error


# ---------------------------------------------------------------------------------------------- data
@dataclass
class DataSetup:
    dataset: IndexedDataset | None  # None when training from a stream
    report: SkipReport  # what the build kept and skipped, summed over processes
    batch_size: int  # per process
    num_processes: int
    process_index: int
    seed: int
    empty_cond: dict[str, torch.Tensor] | None  # the empty prompt, when the step or prompt dropout needs it
    dropout_cond: dict[str, torch.Tensor] | None  # the same, only under prompt dropout
    num_workers: int = 0
    pin_memory: bool = False
    stats: dict = dataclasses.field(default_factory=dict)  # the build's figures, for run_info.json
    stream: StreamData | None = None  # data.streaming=true
    online: OnlineRounds | None = None  # online objectives: rounds sampled from the model, no dataset

    def batches(self, micro_step: int, resumed: dict | None = None) -> Iterator:
        """This process's collated batches from ``micro_step`` on, through a DataLoader: epoch e is a permutation
        seeded by (seed, e), so a resumed run reads what an uninterrupted one would have (``MicroStepBatches``).
        A stream continues from this process's saved position instead; online runs get one work item per
        micro-step. ``resumed``: the resumed checkpoint's ``training_state.json``, or None."""
        resumed = resumed or {}
        if self.online is not None:
            return self.online.batches(micro_step, resumed.get("online"))
        if self.stream is not None:
            return self.stream.batches(self.stream.resume(resumed.get("stream")))
        sampler = MicroStepBatches(len(self.dataset), self.batch_size, self.num_processes, self.process_index,
                                   self.seed, start=micro_step)
        return iter(torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=self.num_workers,
            pin_memory=self.pin_memory, prefetch_factor=2 if self.num_workers else None))

    def checkpoint_state(self) -> dict:
        """What a checkpoint keeps of the data's position: a stream's place, or the online rounds' statistics."""
        if self.online is not None:
            return {"online": self.online.state()}
        return {"stream": self.stream.state()} if self.stream is not None else {}


def setup_data(cfg: Config, accelerator: Accelerator, components: DiffusionComponents, objective: Objective,
               step: StepProcedure, params: object = None, weight_dtype: torch.dtype = torch.float32) -> DataSetup:
    """Build (or reuse) the record index and feature cache, every process encoding its share and failing before
    any step when the data lacks what the objective needs; then encode the empty prompt when the step procedure
    or prompt dropout uses it."""
    if objective.data_kind == "prompts":  # online: every round is sampled from the model being trained
        rounds = OnlineRounds(cfg, accelerator, components, objective, params, weight_dtype,
                              Path(cfg.train.output_dir))
        return DataSetup(None, SkipReport(), cfg.train.batch_size, accelerator.num_processes,
                         accelerator.process_index, cfg.train.seed, None, None, online=rounds)
    with accelerator.main_process_first():  # the main process builds tiny data; the rest reuse it
        source = resolve_data_spec(cfg.data.source)
    needs_empty = cfg.data.prompt_dropout > 0 or step.needs_empty_cond
    empty_cond = components.family.encode_prompts(components, [""]) if needs_empty else None
    dropout_cond = empty_cond if cfg.data.prompt_dropout > 0 else None
    if cfg.data.streaming:
        if cfg.data.cache:
            logger.info("data: data.streaming=true trains from the stream as it arrives; data.cache is not used")
        stream = StreamData(cfg.data, source, objective.data_kind, components.family, components.resolution,
                            objective.images_per_record, cfg.train.seed, cfg.train.batch_size,
                            accelerator.process_index, accelerator.num_processes)
        return DataSetup(None, stream.report, cfg.train.batch_size, accelerator.num_processes,
                         accelerator.process_index, cfg.train.seed, empty_cond, dropout_cond, stream=stream)
    index = build_index(cfg.data, cfg.model, objective.data_kind, components if cfg.data.cache else None, source,
                        accelerator.process_index, accelerator.num_processes,
                        show_progress=accelerator.is_main_process)
    if not len(index):
        raise ConfigError(f"data.source={cfg.data.source}: no usable records.\n{index.report.summary()}")
    dataset = IndexedDataset(index, objective.images_per_record, cfg.train.seed, cfg.data.random_flip,
                             components.family, components.resolution)
    if len(dataset) // (cfg.train.batch_size * accelerator.num_processes) == 0:
        raise ConfigError(
            f"{len(dataset)} records cannot fill one step of train.batch_size={cfg.train.batch_size} x "
            f"{accelerator.num_processes} processes; lower train.batch_size or add data"
        )
    workers = worker_count(cfg.data.num_workers, len(dataset), accelerator.num_processes)
    return DataSetup(dataset, index.report, cfg.train.batch_size, accelerator.num_processes,
                     accelerator.process_index, cfg.train.seed, empty_cond, dropout_cond, workers,
                     accelerator.device.type == "cuda", index.stats)


# ---------------------------------------------------------------------------------------------- optimization
@dataclass
class Optimization:
    denoiser: torch.nn.Module  # prepared by accelerate (DDP-wrapped with several processes)
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    trainable: list[torch.nn.Parameter]
    parts: TrainingParts  # what a checkpoint saves and restores
    run_settings: dict  # the settings a checkpoint's tensors depend on (checkpoint.run_settings)
    global_step: int = 0  # where the run starts: 0, or the resumed checkpoint's step
    skipped_steps: int = 0
    resumed_state: dict | None = None  # the resumed checkpoint's training_state.json (stream place, online stats)


def setup_optimization(cfg: Config, accelerator: Accelerator, model: ModelSetup, output_dir: Path) -> Optimization:
    """AdamW (or 8-bit AdamW) and the lr schedule, prepared by accelerate; then ``train.resume``, if set."""
    trainable = [p for p in model.denoiser.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, cfg.train, effective_learning_rate(cfg.train, accelerator.num_processes))
    lr_scheduler = build_lr_scheduler(optimizer, cfg.train, accelerator.num_processes)
    denoiser, optimizer, lr_scheduler = accelerator.prepare(model.denoiser, optimizer, lr_scheduler)
    parts = TrainingParts(denoiser, optimizer, lr_scheduler, model.reference, model.components.family,
                          cfg.lora.enabled)
    optim = Optimization(denoiser, optimizer, lr_scheduler, trainable, parts,
                         ckpt.run_settings(cfg, model.reference_strategy))
    resume(cfg, accelerator, optim, output_dir)
    return optim


def resume(cfg: Config, accelerator: Accelerator, optim: Optimization, output_dir: Path) -> None:
    """Load ``train.resume`` (a checkpoint folder, or the newest usable one for ``latest``) into ``optim``."""
    notes = []
    resume_from = ckpt.resolve_resume(output_dir, cfg.train.resume, notes)
    for note in notes:
        logger.info(note)
    if resume_from is None:
        return
    state = ckpt.load_checkpoint(accelerator, resume_from, optim.parts, optim.run_settings)
    optim.global_step, optim.skipped_steps = state["global_step"], state["skipped_steps"]
    optim.resumed_state = state
    accelerator.step = optim.global_step * accelerator.gradient_accumulation_steps
    logger.info(f"resumed from {resume_from} at step {optim.global_step}")
    # The optimizer and scheduler state carry the lr they were saved with; the config's lr is the one to use.
    learning_rate = effective_learning_rate(cfg.train, accelerator.num_processes)
    previous = set_base_learning_rate(optim.lr_scheduler, learning_rate)
    if previous is not None:
        logger.info(f"learning rate changed on resume: base {previous:g} -> {learning_rate:g} "
                    f"(train.learning_rate); the schedule goes on from step {optim.global_step}")


# ---------------------------------------------------------------------------------------------- start
def start_run_folder(cfg: Config, accelerator: Accelerator, output_dir: Path) -> None:
    """The main process writes ``config.yaml`` and starts the trackers (after a resume was accepted)."""
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
        if accelerator.log_with:
            accelerator.init_trackers("diffalign", config=flat_hparams(cfg))


def log_run_summary(cfg: Config, accelerator: Accelerator, objective: Objective, model: ModelSetup,
                    data: DataSetup, optim: Optimization) -> None:
    """The start-of-training block, once per run (as diffusers' training scripts print it)."""
    per_process, accumulation = cfg.train.batch_size, cfg.train.gradient_accumulation_steps
    logger.info("\n".join([
        "***** Running training *****",
        f"  Objective = {objective.name} (step procedure: {objective.step})",
        f"  Reference = {model.reference_strategy}",
        f"  Records = {len(data.dataset)} for training ({data.report.kept} kept, "
        f"{data.report.total_skipped} skipped while reading)" if data.dataset is not None else
        "  Records = streamed (data.streaming=true): checked as they arrive" if data.stream is not None else
        f"  Online rounds = {cfg.online.prompts_per_round} prompts x {cfg.online.group_size} images, "
        f"{data.online.updates_per_round} optimizer step(s) each; prompts from {cfg.online.prompts}",
        f"  Processes = {accelerator.num_processes}",
        f"  Batch size per process = {per_process}",
        f"  Gradient accumulation steps = {accumulation}",
        f"  Global batch (processes x batch x accumulation) = {accelerator.num_processes * per_process * accumulation}",
        f"  Learning rate (effective) = {effective_learning_rate(cfg.train, accelerator.num_processes):g}",
        f"  Optimizer steps = {optim.global_step} -> {cfg.train.max_steps}",
    ]))
