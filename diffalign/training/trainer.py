"""The training loop: one function, readable top to bottom.

    result = train(load_config("configs/tiny_dpo.yaml"))

Per step: every record's K images share one noise and one timestep; one policy forward runs over all K*B
latents ([winners; losers] for pairs); the reference forward runs under no_grad on the unwrapped model with its
adapters disabled; the objective turns per-sample errors into a loss. LoRA or full fine-tuning (``lora.enabled``), any reference strategy.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffalign.config import Config, ConfigError, resolve_reference, save_config
from diffalign.objectives import ObjectiveInputs, get_objective
from diffalign.training import checkpoint as ckpt
from diffalign.training.checkpoint import TrainingParts, TrainingStopped
from diffalign.training.lora import attach_lora, save_lora, trainable_checksum
from diffalign.training.nonfinite import all_processes, apply_update, weights_finite
from diffalign.training.optim import (
    build_lr_scheduler,
    build_optimizer,
    effective_learning_rate,
    set_base_learning_rate,
)
from diffalign.training.reference import build_reference, unwrap
from diffalign.training.run_lock import lock_output_dir, release_run_lock, terminate_as_exit
from diffalign.training.step import batch_tensors, denoising_errors, step_generator


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    skipped_steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    lora_path: Path | None = None  # LoRA runs: pytorch_lora_weights.safetensors; full fine-tunes: the unet/ folder
    grid_path: Path | None = None
    denoiser: torch.nn.Module | None = field(default=None, repr=False)  # the trained (unwrapped) model, for use in the same process


def build_accelerator(cfg: Config, output_dir: Path):
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

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
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        mixed_precision=cfg.train.mixed_precision,
        log_with=None if cfg.log.report_to == "none" else cfg.log.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )


def prepare_data(cfg: Config, components, accelerator, objective):
    from diffalign.data import adapt_records, read_preferences
    from diffalign.data.cache import build_feature_cache
    from diffalign.data.dataset import CachedPreferenceDataset, RawPreferenceDataset
    from diffalign.tiny import resolve_data_spec

    with accelerator.main_process_first():  # the main process builds tiny data and the cache; the rest reuse it
        source = resolve_data_spec(cfg.data.source)
        records, report = read_preferences(cfg.data, source)
        # Fails here, before any step, when the data lacks what the objective needs (labels, scores, k images).
        records = adapt_records(records, objective.data_kind, cfg.data.source)
        if not records:
            raise ConfigError(f"data.source={cfg.data.source}: no usable records.\n{report.summary()}")
        images_per_record = objective.images_per_record
        if cfg.data.cache:
            cache, cached = build_feature_cache(records, components, cfg.data, cfg.model,
                                                show_progress=accelerator.is_main_process)
            dataset = CachedPreferenceDataset(cache, cached, images_per_record, cfg.train.seed, cfg.data.random_flip)
        else:
            dataset = RawPreferenceDataset(records, components.family, components.resolution, images_per_record,
                                           cfg.train.seed, cfg.data.random_flip)
    return dataset, report


def train(cfg: Config) -> TrainResult:
    output_dir = Path(cfg.train.output_dir)
    accelerator = build_accelerator(cfg, output_dir)
    lock = lock_output_dir(accelerator, output_dir)
    try:
        with terminate_as_exit():
            return train_locked(cfg, accelerator, output_dir)
    finally:
        if lock is not None:
            release_run_lock(lock)


def train_locked(cfg: Config, accelerator, output_dir: Path) -> TrainResult:
    from diffalign.data.dataset import collate, epoch_batches
    from diffalign.families import load_components
    from diffalign.training.validation import render_validation

    objective = get_objective(cfg.objective.name)
    params = objective.parse_params(cfg.objective.selected)
    torch.manual_seed(cfg.train.seed)
    if cfg.train.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # ---- model: frozen parts in the mixed-precision dtype, trained parameters in fp32
    with accelerator.main_process_first():
        components = load_components(cfg.model)
    family, device = components.family, accelerator.device
    check_timesteps(family, components, cfg.train.timesteps)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    cast = {"dtype": weight_dtype} if weight_dtype != torch.float32 else {}
    for module in components.frozen_modules():
        module.requires_grad_(False).to(device, **cast)
    if components.vae_dtype not in (None, components.vae.dtype):  # a VAE that overflows in fp16 (SDXL's own)
        components.vae.to(dtype=components.vae_dtype)
    denoiser = components.denoiser
    if cfg.lora.enabled:
        denoiser.to(device, **cast)
        attach_lora(denoiser, cfg.lora, family.default_lora_targets)
    else:  # full fine-tune: fp32 master weights, autocast does the mixed precision
        denoiser.to(device).requires_grad_(True)
    for param in denoiser.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    if cfg.train.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    # Some objectives set their reference from their own hyperparameters (Self-NPO: the teacher's EMA decay).
    overrides = objective.reference_overrides(params) if objective.reference_overrides else {}
    reference_cfg = dataclasses.replace(cfg.objective, **overrides)
    reference_strategy = resolve_reference(cfg)
    reference = build_reference(reference_strategy, reference_cfg, cfg.lora.enabled, denoiser, device, weight_dtype)

    # ---- data
    dataset, report = prepare_data(cfg, components, accelerator, objective)
    batches_per_epoch = len(dataset) // (cfg.train.batch_size * accelerator.num_processes)
    if batches_per_epoch == 0:
        raise ConfigError(
            f"{len(dataset)} records cannot fill one step of train.batch_size={cfg.train.batch_size} x "
            f"{accelerator.num_processes} processes; lower train.batch_size or add data"
        )
    # The empty prompt: for prompt dropout, and for objectives with their own step (Self-NPO's guidance).
    needs_empty = cfg.data.prompt_dropout > 0 or objective.custom_step is not None
    empty_cond = family.encode_prompts(components, [""]) if needs_empty else None
    dropout_cond = empty_cond if cfg.data.prompt_dropout > 0 else None

    # ---- optimization
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, cfg.train, effective_learning_rate(cfg.train, accelerator.num_processes))
    lr_scheduler = build_lr_scheduler(optimizer, cfg.train, accelerator.num_processes)
    denoiser, optimizer, lr_scheduler = accelerator.prepare(denoiser, optimizer, lr_scheduler)
    parts = TrainingParts(denoiser, optimizer, lr_scheduler, reference, family, cfg.lora.enabled)

    global_step, skipped_steps, notes = 0, 0, []
    run_settings = ckpt.run_settings(cfg, reference_strategy)
    resume_from = ckpt.resolve_resume(output_dir, cfg.train.resume, notes)
    for note in notes:
        accelerator.print(note)
    if resume_from is not None:
        state = ckpt.load_checkpoint(accelerator, resume_from, parts, run_settings)
        global_step, skipped_steps = state["global_step"], state["skipped_steps"]
        accelerator.step = global_step * cfg.train.gradient_accumulation_steps
        accelerator.print(f"resumed from {resume_from} at step {global_step}")
        # The optimizer and scheduler state carry the lr they were saved with; the config's lr is the one to use.
        learning_rate = effective_learning_rate(cfg.train, accelerator.num_processes)
        previous = set_base_learning_rate(lr_scheduler, learning_rate)
        if previous is not None:
            accelerator.print(f"learning rate changed on resume: base {previous:g} -> {learning_rate:g} "
                              f"(train.learning_rate); the schedule goes on from step {global_step}")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
        if accelerator.log_with:
            accelerator.init_trackers("diffalign", config=flat_hparams(cfg))

    # ---- loop
    accumulation = cfg.train.gradient_accumulation_steps
    micro_step = global_step * accumulation
    window_finite, consecutive_bad, checkpoint_due, skip_reason = True, 0, False, ""
    sums: dict[str, float] = {}
    sum_count = 0
    last_metrics: dict[str, float] = {}
    progress = tqdm(total=cfg.train.max_steps, initial=global_step, desc="training",
                    disable=not accelerator.is_main_process)
    started, first_step_done, first_step = time.time(), None, global_step
    denoiser.train()
    loaded_epoch, batches = None, []
    try:  # the bar is closed however the loop ends, so an error or Ctrl-C message starts on its own line
        while global_step < cfg.train.max_steps:
            epoch, position = divmod(micro_step, batches_per_epoch)
            if epoch != loaded_epoch:
                batches = epoch_batches(len(dataset), cfg.train.batch_size, accelerator.num_processes,
                                        accelerator.process_index, epoch, cfg.train.seed)
                loaded_epoch = epoch
            batch = collate([dataset[item] for item in batches[position]])
            generator = step_generator(cfg.train.seed, micro_step, accelerator.process_index)
            micro_step += 1

            with accelerator.accumulate(denoiser):
                latents, cond = batch_tensors(batch, family, components, device, weight_dtype, dropout_cond,
                                              cfg.data.prompt_dropout, generator)
                if objective.custom_step is not None:  # a procedure, not a function of per-sample errors (Self-NPO)
                    output = objective.custom_step(
                        family=family, components=components, model=denoiser, reference=reference, latents=latents,
                        cond=cond, empty_cond=empty_cond, generator=generator, device=device, params=params)
                else:
                    errors = denoising_errors(family, components, denoiser, latents, cond, generator, device, reference,
                                              cfg.train.timesteps, with_residuals=objective.needs_residuals)
                    output = objective(ObjectiveInputs(
                        policy_err=errors.policy, ref_err=errors.reference, residuals=errors.residuals,
                        labels=batch["labels"].to(device) if "labels" in batch else None,
                        scores=batch["scores"].to(device) if "scores" in batch else None,
                        global_mean=lambda value: accelerator.reduce(value.detach().mean(), reduction="mean"),
                    ), params)
                loss = output.loss
                if all_processes(accelerator, bool(torch.isfinite(loss))):
                    accelerator.backward(loss)
                    for name, value in {"loss": loss.detach(), **output.metrics}.items():
                        sums[name] = sums.get(name, 0.0) + float(value)
                    sum_count += 1
                else:
                    window_finite = False
                    # A zero loss over the trainable weights keeps DDP's collective calls in step on every process.
                    accelerator.backward(sum(p.sum() for p in trainable) * 0.0)
                if accelerator.sync_gradients:
                    applied = window_finite and apply_update(accelerator, optimizer, lr_scheduler, trainable,
                                                             cfg.train.max_grad_norm)
                    if applied:
                        if not all_processes(accelerator, weights_finite(trainable)):
                            raise TrainingStopped(
                                f"step {global_step + 1}: the update made the trained weights non-finite; stopped "
                                f"without saving them. {ckpt.kept_checkpoint_note(output_dir)} Check "
                                "train.learning_rate, train.max_grad_norm and train.adam_epsilon.")
                        consecutive_bad = 0
                        if reference is not None:
                            reference.update(denoiser, global_step + 1)
                    else:
                        skipped_steps += 1
                        consecutive_bad += 1
                        skip_reason = "loss" if not window_finite else "gradient norm"
                    optimizer.zero_grad(set_to_none=True)

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            if first_step_done is None:
                first_step_done, first_step = time.time(), global_step
            if consecutive_bad:
                accelerator.print(f"step {global_step}: non-finite {skip_reason}, step skipped ({consecutive_bad} in a row)")
            if consecutive_bad >= cfg.train.max_consecutive_nonfinite:
                raise TrainingStopped(
                    f"stopped at step {global_step}: {consecutive_bad} steps in a row skipped for a non-finite loss or "
                    f"gradient. {ckpt.kept_checkpoint_note(output_dir)} Lower train.learning_rate (a resume uses the new "
                    "value) or check the data; if the kept weights have already grown too far, start afresh."
                )
            window_finite = True
            # A checkpoint falls due every checkpointing_steps; one due on a skipped step waits for the next applied
            # update, so checkpoints only ever follow a good step.
            checkpoint_due = checkpoint_due or global_step % cfg.train.checkpointing_steps == 0

            if global_step % cfg.log.every_n_steps == 0 or global_step == cfg.train.max_steps:
                last_metrics = reduce_metrics(accelerator, sums, sum_count)
                last_metrics.update(lr=lr_scheduler.get_last_lr()[0], skipped_steps=skipped_steps)
                sums, sum_count = {}, 0
                accelerator.log(last_metrics, step=global_step)
                progress.set_postfix({k: f"{v:.4g}" for k, v in last_metrics.items() if k in ("loss", "implicit_acc")})
            if cfg.log.validation_every_n_steps and global_step % cfg.log.validation_every_n_steps == 0:
                log_validation(accelerator, components, unwrap(denoiser), cfg, global_step, output_dir, render_validation)
            if checkpoint_due and not consecutive_bad and global_step < cfg.train.max_steps:
                ckpt.save_checkpoint(accelerator, output_dir, global_step,
                                     {"global_step": global_step, "skipped_steps": skipped_steps, "run": run_settings},
                                     cfg.train.checkpoints_total_limit, parts)
                checkpoint_due = False
    finally:
        progress.close()
    loop_ended = time.time()
    if skipped_steps:
        accelerator.print(f"{skipped_steps} of {global_step} steps were skipped for a non-finite loss or gradient "
                          "(skipped_steps in run_info.json)")

    # ---- outputs
    accelerator.wait_for_everyone()
    if not all_processes(accelerator, weights_finite(trainable)):  # never reached while the guards above hold
        raise TrainingStopped(f"the trained weights are non-finite; nothing was saved. {ckpt.kept_checkpoint_note(output_dir)}")
    model = unwrap(denoiser)
    checksums = accelerator.gather_for_metrics([trainable_checksum(model)], use_gather_object=True)
    result = TrainResult(output_dir, global_step, skipped_steps, last_metrics, denoiser=model)
    if accelerator.is_main_process:
        if cfg.lora.enabled:
            result.lora_path = save_lora(family, model, output_dir)
        else:
            result.lora_path = output_dir / family.denoiser_subfolder
            model.save_pretrained(str(result.lora_path))
        grid = output_dir / "samples" / f"step-{global_step}.png"
        if cfg.log.validation_every_n_steps and not grid.exists():
            log_validation(accelerator, components, model, cfg, global_step, output_dir, render_validation)
        result.grid_path = grid if grid.exists() else None
        run_info = {
            "global_step": global_step,
            "skipped_steps": skipped_steps,
            "num_processes": accelerator.num_processes,
            "lora_checksums": list(checksums),
            "wall_time_s": round(time.time() - started, 2),
            # steady-state speed: the first step (allocation, warm-up) is left out
            "seconds_per_step": (loop_ended - first_step_done) / (global_step - first_step)
            if first_step_done and global_step > first_step else None,
            "data": {"kept": report.kept, "skipped": dict(report.skipped)},
            "final_metrics": last_metrics,
        }
        (output_dir / "run_info.json").write_text(json.dumps(run_info, indent=2))
        from diffalign.training.model_card import write_model_card

        write_model_card(cfg, output_dir, run_info, family, base_path=components.pretrained)
    accelerator.end_training()
    return result


def check_timesteps(family, components, timestep_cfg) -> None:
    """Fail before any work when ``train.timesteps`` does not fit this model: an interval past its schedule, or a
    weighting its noise schedule does not define (min_snr on flow matching)."""
    try:
        timesteps = family.sample_timesteps(components, 1, torch.Generator().manual_seed(0), timestep_cfg)
        family.timestep_weights(components, timesteps, timestep_cfg)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def reduce_metrics(accelerator, sums: dict[str, float], count: int) -> dict[str, float]:
    """Mean of each logged quantity over the window and over processes."""
    if not sums:
        return {}
    names = sorted(sums)
    local = torch.tensor([sums[n] / max(count, 1) for n in names], device=accelerator.device)
    mean = accelerator.reduce(local, reduction="mean")
    return {name: float(value) for name, value in zip(names, mean)}


def log_validation(accelerator, components, model, cfg, step, output_dir, render):
    if not accelerator.is_main_process:
        return
    path = output_dir / "samples" / f"step-{step}.png"
    # Under mixed precision the pipeline's parts differ in dtype (bf16 denoiser and text encoders, an fp32 VAE
    # for SDXL and SD3): autocast lets them meet, as in training.
    with accelerator.autocast():
        grid = render(components, model, cfg.log, accelerator.device, path)
    tracker = tracker_or_none(accelerator, "tensorboard")
    if tracker is not None:
        import numpy as np

        tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")


def tracker_or_none(accelerator, name):
    try:
        return accelerator.get_tracker(name, unwrap=False) if accelerator.log_with else None
    except (ValueError, KeyError):
        return None


def flat_hparams(cfg: Config) -> dict:
    flat = {}
    for section, values in cfg.to_dict().items():
        if not isinstance(values, dict):  # e.g. the segments list
            flat[section] = str(values)
            continue
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


__all__ = ["TrainResult", "TrainingStopped", "train"]
