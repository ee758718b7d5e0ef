"""FLUX.1 LoRAs from diffusers' (peft) key format to kohya sd-scripts' format over BFL's module names, the format
ComfyUI, Forge and sd-scripts load for FLUX.

Input: ``FluxPipeline.save_lora_weights`` output, ``transformer.<module>.lora_A.weight`` (r, in) and
``.lora_B.weight`` (out, r), with the peft config under the ``lora_adapter_metadata`` header. Each module's delta
is s * B @ A with s = alpha / r (alpha / sqrt(r) under rsLoRA; alpha from ``alpha_pattern`` when it matches).

Output: ``lora_unet_<bfl_module>.lora_down.weight`` (R, in), ``.lora_up.weight`` (out, R) and ``.alpha`` (scalar);
the loaders apply (alpha / R) * up @ down. Module map (diffusers -> BFL, ``flux/model.py`` and ``modules/layers.py``
of black-forest-labs/flux):
  transformer_blocks.i: to_q,k,v -> double_blocks_i_img_attn_qkv, to_out.0 -> img_attn_proj, ff.net.0.proj /
  ff.net.2 -> img_mlp_0 / img_mlp_2, norm1.linear -> img_mod_lin; add_q,k,v_proj -> txt_attn_qkv, to_add_out ->
  txt_attn_proj, ff_context.net.0.proj / .2 -> txt_mlp_0 / 2, norm1_context.linear -> txt_mod_lin;
  single_transformer_blocks.i: to_q,k,v,proj_mlp -> single_blocks_i_linear1, proj_out -> linear2, norm.linear ->
  modulation_lin; x_embedder -> img_in, context_embedder -> txt_in, time_text_embed.{timestep,text,guidance}_embedder
  .linear_1/2 -> {time,vector,guidance}_in_{in,out}_layer, proj_out -> final_layer_linear, norm_out.linear ->
  final_layer_adaLN_modulation_1 (BFL's rows are (shift, scale), diffusers' (scale, shift): the up rows swap).

Fused layers: BFL computes q, k, v (single blocks: q, k, v and the MLP input) with one Linear whose output rows are
the parts' rows stacked. Parts p = 1..n with (A_p, B_p, s_p), padded with zeros to a common slot rank r (an absent
part is all zeros: its rows still exist in the fused weight) and with B_p rescaled by s_p / s, s the first part's
scale, give down = cat_p(A_p) (n r, in) and up = blockdiag_p(B_p) (sum out_p, n r). Row block p of up @ down is
B_p A_p, so alpha = s * n r makes (alpha / (n r)) up @ down = stack_p(s_p B_p A_p): each part's delta, exactly.
This is the layout of sd-scripts' ``networks/convert_flux_lora.py`` (``convert_to_sd_scripts_cat``), and diffusers'
reader (``lora_conversion_utils._convert_kohya_flux_lora_to_diffusers``) recognises it as "sparse" and splits it
back into rank-r parts. Absent parts' row counts: q, k, v have ``dim`` outputs and proj_mlp 4 ``dim``
(``FluxSingleTransformerBlock``'s fixed mlp_ratio), ``dim`` being the parts' input size.

diffusers' reader ignores the final layer's ``.alpha`` (it loads those two at scale 1), so their scale is folded
into ``up`` and their alpha written as the rank: every loader then applies the same delta. Its single-block reader
also assumes FLUX.1's widths (3072, MLP 12288) and cannot read smaller models' ``linear1``; ComfyUI can.
"""

from __future__ import annotations

import json
import math
import re

import torch
from peft.utils.other import get_pattern_key

from diffalign.errors import ModelError

PREFIX = "lora_unet_"
DOUBLE = {"attn.to_out.0": "img_attn_proj", "ff.net.0.proj": "img_mlp_0", "ff.net.2": "img_mlp_2",
          "norm1.linear": "img_mod_lin", "attn.to_add_out": "txt_attn_proj", "ff_context.net.0.proj": "txt_mlp_0",
          "ff_context.net.2": "txt_mlp_2", "norm1_context.linear": "txt_mod_lin"}
DOUBLE_FUSED = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
SINGLE = {"proj_out": "linear2", "norm.linear": "modulation_lin"}
SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
TOP = {"x_embedder": "img_in", "context_embedder": "txt_in",
       "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
       "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
       "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
       "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
       "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
       "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
       "proj_out": "final_layer_linear", "norm_out.linear": "final_layer_adaLN_modulation_1"}
FINAL = ("final_layer_linear", "final_layer_adaLN_modulation_1")  # read at scale 1 by diffusers
BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")
LORA_KEY = re.compile(r"transformer\.(.+)\.(lora_A|lora_B)\.weight")


def is_flux_lora(keys) -> bool:
    """Whether diffusers-format LoRA keys can only be FLUX's: single-stream blocks exist in no other family this
    exports (SD3's MMDiT has the same double-block names, so a double-blocks-only LoRA is ambiguous)."""
    return any(key.startswith("transformer.single_transformer_blocks.") for key in keys)


def flux_to_kohya(tensors: dict[str, torch.Tensor], header: dict) -> dict[str, torch.Tensor]:
    """diffusers-format FLUX LoRA tensors (+ the safetensors header) -> kohya FLUX tensors (module docstring).

    Raises ``ModelError`` naming any module with no BFL counterpart, or weights that are not plain LoRA (DoRA,
    LoRA biases, embeddings)."""
    config = _adapter_config(header)
    parts = _lora_parts(tensors, config)
    singles, fused, unmapped = {}, {}, []
    for module, part in parts.items():
        target = _bfl_target(module)
        if target is None:
            unmapped.append(module)
        elif isinstance(target, str):
            singles[target] = part
        else:
            name, index, count = target
            fused.setdefault(name, [None] * count)[index] = (module, part)
    if unmapped:
        raise ModelError(f"the kohya FLUX format has no counterpart for the LoRA on {', '.join(sorted(unmapped))}; "
                         "keep this LoRA in the diffusers format (pipe.load_lora_weights)")
    out = {}
    for name, (down, up, scale) in singles.items():
        if name in FINAL:
            up = (_swap_halves(up) if name.endswith("adaLN_modulation_1") else up)
            out.update(_entry(name, down, (up.float() * scale).to(up.dtype), 1.0))
        else:
            out.update(_entry(name, down, up, scale))
    for name, slots in fused.items():
        out.update(_entry(name, *_fuse(name, slots)))
    return out


def _entry(name: str, down: torch.Tensor, up: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """alpha = scale * rank, in float32 whatever the weights' dtype (a bf16 alpha would round)."""
    return {f"{PREFIX}{name}.lora_down.weight": down.contiguous(), f"{PREFIX}{name}.lora_up.weight": up.contiguous(),
            f"{PREFIX}{name}.alpha": torch.tensor(scale * down.shape[0], dtype=torch.float32)}


def _fuse(name: str, slots: list) -> tuple[torch.Tensor, torch.Tensor, float]:
    present = [slot for slot in slots if slot is not None]
    (_, (first_down, first_up, scale)) = present[0]
    dim = first_down.shape[1]
    # FluxTransformer2DModel: q, k, v map dim -> dim; the single blocks' proj_mlp dim -> 4 dim (mlp_ratio 4)
    rows = [4 * dim if i == 3 else dim for i in range(len(slots))]
    rank = max(down.shape[0] for _, (down, _, _) in present)
    dtype = first_down.dtype
    downs, ups = [], []
    for i, slot in enumerate(slots):
        down = torch.zeros(rank, dim, dtype=dtype)
        up = torch.zeros(rows[i], rank, dtype=dtype)
        if slot is not None:
            module, (part_down, part_up, part_scale) = slot
            if part_down.shape[1] != dim or part_up.shape[0] != rows[i]:
                raise ModelError(f"{module}: LoRA shapes {tuple(part_down.shape)} / {tuple(part_up.shape)} do not fit "
                                 f"FLUX's fused {name} ({rows[i]} output rows from {dim} inputs)")
            r = part_down.shape[0]
            down[:r] = part_down
            up[:, :r] = part_up if part_scale == scale else (part_up.float() * (part_scale / scale)).to(dtype)
        downs.append(down)
        ups.append(up)
    return torch.cat(downs), torch.block_diag(*ups), scale


def _bfl_target(module: str):
    """A BFL module name (str), (fused name, part index, parts) for a part of a fused layer, or None."""
    match = BLOCK.fullmatch(module)
    if match is None:
        return TOP.get(module)
    kind, index, rest = match.groups()
    plain, fused_map, stem = ((DOUBLE, DOUBLE_FUSED, f"double_blocks_{index}_") if kind == "transformer_blocks"
                              else (SINGLE, SINGLE_FUSED, f"single_blocks_{index}_"))
    if rest in plain:
        return stem + plain[rest]
    for fused_name, members in fused_map.items():
        if rest in members:
            return stem + fused_name, members.index(rest), len(members)
    return None


def _lora_parts(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, tuple]:
    """module -> (A (r, in), B (out, r), s) for every module under ``transformer.``."""
    found, extra = {}, []
    for key, value in tensors.items():
        match = LORA_KEY.fullmatch(key)
        if match is None:
            extra.append(key)
            continue
        found.setdefault(match.group(1), {})[match.group(2)] = value
    if extra:
        raise ModelError(f"the kohya FLUX export converts plain LoRA weights (lora_A / lora_B) under transformer.; "
                         f"this file also holds {', '.join(sorted(extra)[:3])} (DoRA, LoRA biases or text-encoder "
                         "LoRAs are not exported)")
    parts = {}
    for module, pair in found.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ModelError(f"{module}: the LoRA file has only {', '.join(pair)}")
        down, up = pair["lora_A"], pair["lora_B"]
        parts[module] = (down, up, _scale(module, down.shape[0], config))
    return parts


def _scale(module: str, rank: int, config: dict) -> float:
    """peft's scaling: alpha / r (alpha / sqrt(r) with rsLoRA); no saved alpha means alpha = r, as
    diffusers' ``load_lora_weights`` then assumes."""
    alpha = config.get("lora_alpha")
    pattern = config.get("alpha_pattern") or {}
    key = get_pattern_key(list(pattern), module)
    alpha = pattern.get(key, alpha)
    if alpha is None:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _adapter_config(header: dict) -> dict:
    """diffusers stores the peft config flat under "lora_adapter_metadata": {"transformer.lora_alpha": 8, ...}."""
    data = json.loads(header.get("lora_adapter_metadata", "{}"))
    config = {key.removeprefix("transformer."): value for key, value in data.items()}
    if config.get("use_dora"):
        raise ModelError("a DoRA adapter (use_dora) has magnitude vectors the kohya LoRA format cannot hold")
    return config


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)
