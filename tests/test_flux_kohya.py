"""The kohya export of FLUX LoRAs (diffalign/training/kohya_flux.py), read back by diffusers' own kohya reader.

diffusers' reader (``_convert_kohya_flux_lora_to_diffusers``) hard-codes FLUX.1's widths for the single blocks'
``linear1`` (3072 x 3 + 12288 rows), so the tiny model's ``linear1`` is split here the way that reader splits it,
with the tiny widths (``read_kohya``); the reader itself is checked on ``linear1`` at FLUX.1's widths, on
LoRA weights alone (``test_single_blocks_at_flux1_widths_read_back_by_diffusers``).
"""

import subprocess
import sys

import pytest
import torch
from diffusers import FluxPipeline
from peft import LoraConfig as PeftLoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffalign.config import LoraConfig, ModelConfig
from diffalign.errors import ModelError
from diffalign.families import load_components
from diffalign.offline.lora import build_tiny_lora
from diffalign.offline.specs import resolve_model_spec
from diffalign.training.lora import LORA_WEIGHT_NAME, attach_lora, export_kohya, save_lora

ALL_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
               "ff_context.net.2", "norm1.linear", "norm1_context.linear", "proj_mlp", "proj_out", "norm.linear",
               "norm_out.linear", "x_embedder", "context_embedder", "timestep_embedder.linear_1",
               "timestep_embedder.linear_2", "text_embedder.linear_1", "text_embedder.linear_2",
               "guidance_embedder.linear_1", "guidance_embedder.linear_2"]
DOUBLE_ONLY = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"


@pytest.fixture(scope="module")
def flux_path():
    return resolve_model_spec("tiny:flux")


def build_lora(path, out_dir, seed, config) -> str:
    """A LoRA with random non-zero weights on the tiny FLUX transformer, saved as training saves it."""
    components = load_components(ModelConfig(pretrained=path))
    torch.manual_seed(seed)
    if isinstance(config, LoraConfig):
        attach_lora(components.denoiser, config, ())
    else:
        components.denoiser.add_adapter(config)
    with torch.no_grad():
        for name, param in components.denoiser.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.05)
    return str(save_lora(components.family, components.denoiser, out_dir).parent)


def deltas(state: dict, scales: dict | None = None) -> dict:
    """module -> scale * B @ A, summed over entries of the same module."""
    out = {}
    for key, down in state.items():
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0].removeprefix("transformer.")
            up = state[key.replace(".lora_A.", ".lora_B.")]
            out[module] = out.get(module, 0) + (scales or {}).get(module, 1.0) * up.double() @ down.double()
    return out


def diffusers_deltas(run_dir) -> dict:
    """The LoRA's deltas as diffusers applies them: peft's alpha / r (with alpha_pattern) from the metadata."""
    state, metadata = FluxPipeline.lora_state_dict(str(run_dir), return_lora_metadata=True)
    config = PeftLoraConfig(**{k.removeprefix("transformer."): v for k, v in metadata.items()})
    scales = {}
    for key, down in state.items():
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0].removeprefix("transformer.")
            alpha = next((a for p, a in config.alpha_pattern.items() if module.endswith(p)), config.lora_alpha)
            scales[module] = alpha / down.shape[0]
    return deltas(state, scales)


def read_kohya(path, dim: int) -> dict:
    """diffusers-format LoRA tensors (scale folded in) from a kohya FLUX file: diffusers' reader, except for the
    single blocks' linear1, split as that reader does but with the model's widths (dim x 3 + 4 dim rows)."""
    kohya = load_file(str(path))
    out = {}
    for key in [k for k in kohya if "_linear1.lora_down" in k]:
        stem = key.split(".")[0]
        block = stem.split("_")[4]
        down, up, alpha = (kohya.pop(f"{stem}.{n}") for n in ("lora_down.weight", "lora_up.weight", "alpha"))
        rank = down.shape[0] // 4
        for i, (part, rows) in enumerate(zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
                                             up.split([dim, dim, dim, 4 * dim]))):
            module = f"transformer.single_transformer_blocks.{block}.{part}"
            out[f"{module}.lora_A.weight"] = down[i * rank:(i + 1) * rank] * (alpha / down.shape[0])
            out[f"{module}.lora_B.weight"] = rows[:, i * rank:(i + 1) * rank].contiguous()
    return {**FluxPipeline.lora_state_dict(kohya), **out} if kohya else out


def assert_same_deltas(expected: dict, got: dict) -> None:
    zero = {m for m, d in got.items() if not d.any()}  # absent parts of a fused layer come back as zero LoRAs
    assert set(got) - zero == set(expected)
    for module, delta in expected.items():
        error = (got[module] - delta).norm() / delta.norm()
        assert error < 1e-5, (module, float(error))


def generate(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red square", height=32, width=32, num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_default_lora_exports_to_fused_bfl_modules(tmp_path, flux_path):
    run = build_tiny_lora(tmp_path / "run", base="tiny:flux", seed=1, alpha=6.0)
    out = export_kohya(run)
    kohya = load_file(str(out))
    names = {key.rsplit(".", 2)[0] if "lora_" in key else key.rsplit(".", 1)[0] for key in kohya}
    assert names == {f"lora_unet_double_blocks_{i}_{m}" for i in range(2)
                     for m in ("img_attn_qkv", "img_attn_proj", "txt_attn_qkv", "txt_attn_proj")} | {
        f"lora_unet_single_blocks_{i}_linear1" for i in range(2)}
    # rank 4 parts: q, k, v fused to rank 12; linear1 has a zero slot for proj_mlp (rank 16, 32 x 3 + 128 rows)
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (12, 32)
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (96, 12)
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (224, 16)
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == pytest.approx(6.0 / 4 * 12)
    assert kohya["lora_unet_double_blocks_0_img_attn_proj.alpha"].item() == 6.0
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["ss_network_module"] == "networks.lora_flux"
    assert_same_deltas(diffusers_deltas(run), deltas(read_kohya(out, dim=32)))


def test_kohya_file_gives_the_same_images(tmp_path, flux_path):
    run = build_tiny_lora(tmp_path / "run", base="tiny:flux", seed=1, alpha=6.0)
    kohya_state = read_kohya(export_kohya(run), dim=32)
    base = generate(FluxPipeline.from_pretrained(flux_path))
    images = []
    for source in (str(run), kohya_state):
        pipe = FluxPipeline.from_pretrained(flux_path)
        pipe.load_lora_weights(source)
        images.append(generate(pipe))
    assert abs(images[0] - base).max() > 1e-3
    assert abs(images[0] - images[1]).max() < 1e-4


def test_double_block_lora_loads_straight_through_diffusers(tmp_path, flux_path):
    """No single blocks: the file goes through FluxPipeline.load_lora_weights as it is."""
    run = build_lora(flux_path, tmp_path / "run", 3, PeftLoraConfig(r=4, lora_alpha=2.0, target_modules=DOUBLE_ONLY,
                                                                     init_lora_weights="gaussian"))
    with pytest.raises(ModelError, match="SD3 transformer LoRA stays in the diffusers format"):
        export_kohya(run)  # no config.yaml: SD3 and FLUX double blocks share their names
    out = export_kohya(run, family="flux")
    assert_same_deltas(diffusers_deltas(run), deltas(FluxPipeline.lora_state_dict(str(out))))
    images = []
    for source in (run, str(out)):
        pipe = FluxPipeline.from_pretrained(flux_path)
        pipe.load_lora_weights(source)
        images.append(generate(pipe))
    assert abs(images[0] - images[1]).max() < 1e-4


def test_every_linear_module_round_trips(tmp_path, flux_path):
    run = build_lora(flux_path, tmp_path / "run", 4, LoraConfig(rank=4, alpha=3.0, target_modules=ALL_TARGETS))
    out = export_kohya(run)
    kohya = load_file(str(out))
    for name in ("double_blocks_1_img_mlp_0", "double_blocks_1_txt_mlp_2", "double_blocks_0_img_mod_lin",
                 "double_blocks_0_txt_mod_lin", "single_blocks_1_linear2", "single_blocks_0_modulation_lin",
                 "img_in", "txt_in", "time_in_in_layer", "vector_in_out_layer", "guidance_in_in_layer",
                 "final_layer_linear", "final_layer_adaLN_modulation_1"):
        assert f"lora_unet_{name}.lora_down.weight" in kohya, name
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (224, 16)
    assert kohya["lora_unet_final_layer_linear.alpha"].item() == 4.0  # scale folded in: diffusers ignores it
    expected = diffusers_deltas(run)
    assert_same_deltas(expected, deltas(read_kohya(out, dim=32)))
    # BFL's final modulation rows are (shift, scale), diffusers' (scale, shift)
    up, down = (kohya[f"lora_unet_final_layer_adaLN_modulation_1.lora_{n}.weight"] for n in ("up", "down"))
    assert torch.allclose((up @ down).double(), expected["norm_out.linear"].roll(32, 0), rtol=1e-5, atol=1e-8)
    # diffusers' reader returns the top-level modules (img_in, time_in, final_layer ...) without "transformer.",
    # and load_lora_weights then drops them silently: prefixed here, the kohya file gives the same image
    state = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in read_kohya(out, dim=32).items()}
    images = []
    for source in (run, state):
        pipe = FluxPipeline.from_pretrained(flux_path)
        pipe.load_lora_weights(source)
        images.append(generate(pipe))
    assert abs(images[0] - images[1]).max() < 1e-4


def test_partial_fused_layers_with_per_module_rank_and_alpha(tmp_path, flux_path):
    config = PeftLoraConfig(r=4, lora_alpha=2.0, target_modules=["attn.to_k", "proj_mlp", "attn.add_v_proj"],
                            rank_pattern={"proj_mlp": 2}, alpha_pattern={"proj_mlp": 16.0},
                            init_lora_weights="gaussian")
    run = build_lora(flux_path, tmp_path / "run", 5, config)
    out = export_kohya(run)
    kohya = load_file(str(out))
    assert kohya["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (16, 32)  # 4 slots of rank 4
    assert kohya["lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight"].shape == (96, 12)
    assert_same_deltas(diffusers_deltas(run), deltas(read_kohya(out, dim=32)))


def test_single_blocks_at_flux1_widths_read_back_by_diffusers(tmp_path):
    """diffusers' reader on linear1 itself: FLUX.1's widths (3072, MLP 12288), LoRA weights only, rank 2."""
    torch.manual_seed(6)
    shapes = {"attn.to_q": (3072, 3072), "attn.to_v": (3072, 3072), "proj_mlp": (3072, 12288),
              "proj_out": (15360, 3072), "norm.linear": (3072, 9216)}
    state = {}
    for module, (fan_in, fan_out) in shapes.items():
        key = f"single_transformer_blocks.0.{module}"  # save_lora_weights adds "transformer."
        state[f"{key}.lora_A.weight"] = torch.randn(2, fan_in) * 0.05
        state[f"{key}.lora_B.weight"] = torch.randn(fan_out, 2) * 0.05
    metadata = PeftLoraConfig(r=2, lora_alpha=5.0, target_modules=list(shapes)).to_dict()
    FluxPipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=state,
                                   transformer_lora_adapter_metadata=metadata)
    out = export_kohya(tmp_path)
    assert load_file(str(out))["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (21504, 8)
    assert_same_deltas(deltas(state, {f"single_transformer_blocks.0.{m}": 2.5 for m in shapes}), deltas(FluxPipeline.lora_state_dict(str(out))))


def test_modules_without_a_kohya_counterpart_are_refused(tmp_path):
    state = {"transformer.transformer_blocks.0.attn.norm_q.lora_A.weight": torch.zeros(2, 16),
             "transformer.transformer_blocks.0.attn.norm_q.lora_B.weight": torch.zeros(16, 2),
             "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32),
             "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 2)}
    save_file(state, str(tmp_path / LORA_WEIGHT_NAME))
    with pytest.raises(ModelError, match=r"no counterpart for the LoRA on transformer_blocks\.0\.attn\.norm_q;"):
        export_kohya(tmp_path)


def test_cli_exports_a_flux_run_folder(tmp_path, flux_path):
    """A run folder of diffalign's (config.yaml names the base model): a double-blocks-only LoRA is recognised."""
    run = build_lora(flux_path, tmp_path / "run", 7, PeftLoraConfig(r=4, lora_alpha=8.0, target_modules=DOUBLE_ONLY,
                                                                     init_lora_weights="gaussian"))
    (tmp_path / "run" / "config.yaml").write_text("model:\n  pretrained: tiny:flux\n")
    result = subprocess.run([sys.executable, "-m", "diffalign", "export", run, "--format", "kohya"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    kohya = load_file(str(tmp_path / "run" / "pytorch_lora_weights_kohya.safetensors"))
    assert "lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight" in kohya
    assert_same_deltas(diffusers_deltas(run), deltas(FluxPipeline.lora_state_dict(kohya)))
