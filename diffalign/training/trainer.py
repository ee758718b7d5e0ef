"""The training loop: setup phases, then one loop that reads top to bottom.

``train(load_config("configs/tiny_dpo.yaml"))`` trains and returns a ``TrainResult``. ``train`` locks the output
folder and sets the run up (``training.setup``: model, data, optimization with resume); ``training_loop`` then
repeats, per micro-step: read the batch, call the objective's step procedure (``training.steps``: by default every
record's K images share one noise and one timestep, one policy forward runs over all K*B latents, the reference
forward runs under no_grad, the objective turns per-sample errors into a loss), backpropagate, and at the end of
each accumulation window update the weights, the reference, the logs and the checkpoints. ``training.nonfinite``
keeps inf and NaN out of the weights; ``training.outputs`` writes what the run leaves behind. LoRA or full
fine-tuning (``lora.enabled``), any reference strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from diffalign.config import Config
from diffalign.errors import TrainingStopped
from diffalign.objectives import Objective, get_objective
from diffalign.online import steps as online_steps  # noqa: F401  (registers the "grpo" and "nft" step procedures)
from diffalign.online.settings import check_online
from diffalign.training import checkpoint as ckpt
from diffalign.training import self_npo  # noqa: F401  (registers the "self_npo" step procedure)
from diffalign.training.metrics import MetricWindow
from diffalign.training.nonfinite import NonFiniteGuard, check_final_weights
from diffalign.training.outputs import LoopEnd, RunClock, TrainResult, write_run_outputs
from diffalign.training.reference import unwrap
from diffalign.training.run_lock import lock_output_dir, release_run_lock, terminate_as_exit
from diffalign.training.setup import (
    DataSetup,
    ModelSetup,
    Optimization,
    build_accelerator,
    log_run_summary,
    setup_data,
    setup_model,
    setup_optimization,
    start_run_folder,
)
from diffalign.training.speed import CompileWatch, check_speed_settings
from diffalign.training.step import batch_tensors, step_generator
from diffalign.training.steps import STEPS, StepContext, StepProcedure
from diffalign.training.validation import log_validation


def train(cfg: Config) -> TrainResult:
    """Train with ``cfg`` (a validated ``Config``) and return where the weights are.

    Raises ``ConfigError`` / ``DataError`` / ``ModelError`` for a config, data or model that cannot work (before
    any step where it can be known), and ``TrainingStopped`` when non-finite steps stop the run.
    """
    output_dir = Path(cfg.train.output_dir)
    accelerator = build_accelerator(cfg, output_dir)
    # Settings this machine cannot run are refused before anything is written (the run folder included).
    check_speed_settings(cfg.train.attention, cfg.train.compile, accelerator.device, cfg.model.quantize,
                         cfg.lora.enabled)
    lock = lock_output_dir(accelerator, output_dir)
    try:
        with terminate_as_exit():
            run = setup_run(cfg, accelerator, output_dir)
            end = training_loop(run)
            accelerator.wait_for_everyone()
            check_final_weights(accelerator, run.optim.trainable, output_dir)
            report = run.data.report if run.data.stream is None else run.data.stream.summed_report()
            online = run.data.online.summary() if run.data.online is not None else None
            return write_run_outputs(cfg, accelerator, output_dir, run.model.components, run.optim.denoiser,
                                     report, end, run.data.stats, online)
    finally:
        if lock is not None:
            release_run_lock(lock)


@dataclass
class Run:
    """A run, set up: what the loop works with."""

    cfg: Config
    accelerator: Accelerator
    output_dir: Path
    objective: Objective
    params: object  # the objective's parsed hyperparameters
    step: StepProcedure  # STEPS.get(objective.step)
    model: ModelSetup
    data: DataSetup
    optim: Optimization

    def step_context(self, batch, generator: torch.Generator) -> StepContext:
        """The step procedure's input for one collated batch: latents and conditioning (prompt dropout drawn
        from ``generator``), labels and scores on the device; for online objectives, the micro-step's work item
        and the rounds it draws on."""
        components, device = self.model.components, self.accelerator.device
        if self.data.online is not None:
            return StepContext(
                objective=self.objective, params=self.params, family=components.family, components=components,
                model=self.optim.denoiser, reference=self.model.reference, latents=None, cond=None, empty_cond=None,
                labels=None, scores=None, generator=generator, device=device, online=self.data.online, work=batch)
        latents, cond = batch_tensors(batch, components.family, components, device, self.model.weight_dtype,
                                      self.data.dropout_cond, self.cfg.data.prompt_dropout, generator)
        return StepContext(
            objective=self.objective, params=self.params, family=components.family, components=components,
            model=self.optim.denoiser, reference=self.model.reference, latents=latents, cond=cond,
            empty_cond=self.data.empty_cond, labels=batch["labels"].to(device) if "labels" in batch else None,
            scores=batch["scores"].to(device) if "scores" in batch else None, generator=generator, device=device,
            timesteps=self.cfg.train.timesteps,
            global_mean=lambda value: self.accelerator.reduce(value.detach().mean(), reduction="mean"))


def setup_run(cfg: Config, accelerator: Accelerator, output_dir: Path) -> Run:
    """The setup phases in order (the order is part of the numerics: see ``training.setup``)."""
    objective = get_objective(cfg.objective.name)
    params = objective.parse_params(cfg.objective.selected)
    step = STEPS.get(objective.step)
    if objective.data_kind == "prompts":  # sizes, rewards and prompts: refused before the model loads
        check_online(cfg, accelerator.num_processes)
    torch.manual_seed(cfg.train.seed)
    if cfg.train.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    model = setup_model(cfg, accelerator, objective, params)
    data = setup_data(cfg, accelerator, model.components, objective, step, params, model.weight_dtype)
    optim = setup_optimization(cfg, accelerator, model, output_dir)
    start_run_folder(cfg, accelerator, output_dir)
    log_run_summary(cfg, accelerator, objective, model, data, optim)
    return Run(cfg, accelerator, output_dir, objective, params, step, model, data, optim)


def training_loop(run: Run) -> LoopEnd:
    """Optimizer steps from the start (or resumed) step to ``train.max_steps``."""
    cfg, accelerator, optim, model = run.cfg, run.accelerator, run.optim, run.optim.denoiser
    guard = NonFiniteGuard(accelerator, optim.trainable, cfg.train, run.output_dir, optim.skipped_steps)
    window, clock = MetricWindow(accelerator), RunClock(optim.global_step)
    compiled = CompileWatch(cfg.train.compile != "off")
    global_step, micro_step = optim.global_step, optim.global_step * accelerator.gradient_accumulation_steps
    checkpoint_due, last_metrics = False, {}
    progress = tqdm(total=cfg.train.max_steps, initial=global_step, desc="training",
                    disable=not accelerator.is_main_process)
    model.train()
    batches = run.data.batches(micro_step, optim.resumed_state)
    try:  # the bar is closed however the loop ends, so an error or Ctrl-C message starts on its own line
        while global_step < cfg.train.max_steps:
            batch = next(batches)
            generator = step_generator(cfg.train.seed, micro_step, accelerator.process_index)
            micro_step += 1
            with accelerator.accumulate(model):
                output = run.step.run(run.step_context(batch, generator))
                if guard.backward(output.loss):
                    window.add({"loss": output.loss.detach(), **output.metrics})
                if accelerator.sync_gradients:
                    applied = guard.apply_update(optim.optimizer, optim.lr_scheduler, global_step + 1)
                    if applied and run.model.reference is not None:
                        run.model.reference.update(model, global_step + 1)
                    optim.optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            clock.step_done(global_step)
            guard.end_step(global_step)
            compile_metrics = compiled.after_step(global_step)
            # A checkpoint falls due every checkpointing_steps; one due on a skipped step waits for the next applied
            # update, so checkpoints only ever follow a good step.
            checkpoint_due = checkpoint_due or global_step % cfg.train.checkpointing_steps == 0
            if global_step % cfg.log.every_n_steps == 0 or global_step == cfg.train.max_steps:
                last_metrics = {**window.reduce(), "lr": optim.lr_scheduler.get_last_lr()[0],
                                "skipped_steps": guard.skipped_steps, **compile_metrics}
                accelerator.log(last_metrics, step=global_step)
                progress.set_postfix({k: f"{v:.4g}" for k, v in last_metrics.items() if k in ("loss", "implicit_acc")})
            if cfg.log.validation_every_n_steps and global_step % cfg.log.validation_every_n_steps == 0:
                with compiled.outside_steps():  # the pipeline's graphs are not training recompiles
                    log_validation(accelerator, run.model.components, unwrap(model), cfg, global_step, run.output_dir)
            if checkpoint_due and not guard.consecutive_bad and global_step < cfg.train.max_steps:
                state = {"global_step": global_step, "skipped_steps": guard.skipped_steps, "run": optim.run_settings,
                         **run.data.checkpoint_state()}
                ckpt.save_checkpoint(accelerator, run.output_dir, global_step, state, cfg.train.checkpoints_total_limit,
                                     optim.parts)
                checkpoint_due = False
    finally:
        progress.close()
        del batches  # stops the DataLoader's workers
    clock.stop()
    guard.report(global_step)
    return LoopEnd(global_step, guard.skipped_steps, last_metrics, clock)


__all__ = ["TrainResult", "TrainingStopped", "train"]
