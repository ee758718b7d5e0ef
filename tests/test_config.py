"""Config loading, overrides and validation errors."""

from pathlib import Path

import pytest

from diffalign.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_config_loads_with_overrides():
    cfg = load_config(ROOT / "configs/tiny_dpo.yaml", ["train.max_steps=7", "objective.dpo.beta=2500", "lora.rank=4"])
    assert cfg.train.max_steps == 7 and cfg.lora.rank == 4
    assert cfg.objective.selected == {"beta": 2500.0, "variant": "sigmoid"}
    assert cfg.model.pretrained == "tiny:sd15"


def test_real_sd15_recipe_is_valid_and_published_hyperparameters():
    cfg = load_config(ROOT / "configs/sd15_dpo.yaml")
    assert cfg.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert cfg.data.format == "pickapic" and cfg.data.drop_ties and cfg.data.prompt_dropout == 0.2
    assert cfg.objective.name == "dpo" and cfg.objective.selected["beta"] == 5000
    # lr 1e-8 scaled by the 2048-pair effective batch (8 processes x 1 x 256) ~= 2e-5
    effective = cfg.train.learning_rate * cfg.train.batch_size * cfg.train.gradient_accumulation_steps * 8
    assert cfg.train.scale_lr and effective == pytest.approx(2.048e-5)
    assert cfg.train.max_steps == 2000 and cfg.train.lr_scheduler == "constant_with_warmup"


def test_unknown_keys_name_the_closest(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'max_steps'"):
        load_config(None, ["train.max_step=3"])
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(None, ["trian.max_steps=3"])
    with pytest.raises(ConfigError, match="objective.dpo.bta'. Did you mean 'beta'"):
        load_config(None, ["objective.dpo.bta=3"])
    with pytest.raises(ConfigError, match="Did you mean 'dpo'"):
        load_config(None, ["objective.dppo.beta=3"])


def test_objective_is_switched_by_one_key():
    cfg = load_config(ROOT / "configs/tiny_dpo.yaml", ["objective.name=sft"])
    assert cfg.objective.name == "sft" and cfg.objective.selected == {}
    assert cfg.objective.params["dpo"]["beta"] == 5000  # the other section stays, unused


def test_type_and_value_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="train.max_steps must be an integer"):
        load_config(None, ["train.max_steps=lots"])
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(None, ["train.mixed_precision=fp8"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.max_steps"])
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 1e-5\n")  # YAML 1.1 reads this as a string
    assert load_config(path).train.learning_rate == pytest.approx(1e-5)


SHIPPED = sorted([*(ROOT / "configs").glob("*.yaml"), *(ROOT / "configs" / "toy").glob("*.yaml")])
TINY_FAMILIES = ("sd2v", "sdxl", "sd3", "flux")  # tiny_<family>_<objective>.yaml; plain tiny_<objective>.yaml is sd15


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.train.output_dir.startswith("runs/")
    if path.name.startswith("tiny_"):
        name = path.stem.removeprefix("tiny_").removesuffix("_segments")
        family = next((f for f in TINY_FAMILIES if name.startswith(f + "_")), "sd15")
        assert cfg.model.pretrained == f"tiny:{family}" and cfg.data.source.startswith("tiny:")
        assert cfg.objective.name == name.removeprefix(family + "_")  # named after its objective
    if path.parent.name == "toy":
        assert cfg.model.pretrained == "tiny:toy" and cfg.train.output_dir == f"runs/toy/{path.stem}"


def test_base_inheritance_merges_sections(tmp_path):
    (tmp_path / "parent.yaml").write_text("train:\n  max_steps: 9\n  seed: 4\nobjective:\n  dpo:\n    beta: 100\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\ntrain:\n  seed: 5\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.train.max_steps, cfg.train.seed, cfg.objective.selected["beta"]) == (9, 5, 100)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "loop.yaml")


# ---- issue 12.6: one value parser for files and overrides, every error one line naming the key, exit 2
@pytest.mark.parametrize("literal, expected", [("5e3", 5000.0), ("1.0e12", 1e12), ("1e-4", 1e-4), ("2.5E+3", 2500.0),
                                               ("5000", 5000.0), (".5e4", 5000.0), ("1_000", 1000.0)])
def test_numeric_literals_read_alike_in_overrides_and_files(tmp_path, literal, expected):
    from_override = load_config(None, [f"objective.dpo.beta={literal}"]).objective.selected["beta"]
    path = tmp_path / "c.yaml"
    path.write_text(f"objective:\n  dpo:\n    beta: {literal}\n")
    assert from_override == load_config(path).objective.selected["beta"] == pytest.approx(expected)
    assert isinstance(from_override, float)


def test_integral_floats_fill_int_keys_and_fractions_do_not():
    assert load_config(None, ["train.max_steps=2e3"]).train.max_steps == 2000
    with pytest.raises(ConfigError, match=r"train.max_steps must be an integer, got 2.5"):
        load_config(None, ["train.max_steps=2.5"])


@pytest.mark.parametrize("override, message", [
    ("objective.dpo.beta=true", "objective.dpo.beta must be a number"),
    ("objective.dpo.beta=yes", "objective.dpo.beta must be a number"),
    ("objective.dpo.beta=lots", "objective.dpo.beta must be a number"),
    ("objective.dpo.beta=.nan", "objective.dpo.beta must be a finite number"),
    ("objective.kto.beta=[1]", "objective.kto.beta must be a number"),
    ("objective.sdpo.mu=.inf", "objective.sdpo.mu must be a finite number"),
    ("objective.dpo.variant=[a]", "objective.dpo.variant must be a string"),
    ("train.learning_rate=false", "train.learning_rate must be a number"),
    ("data.strict=1", "data.strict must be true or false"),
    ("train.output_dir=null", "train.output_dir must be a string"),
    ("objective.dpo.beta=-1", "objective.dpo: beta must be positive"),
])
def test_type_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_yaml_syntax_errors_name_file_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  max_steps: 3\n  seed: [1, 2\nlog:\n  every_n_steps: 1\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: line \d+, column \d+: invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"override 'train.seed=\[1,'.*invalid YAML"):
        load_config(None, ["train.seed=[1,"])
    (tmp_path / "latin1.yaml").write_bytes(b"train:\n  output_dir: runs/caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml: line 2 is not UTF-8 text \(byte 0xe9\)"):
        load_config(tmp_path / "latin1.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping of config sections, got list"):
        load_config(tmp_path / "list.yaml")


def test_bad_base_is_a_config_error(tmp_path):
    (tmp_path / "c.yaml").write_text("base: 5\n")
    with pytest.raises(ConfigError, match=r"base must be the path of another config file.*got 5"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("content, overrides, message", [
    ("base: 5\n", [], "base must be the path"),
    ("train: {max_steps: [\n", [], "invalid YAML"),
    ("train: {}\n", ["objective.dpo.beta=true"], "objective.dpo.beta must be a number"),
])
def test_cli_config_errors_are_one_line_with_exit_2(tmp_path, capsys, content, overrides, message):
    from diffalign.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(content)
    assert main(["train", str(path), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_segments_files_are_read_by_the_same_parser(tmp_path):
    from diffalign.guidance.segments import parse_segments

    path = tmp_path / "segments.yaml"
    path.write_text("segments:\n  - lora: a.safetensors\n    interval: [0, 5e2]\n  - {lora: b\n")
    with pytest.raises(ConfigError, match=r"segments.yaml: line \d+, column \d+: invalid YAML"):
        parse_segments(path)
    path.write_bytes(b"segments:\n  - lora: caf\xe9\n    interval: [0, 500]\n")
    with pytest.raises(ValueError, match=r"line 2 of .*segments.yaml is not UTF-8 \(byte 0xe9 at column 14\)"):
        parse_segments(path)


def test_duplicate_keys_and_zero_intervals_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 3\n  seed: 1\n  max_steps: 4\n")
    with pytest.raises(ConfigError, match=r"c.yaml: line 4, column 3: invalid YAML: duplicate key 'max_steps' \(first at line 2\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"train.checkpointing_steps must be at least 1, got 0 \(for no checkpoints"):
        load_config(None, ["train.checkpointing_steps=0"])
    for key in ("train.checkpoints_total_limit", "data.max_image_pixels"):
        with pytest.raises(ConfigError, match=f"{key} must be at least 1, got -1"):
            load_config(None, [f"{key}=-1"])
        assert load_config(None, [f"{key}=null"]) is not None  # null: no limit


def test_a_misplaced_or_misspelt_objective_key_names_the_right_one():
    with pytest.raises(ConfigError, match=r"Did you mean 'objective\.dpo\.beta'\?"):
        load_config("configs/tiny_dpo.yaml", ["objective.beta=2500"])
    with pytest.raises(ConfigError, match="Did you mean 'reference'"):
        load_config("configs/tiny_dpo.yaml", ["objective.refrence=ema"])
    with pytest.raises(ConfigError, match="Did you mean 'ema_decay'"):
        load_config("configs/tiny_dpo.yaml", ["objective.ema_decy=0.5"])
