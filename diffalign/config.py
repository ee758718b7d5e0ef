"""Run configuration: one dataclass per YAML section, dotted command-line overrides, validation with clear errors.

    >>> cfg = load_config("configs/tiny_dpo.yaml", ["train.max_steps=20", "objective.dpo.beta=2500"])
    >>> cfg.train.max_steps, cfg.objective.params["dpo"]["beta"]
    (20, 2500.0)

Unknown keys are errors that name the closest valid key. Objective hyperparameters live in a sub-section named
after the objective (``objective.dpo.beta``), checked against that objective's own dataclass, so switching
objectives is the one key ``objective.name`` and the other sections can stay in the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffalign.config_io import (  # noqa: F401  (re-exported: the config's reading helpers)
    ConfigLoader,
    apply_overrides,
    check_choice,
    dataclass_from_dict,
    deep_merge,
    parse_yaml,
    read_yaml,
)
from diffalign.errors import ConfigError, closest  # noqa: F401  (re-exported)
from diffalign.guidance.segments import parse_segments
from diffalign.objectives import available_objectives, get_objective
from diffalign.online.settings import OnlineConfig, validate_online


@dataclass
class ModelConfig:
    pretrained: str = "tiny:sd15"  # hub id, local diffusers folder, or tiny:<model> (built offline on first use)
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" weight files on the hub
    family: str = "auto"  # auto = read from the checkpoint's model_index.json
    resolution: int | None = None  # None = the denoiser's native size (sample_size x VAE factor)
    vae: str | None = None  # a separate VAE folder/hub id, e.g. madebyollin/sdxl-vae-fp16-fix (SDXL's VAE: fp32)
    # FLUX.1-dev: the guidance value embedded in every training forward (families/flux.py says why 1.0)
    flux_guidance: float = 1.0
    # LoRA runs: store the frozen base quantised (none | int8 | fp8 | nf4; training/speed.py says which library)
    quantize: str = "none"


@dataclass
class DataConfig:
    source: str = "tiny:pairs"  # hub dataset id, parquet file/dir/glob, folder with metadata.jsonl, or tiny:pairs
    format: str = "auto"  # auto | pickapic | chosen_rejected | labelled | ranked | jsonl | hpdv2
    split: str = "train"
    strict: bool = False  # bad records are fatal instead of skipped and counted
    drop_ties: bool = True  # Pick-a-Pic label_0 == 0.5; kept ties are trained in source order (diffusers' behaviour)
    max_samples: int | None = None
    max_image_pixels: int | None = 89_478_485  # more: skipped and counted (Pillow default); null = no limit
    streaming: bool = False  # hub / parquet tables: read rows as they arrive instead of downloading everything first
    random_flip: bool = True  # both orientations are cached, one is picked per step
    prompt_dropout: float = 0.0  # probability of training a pair with the empty prompt (the original DPO used 0.2)
    cache: bool = True  # cache VAE latents and text embeddings on disk
    cache_dir: str | None = None  # default: $DIFFALIGN_CACHE/features or ~/.cache/diffalign/features
    cache_dtype: str = "float32"  # float32 | float16 | bfloat16
    encode_batch_size: int = 8
    num_workers: int | None = None  # DataLoader workers decoding images; None: none for small data, else CPUs/process
    cache_shard_rows: int | None = None  # source rows per cache shard and process; None: shards of about 64 MB


REFERENCE_STRATEGIES = ["auto", "lora_disabled", "frozen_copy", "ema", "none"]


@dataclass
class ObjectiveConfig:
    name: str = "dpo"
    # auto: none for reference-free objectives, else the objective's own default (self_npo: ema),
    # else lora_disabled with LoRA and frozen_copy for full fine-tuning
    reference: str = "auto"
    reference_offload: bool = False  # frozen_copy / full-model ema: keep the copy on the CPU between passes
    ema_decay: float = 0.99  # ema: ref <- decay * ref + (1 - decay) * policy ...
    ema_update_every: int = 10  # ... every this many optimizer steps
    params: dict[str, dict[str, Any]] = field(default_factory=dict)  # per objective: {"dpo": {"beta": 5000}}

    @property
    def selected(self) -> dict[str, Any]:
        """The hyperparameters of the objective named by ``name``."""
        return self.params.get(self.name, {})


@dataclass
class LoraConfig:
    enabled: bool = True
    rank: int = 8
    alpha: float | None = None  # None = rank (scale 1)
    dropout: float = 0.0
    # None: the family's attention projections (SD/SDXL: to_k, to_q, to_v, to_out.0; SD3 adds the text stream's)
    target_modules: list[str] | None = None


@dataclass
class TimestepConfig:
    # Density of the training noise level: auto (the family's: uniform for DDPM models, logit_normal for flow
    # matching), uniform, or logit_normal (logit(u) ~ N(logit_mean, logit_std^2), u the noise level in (0, 1)).
    sampling: str = "auto"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    interval: list[int] | None = None  # [t_lo, t_hi): sample only inside this segment (timestep-segment training)
    weighting: str = "none"  # none | min_snr | table: per-sample weights on the policy and reference errors
    min_snr_gamma: float = 5.0
    weight_table: list[list[float]] = field(default_factory=list)  # [[t_lo, t_hi, weight], ...]; 1 elsewhere


@dataclass
class TrainConfig:
    output_dir: str = "runs/dpo"
    seed: int = 0
    max_steps: int = 2000  # optimizer steps
    batch_size: int = 1  # records (pairs) per process per micro-step
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    scale_lr: bool = False  # multiply learning_rate by batch_size x accumulation x processes
    lr_scheduler: str = "constant_with_warmup"  # any diffusers get_scheduler name
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False  # needs the bitsandbytes extra and a CUDA GPU
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    compile: str = "off"  # off | denoiser | blocks (torch.compile of each repeated block: short compile times)
    attention: str = "sdpa"  # sdpa | xformers (CUDA only)
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp16 needs a GPU)
    allow_tf32: bool = True
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume: str | None = None  # "latest" or a checkpoint folder
    max_consecutive_nonfinite: int = 5  # stop after this many non-finite losses in a row
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)


@dataclass
class LogConfig:
    every_n_steps: int = 10
    report_to: str = "tensorboard"  # tensorboard | wandb | none
    validation_every_n_steps: int = 500  # 0 disables validation images
    validation_prompts: list[str] = field(
        default_factory=lambda: ["a photo of a cat", "a red square on a grey background"]
    )
    validation_seeds: list[int] = field(default_factory=lambda: [0, 1])
    validation_inference_steps: int = 25
    validation_guidance_scale: float | None = None  # None: the family's (7.5; FLUX 3.5)


@dataclass
class SegmentTrainConfig:
    """One LoRA of a timestep-segment run: trained only on t in ``interval``, on its own data."""

    interval: list[int] = field(default_factory=list)  # [t_lo, t_hi)
    name: str | None = None
    data: dict[str, Any] = field(default_factory=dict)  # overrides of the data section for this segment
    scale: float = 1.0  # adapter weight written to segments.yaml


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)  # online objectives (grpo, pref_grpo, nft)
    # Timestep-segment training: one LoRA per entry, then a segments.yaml for load_pipeline(segments=...).
    segments: list[SegmentTrainConfig] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        objective = raw["objective"]
        raw["objective"] = {**{k: v for k, v in objective.items() if k != "params"}, **self.objective.params}
        return raw

    def validate(self) -> Config:
        # YAML 1.1 reads a bare `no` / `off` as false, which a string field receives as "False"
        if self.train.mixed_precision == "False":
            self.train.mixed_precision = "no"
        if self.train.compile == "False":
            self.train.compile = "off"
        if self.model.quantize == "False":
            self.model.quantize = "none"
        check_choice("train.mixed_precision", self.train.mixed_precision, ["no", "bf16", "fp16"])
        check_choice("data.format", self.data.format, ["auto", "pickapic", "chosen_rejected", "labelled", "ranked", "jsonl",
                                                       "hpdv2"])
        check_choice("data.cache_dtype", self.data.cache_dtype, ["float32", "float16", "bfloat16"])
        check_choice("log.report_to", self.log.report_to, ["tensorboard", "wandb", "none"])
        check_choice("train.compile", self.train.compile, ["off", "denoiser", "blocks"])
        check_choice("train.attention", self.train.attention, ["sdpa", "xformers"])
        check_choice("model.quantize", self.model.quantize, ["none", "int8", "fp8", "nf4"])
        if self.model.flux_guidance < 0:
            raise ConfigError(f"model.flux_guidance must be >= 0 (FLUX.1-dev's embedded guidance value; 1.0 keeps its "
                              f"distilled guidance), got {self.model.flux_guidance}")
        if self.model.quantize != "none" and not self.lora.enabled:
            raise ConfigError(f"model.quantize={self.model.quantize} quantises the frozen base of a LoRA run; full "
                              "fine-tuning trains those weights (set lora.enabled=true or model.quantize=none)")
        for key, value in [
            ("train.max_steps", self.train.max_steps),
            ("train.batch_size", self.train.batch_size),
            ("train.gradient_accumulation_steps", self.train.gradient_accumulation_steps),
            ("lora.rank", self.lora.rank),
            ("train.max_consecutive_nonfinite", self.train.max_consecutive_nonfinite),
            ("train.checkpointing_steps", self.train.checkpointing_steps),
            ("train.checkpoints_total_limit", self.train.checkpoints_total_limit),  # null = keep every checkpoint
            ("data.max_image_pixels", self.data.max_image_pixels),  # null = no limit
            ("data.encode_batch_size", self.data.encode_batch_size),
            ("data.cache_shard_rows", self.data.cache_shard_rows),  # null = about 64 MB per shard
            ("data.max_samples", self.data.max_samples),
        ]:
            if value is not None and value < 1:
                hint = " (for no checkpoints, set it above train.max_steps)" if key == "train.checkpointing_steps" else ""
                raise ConfigError(f"{key} must be at least 1, got {value}{hint}")
        if self.data.num_workers is not None and self.data.num_workers < 0:
            raise ConfigError(f"data.num_workers must be 0 (decode in the training process) or more, got "
                              f"{self.data.num_workers}; null picks one per CPU")
        if not 0.0 <= self.data.prompt_dropout < 1.0:
            raise ConfigError(f"data.prompt_dropout must be in [0, 1), got {self.data.prompt_dropout}")
        if self.train.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate must be positive, got {self.train.learning_rate}")
        validate_timesteps(self.train.timesteps)
        validate_segments(self)
        get_objective(self.objective.name)
        sections = dict(self.objective.params)
        sections.setdefault(self.objective.name, {})
        for section, values in sections.items():
            if section not in available_objectives():
                own = [f.name for f in dataclasses.fields(ObjectiveConfig) if f.name != "params"]
                selected = dataclasses.fields(get_objective(self.objective.name).params_cls)
                if section in {f.name for f in selected}:  # objective.beta: a hyperparameter written one level up
                    raise ConfigError(f"unknown config key 'objective.{section}'. Did you mean "
                                      f"'objective.{self.objective.name}.{section}'? Hyperparameters live under "
                                      "the objective's name.")
                raise ConfigError(f"unknown config key 'objective.{section}'."
                                  f"{closest(section, [*own, *available_objectives()])}")
            if not isinstance(values, dict):
                raise ConfigError(f"objective.{section} must be a mapping of hyperparameters, got {values!r}")
            # Every section is checked (a typo in an unused one is still a typo) and filled with defaults.
            sections[section] = dataclasses.asdict(get_objective(section).parse_params(values, prefix=f"objective.{section}"))
        self.objective.params = sections
        resolve_reference(self)
        objective = get_objective(self.objective.name)
        if objective.data_kind == "prompts":
            validate_online(self, objective.step)
            if self.segments:
                raise ConfigError(f"segments train offline objectives; objective {self.objective.name} is online")
        return self


def resolve_reference(cfg: Config) -> str:
    """The reference strategy to use, after refusing combinations that make no sense."""
    objective_cfg = cfg.objective
    check_choice("objective.reference", objective_cfg.reference, REFERENCE_STRATEGIES)
    objective = get_objective(objective_cfg.name)
    reference = objective_cfg.reference
    if objective.optional_reference:
        if reference in ("auto", "none"):
            return "none"
        if reference not in ("lora_disabled", "frozen_copy"):
            raise ConfigError(f"objective '{objective.name}' takes objective.reference=lora_disabled or frozen_copy "
                              f"(the base its KL term compares with), not {reference}")
    elif not objective.needs_reference:
        if reference not in ("auto", "none"):
            raise ConfigError(f"objective '{objective.name}' runs no reference pass, so objective.reference={reference} "
                              "has no use; remove it or set objective.reference=none")
        return "none"
    if reference == "none":
        raise ConfigError(f"objective '{objective.name}' needs a reference model; set objective.reference to "
                          "lora_disabled (LoRA), frozen_copy or ema")
    if reference == "auto":
        reference = objective.default_reference or ("lora_disabled" if cfg.lora.enabled else "frozen_copy")
    if reference == "lora_disabled" and not cfg.lora.enabled:
        raise ConfigError("objective.reference=lora_disabled needs LoRA training: with lora.enabled=false there are no "
                          "adapters to disable. Use objective.reference=frozen_copy (or ema) for full fine-tuning")
    if objective_cfg.reference_offload and not (reference == "frozen_copy" or (reference == "ema" and not cfg.lora.enabled)):
        raise ConfigError("objective.reference_offload applies to a separate reference copy (frozen_copy, or ema with "
                          f"full fine-tuning), not to objective.reference={reference}")
    if not 0.0 <= objective_cfg.ema_decay < 1.0 or objective_cfg.ema_update_every < 1:
        raise ConfigError("objective.ema_decay must be in [0, 1) and objective.ema_update_every at least 1")
    return reference


def _config_from_dict(raw: dict[str, Any]) -> Config:
    raw = dict(raw or {})
    objective_raw = dict(raw.pop("objective", None) or {})
    cfg = dataclass_from_dict(Config, raw, "")
    # The objective section mixes its own fields with one sub-section per objective name (checked in validate).
    own = {f.name for f in dataclasses.fields(ObjectiveConfig)} - {"params"}
    fields_raw = {k: v for k, v in objective_raw.items() if k in own}
    cfg.objective = dataclass_from_dict(ObjectiveConfig, fields_raw, "objective")
    cfg.objective.params = {k: v for k, v in objective_raw.items() if k not in own}
    return cfg


def validate_segments(cfg: Config) -> None:
    if not cfg.segments:
        return
    try:
        parse_segments([(segment.name or f"segment {i}", segment.interval) for i, segment in enumerate(cfg.segments)])
    except ValueError as error:
        raise ConfigError(f"segments: {error}") from error
    if cfg.train.timesteps.interval is not None:
        raise ConfigError("train.timesteps.interval is set per segment by segments[].interval; remove it")
    names = [segment.name for segment in cfg.segments if segment.name]
    if len(names) != len(set(names)):
        raise ConfigError(f"segments: names must be unique, got {names}")
    for i, segment in enumerate(cfg.segments):
        dataclass_from_dict(DataConfig, deep_merge(dataclasses.asdict(cfg.data), segment.data), f"segments[{i}].data")


def validate_timesteps(ts: TimestepConfig) -> None:
    check_choice("train.timesteps.sampling", ts.sampling, ["auto", "uniform", "logit_normal"])
    if ts.logit_std <= 0:
        raise ConfigError(f"train.timesteps.logit_std must be positive, got {ts.logit_std}")
    check_choice("train.timesteps.weighting", ts.weighting, ["none", "min_snr", "table"])
    if ts.interval is not None:
        if len(ts.interval) != 2 or not 0 <= ts.interval[0] < ts.interval[1]:
            raise ConfigError(f"train.timesteps.interval must be [t_lo, t_hi) with 0 <= t_lo < t_hi, got {ts.interval}")
    if ts.weighting == "min_snr" and ts.min_snr_gamma <= 0:
        raise ConfigError(f"train.timesteps.min_snr_gamma must be positive, got {ts.min_snr_gamma}")
    if ts.weighting == "table":
        if not ts.weight_table:
            raise ConfigError("train.timesteps.weighting=table needs train.timesteps.weight_table: [[t_lo, t_hi, weight], ...]")
        spans = sorted((row[0], row[1]) for row in ts.weight_table if len(row) == 3)
        if len(spans) != len(ts.weight_table) or any(lo >= hi for lo, hi in spans):
            raise ConfigError(f"train.timesteps.weight_table rows must be [t_lo, t_hi, weight] with t_lo < t_hi, got {ts.weight_table}")
        if any(prev_hi > lo for (_, prev_hi), (lo, _) in zip(spans, spans[1:])):
            raise ConfigError(f"train.timesteps.weight_table intervals overlap: {ts.weight_table}")
    elif ts.weight_table:
        raise ConfigError("train.timesteps.weight_table is set but train.timesteps.weighting is not 'table'")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    raw: dict[str, Any] = read_yaml(Path(path).resolve()) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    return _config_from_dict(raw).validate()


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
