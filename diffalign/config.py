"""Run configuration: one dataclass per YAML section, dotted command-line overrides, validation with clear errors.

    cfg = load_config("configs/tiny_dpo.yaml", ["train.max_steps=20", "objective.dpo.beta=2500"])

Unknown keys are errors that name the closest valid key. Objective hyperparameters live in a sub-section named
after the objective (``objective.dpo.beta``), checked against that objective's own dataclass, so switching
objectives is the one key ``objective.name`` and the other sections can stay in the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config mistake the user can fix; the message says how."""


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading every numeric literal a user writes as a number.

    PyYAML implements YAML 1.1, whose floats need a dot and a signed exponent: ``5e3``, ``1e-4`` and ``1.0e12``
    come back as strings, while YAML 1.2 and every other tool read them as floats. The one extra resolver below
    (a mantissa with an exponent, no dot needed) fixes that; integers, ``1.5`` and the rest resolve as before.
    Used for config files, ``base:`` files and command-line overrides alike.
    """


def _unique_mapping(loader: ConfigLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are unique: YAML forbids duplicates, PyYAML keeps the last one silently."""
    seen: dict[Any, yaml.Mark] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key].line + 1}); keep one", key_node.start_mark)
        seen[key] = key_node.start_mark
    return loader.construct_mapping(node, deep=deep)


ConfigLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> Python values with ``ConfigLoader``; a syntax error is a ``ConfigError`` naming ``where``
    (a file, or an override) and the line and column."""
    try:
        return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        position = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}:{position} invalid YAML: {problem}") from error


@dataclass
class ModelConfig:
    pretrained: str = "tiny:sd15"  # hub id, local diffusers folder, or tiny:<family> (built offline on first use)
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" weight files on the hub
    family: str = "auto"  # auto = read from the checkpoint's model_index.json
    resolution: int | None = None  # None = the denoiser's native size (sample_size x VAE factor)
    vae: str | None = None  # a separate VAE folder/hub id, e.g. madebyollin/sdxl-vae-fp16-fix (SDXL's VAE: fp32)


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
    validation_guidance_scale: float = 7.5


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
    # Timestep-segment training: one LoRA per entry, then a segments.yaml for load_pipeline(segments=...).
    segments: list[SegmentTrainConfig] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        objective = raw["objective"]
        raw["objective"] = {**{k: v for k, v in objective.items() if k != "params"}, **self.objective.params}
        return raw

    def validate(self) -> Config:
        check_choice("train.mixed_precision", self.train.mixed_precision, ["no", "bf16", "fp16"])
        check_choice("data.format", self.data.format, ["auto", "pickapic", "chosen_rejected", "labelled", "ranked", "jsonl",
                                                       "hpdv2"])
        check_choice("data.cache_dtype", self.data.cache_dtype, ["float32", "float16", "bfloat16"])
        check_choice("log.report_to", self.log.report_to, ["tensorboard", "wandb", "none"])
        for key, value in [
            ("train.max_steps", self.train.max_steps),
            ("train.batch_size", self.train.batch_size),
            ("train.gradient_accumulation_steps", self.train.gradient_accumulation_steps),
            ("lora.rank", self.lora.rank),
            ("train.max_consecutive_nonfinite", self.train.max_consecutive_nonfinite),
            ("train.checkpointing_steps", self.train.checkpointing_steps),
            ("train.checkpoints_total_limit", self.train.checkpoints_total_limit),  # null = keep every checkpoint
            ("data.max_image_pixels", self.data.max_image_pixels),  # null = no limit
        ]:
            if value is not None and value < 1:
                hint = " (for no checkpoints, set it above train.max_steps)" if key == "train.checkpointing_steps" else ""
                raise ConfigError(f"{key} must be at least 1, got {value}{hint}")
        if not 0.0 <= self.data.prompt_dropout < 1.0:
            raise ConfigError(f"data.prompt_dropout must be in [0, 1), got {self.data.prompt_dropout}")
        if self.train.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate must be positive, got {self.train.learning_rate}")
        from diffalign.config_checks import validate_segments, validate_timesteps

        validate_timesteps(self.train.timesteps)
        validate_segments(self)
        from diffalign.objectives import available_objectives, get_objective

        get_objective(self.objective.name)
        sections = dict(self.objective.params)
        sections.setdefault(self.objective.name, {})
        for section, values in sections.items():
            if section not in available_objectives():
                raise ConfigError(f"unknown config key 'objective.{section}'.{closest(section, ['name', *available_objectives()])}")
            if not isinstance(values, dict):
                raise ConfigError(f"objective.{section} must be a mapping of hyperparameters, got {values!r}")
            # Every section is checked (a typo in an unused one is still a typo) and filled with defaults.
            sections[section] = dataclasses.asdict(get_objective(section).parse_params(values, prefix=f"objective.{section}"))
        self.objective.params = sections
        resolve_reference(self)
        return self


def resolve_reference(cfg: Config) -> str:
    """The reference strategy to use, after refusing combinations that make no sense."""
    from diffalign.objectives import get_objective

    objective_cfg = cfg.objective
    check_choice("objective.reference", objective_cfg.reference, REFERENCE_STRATEGIES)
    objective = get_objective(objective_cfg.name)
    reference = objective_cfg.reference
    if not objective.needs_reference:
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


def check_choice(key: str, value: Any, choices: list[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {choices}")


def closest(name: str, candidates: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else f" Valid keys: {', '.join(sorted(candidates))}."


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check a YAML value against a dataclass field's type. Numbers are read by ``ConfigLoader``; here ints are
    accepted where floats are expected, integral floats (``2e3``) where ints are, and booleans never as numbers."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {})  # noqa: S307 - our own annotations only
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict or annotation is Any:
        return value
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is float:
        if not is_number:
            raise ConfigError(f"{key} must be a number (e.g. 5000, 5e3 or 1.0e-4), got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if annotation is int:
        if is_number and float(value).is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation is str and not isinstance(value, str):
        if isinstance(value, dict | list) or value is None:
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def dataclass_from_dict(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from ``raw``, refusing unknown keys and wrong types with the dotted key name."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise ConfigError(f"unknown config key '{dotted}'.{closest(key, fields)}")
        annotation = hints[key]
        item_type = (typing.get_args(annotation) or [None])[0]
        if dataclasses.is_dataclass(annotation):
            values[key] = dataclass_from_dict(annotation, value or {}, dotted)
        elif typing.get_origin(annotation) is list and dataclasses.is_dataclass(item_type):
            if not isinstance(value, list):
                raise ConfigError(f"{dotted} must be a list, got {value!r}")
            values[key] = [dataclass_from_dict(item_type, item or {}, f"{dotted}[{i}]") for i, item in enumerate(value)]
        else:
            values[key] = _coerce(value, annotation, dotted)
    return cls(**values)


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


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override '{override}' must look like key.sub=value, e.g. train.max_steps=100")
        key, _, text = override.partition("=")
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{override}': '{part}' is not a section")
        node[parts[-1]] = parse_yaml(text, f"override '{override}'") if text.strip() else None
    return raw


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file, with ``base: other.yaml`` (relative to the file) merged underneath it."""
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; see configs/ for examples, e.g. configs/tiny_dpo.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line} is not UTF-8 text (byte {error.object[error.start]:#04x}); "
                          "save the config as UTF-8") from error
    raw = parse_yaml(text, str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base must be the path of another config file (relative to this one), "
                          f"e.g. 'base: tiny_dpo.yaml', got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: 'base: {base}' makes a cycle")
    return deep_merge(read_yaml(base_path, (*seen, base_path)), raw)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    raw: dict[str, Any] = read_yaml(Path(path).resolve()) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    return _config_from_dict(raw).validate()


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
