"""GPU speed settings, on CPU where they run: compiled and eager training agree, attention routing and its
refusals, the int8-quantised frozen base (torchao) under a LoRA that loads into the unquantised base, the refusals
of fp8 / nf4 / xformers off CUDA, the fused AdamW decision, recompile warnings and `--compile` sampling."""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_overrides
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from diffalign.config import ModelConfig, load_config
from diffalign.errors import ConfigError
from diffalign.families import load_components
from diffalign.offline.specs import resolve_model_spec
from diffalign.training.optim import build_optimizer
from diffalign.training.speed import (
    CompileWatch,
    attention_backends,
    check_speed_settings,
    compile_denoiser,
)
from diffalign.training.trainer import train

CPU = torch.device("cpu")


def speed_cfg(tmp_path, name, **extra):
    return load_config(ROOT / "configs" / "tiny_dpo.yaml", tiny_overrides(tmp_path / name, **{
        "train.max_steps": 2, "train.batch_size": 2, "data.cache_dir": str(tmp_path / "features"), **extra}))


# ---------------------------------------------------------------------------------------------- compile
@pytest.mark.slow  # inductor compiles each block on CPU: a few minutes on 2 cores
def test_compiled_blocks_train_like_eager_with_checkpointing_and_the_reference_pass(tmp_path):
    extra = {"train.gradient_checkpointing": True, "log.every_n_steps": 1, "train.learning_rate": 1e-2}
    eager = train(speed_cfg(tmp_path, "eager", **extra))
    compiled = train(speed_cfg(tmp_path, "compiled", **{**extra, "train.compile": "blocks"}))
    assert compiled.metrics["compile_graphs"] > 0 and "compile_graphs" not in eager.metrics
    for name in ("loss", "policy_mse_w", "policy_mse_l", "ref_mse_w", "ref_mse_l"):  # ref: adapters disabled
        assert compiled.metrics[name] == pytest.approx(eager.metrics[name], abs=1e-4), name
    a, b = (load_file(str(r.output_dir / "pytorch_lora_weights.safetensors")) for r in (eager, compiled))
    assert max(value.abs().max() for key, value in a.items() if "lora.up" in key or "lora_B" in key) > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_compiled_blocks_train_under_ddp_with_identical_ranks(tmp_path):
    from test_distributed import launch_two_processes

    run = tmp_path / "ddp"
    launch_two_processes("tiny_dpo.yaml", run, **{"train.compile": "blocks", "train.max_steps": 2,
                                                  "data.cache_dir": str(tmp_path / "features")})
    info = json.loads((run / "run_info.json").read_text())
    assert info["num_processes"] == 2 and info["lora_checksums"][0] == info["lora_checksums"][1]
    assert math.isfinite(info["final_metrics"]["loss"]) and info["final_metrics"]["compile_graphs"] > 0


def test_blocks_are_the_repeated_blocks_of_each_denoiser():
    counts = {}
    for name in ("sd15", "sd3", "flux"):
        denoiser = load_components(ModelConfig(pretrained=resolve_model_spec(f"tiny:{name}"))).denoiser
        counts[name] = compile_denoiser(denoiser, "blocks")  # lazily compiled: nothing is built until a call
    # sd15: BasicTransformerBlocks, 1 down + 1 mid + 2 up; sd3: 2 JointTransformerBlocks; flux: 2 double + 2 single
    assert counts == {"sd15": 4, "sd3": 2, "flux": 4}
    assert compile_denoiser(torch.nn.Linear(2, 2), "off") == 0
    with pytest.raises(ConfigError, match="no known repeated blocks; use compile=denoiser"):
        compile_denoiser(torch.nn.Sequential(torch.nn.Linear(2, 2)), "blocks")


def test_compile_watch_warns_once_when_graphs_keep_coming(caplog):
    torch._dynamo.reset()
    function = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    watch = CompileWatch(True)
    function(torch.ones(2))
    assert watch.after_step(1)["compile_graphs"] >= 1
    watch.after_step(2)  # the baseline: warm-up over
    function(torch.ones(3))  # a new shape: a recompile after warm-up
    with caplog.at_level("WARNING"):
        watch.after_step(3)
        function(torch.ones(4))
        watch.after_step(4)
    warnings = [r.message for r in caplog.records if "new graph" in r.message]
    assert len(warnings) == 1 and "TORCH_LOGS=recompiles" in warnings[0]
    assert CompileWatch(False).after_step(3) == {}
    quiet = CompileWatch(True)  # graphs built outside the steps (validation images) are not recompiles
    quiet.after_step(10)
    quiet.after_step(11)  # a resumed run: its own warm-up
    with quiet.outside_steps():
        function(torch.ones(5))
    with caplog.at_level("WARNING"):
        quiet.after_step(12)
    assert len([r for r in caplog.records if "new graph" in r.message]) == 1  # still only the first watch's


# ---------------------------------------------------------------------------------------------- attention
def test_sdpa_is_what_every_family_runs_and_xformers_is_refused_off_cuda(tmp_path):
    expected = {"sd15": {"AttnProcessor2_0"}, "sd3": {"JointAttnProcessor2_0"}, "flux": {"FluxAttnProcessor"}}
    for name, processors in expected.items():
        denoiser = load_components(ModelConfig(pretrained=resolve_model_spec(f"tiny:{name}"))).denoiser
        assert attention_backends(denoiser) == processors  # each calls F.scaled_dot_product_attention
    with pytest.raises(ConfigError, match="attention=xformers"):
        train(speed_cfg(tmp_path, "xformers", **{"train.attention": "xformers"}))
    assert not (tmp_path / "xformers").exists()  # refused before any work, the run folder included
    with pytest.raises(ConfigError, match="train.attention"):
        speed_cfg(tmp_path, "typo", **{"train.attention": "flash"})


def test_yaml_off_reads_as_off_and_bad_choices_are_one_line(tmp_path):
    assert speed_cfg(tmp_path, "a", **{"train.compile": "off"}).train.compile == "off"  # YAML 1.1: false
    with pytest.raises(ConfigError, match="train.compile"):
        speed_cfg(tmp_path, "b", **{"train.compile": "max"})


# ---------------------------------------------------------------------------------------------- quantised base
def test_fp8_and_nf4_are_refused_off_cuda_and_quantize_needs_a_lora(tmp_path):
    for mode, message in (("fp8", "compute capability 8.9"), ("nf4", "CUDA only")):
        with pytest.raises(ConfigError, match=message):
            check_speed_settings("sdpa", "off", CPU, mode, True)
    with pytest.raises(ConfigError, match="quantises the frozen base of a LoRA run"):
        speed_cfg(tmp_path, "full", **{"model.quantize": "int8", "lora.enabled": False})


RELOAD = """
import sys, torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
base, run, out = sys.argv[1:4]
pipe = DiffusionPipeline.from_pretrained(base)
pipe.load_lora_weights(run)
pipe.set_progress_bar_config(disable=True)
latents = pipe("a red square", num_inference_steps=3, guidance_scale=4.0, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
save_file({"latents": latents.contiguous()}, out)
"""


def test_int8_base_trains_a_fp32_lora_that_loads_into_the_unquantised_base(tmp_path):
    from torchao.quantization import Int8Tensor

    result = train(speed_cfg(tmp_path, "int8", **{"model.quantize": "int8", "train.max_steps": 3,
                                                  "train.learning_rate": 5e-3, "log.every_n_steps": 1}))
    layer = result.denoiser.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert isinstance(layer.base_layer.weight, Int8Tensor) and layer.lora_A["default"].weight.dtype == torch.float32
    lora = load_file(str(result.output_dir / "pytorch_lora_weights.safetensors"))
    assert all(value.dtype == torch.float32 for value in lora.values())
    assert max(value.abs().max() for key, value in lora.items() if "lora.up" in key or "lora_B" in key) > 0
    base = resolve_model_spec("tiny:sd15")
    script = tmp_path / "reload.py"
    script.write_text(RELOAD)
    subprocess.run([sys.executable, str(script), base, str(result.output_dir), str(tmp_path / "out.safetensors")],
                   check=True, capture_output=True)
    reloaded = load_file(str(tmp_path / "out.safetensors"))["latents"]
    components = load_components(ModelConfig(pretrained=base))
    pipe = components.family.build_pipeline(components, result.denoiser.float())  # the quantised base + LoRA
    pipe.set_progress_bar_config(disable=True)
    plain = DiffusionPipeline.from_pretrained(base)
    plain.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=3, guidance_scale=4.0, output_type="latent")
    trained = pipe("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images
    untouched = plain("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images
    gap = (untouched - reloaded).abs().max()
    assert gap > 1e-3  # the LoRA is in the reloaded outputs
    assert (trained - reloaded).abs().max() < gap  # closer to the quantised run than the base is: int8 error only


@pytest.mark.parametrize("model", ["tiny:sd15", "tiny:flux"])
def test_int8_base_trains_under_bf16_autocast(tmp_path, model):
    # torchao's layers ignore autocast: their inputs are cast to the weight's dtype, as autocast casts a Linear's
    result = train(speed_cfg(tmp_path, "bf16", **{"model.quantize": "int8", "train.mixed_precision": "bf16",
                                                  "model.pretrained": model, "train.max_steps": 1}))
    assert math.isfinite(result.metrics["loss"])


def test_int8_reference_pass_runs_on_the_same_quantised_base(tmp_path):
    first = train(speed_cfg(tmp_path, "first", **{"model.quantize": "int8", "train.max_steps": 1}))
    # LoRA B starts at zero: the policy is the quantised base, so is the reference (adapters disabled), exactly
    assert first.metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first.metrics["policy_mse_w"] == first.metrics["ref_mse_w"]


# ---------------------------------------------------------------------------------------------- optimizer
def test_fused_adamw_only_when_every_parameter_is_on_cuda():
    cfg = load_config(None, [])
    cpu = build_optimizer([torch.nn.Parameter(torch.ones(2))], cfg.train, 1e-3)
    assert cpu.param_groups[0]["fused"] is False
    if torch.cuda.is_available():
        cuda = build_optimizer([torch.nn.Parameter(torch.ones(2, device="cuda"))], cfg.train, 1e-3)
        assert cuda.param_groups[0]["fused"] is True


# ---------------------------------------------------------------------------------------------- sampling
def test_sample_takes_compile_and_attention_and_refuses_xformers_here(tmp_path, capsys):
    from diffalign.cli import main

    base = resolve_model_spec("tiny:sd15")
    assert main(["sample", "--model", base, "--prompt", "a square", "--attention", "xformers", "--steps", "2",
                 "--out", str(tmp_path / "x")]) == 2
    assert "attention=xformers" in capsys.readouterr().err and not (tmp_path / "x").exists()
    from diffalign.guidance import load_pipeline

    assert main(["eval", "--model", base, "--prompts", "shapes", "--limit", "1", "--reward", "toy_redness",
                 "--setup", "b:attention=xformers", "--out", str(tmp_path / "e")]) == 2
    assert "setup 'b': attention=xformers" in capsys.readouterr().err
    assert not (tmp_path / "e" / "samples").exists()  # refused before the base setup was sampled
    pipe = load_pipeline(base, compile="blocks", attention="sdpa")
    assert all(hasattr(block, "_compiled_call_impl") and block._compiled_call_impl is not None
               for block in pipe.unet.modules() if type(block).__name__ == "BasicTransformerBlock")


def test_yaml_no_for_mixed_precision_reads_as_no(tmp_path):
    assert speed_cfg(tmp_path, "a", **{"train.mixed_precision": "no"}).train.mixed_precision == "no"
    assert speed_cfg(tmp_path, "b", **{"model.quantize": "no"}).model.quantize == "none"
