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
TINY_FAMILIES = ("sd2v", "sdxl", "sd3")  # tiny_<family>_<objective>.yaml; plain tiny_<objective>.yaml is sd15


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
