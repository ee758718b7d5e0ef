"""PickScore (Kirstain et al. 2023, yuvalkirstain/PickScore): a CLIP-H fine-tuned on Pick-a-Pic preferences.

    score = exp(logit_scale) * cos(E_txt(prompt), E_img(image))          (about 18-23 for typical images)
    P(image i preferred among the k candidates of one prompt) = softmax_i(score)

Model: transformers ``CLIPModel`` ``yuvalkirstain/PickScore_v1`` with the processor of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (shortest edge 224, bicubic, centre crop 224, OpenAI mean/std; the
PIL backend of the image processor by default, as PickScore was trained with). Embeddings are
``.pooler_output`` of ``get_image_features``/``get_text_features`` (transformers 5 returns output objects).

Options: ``model_id`` (used when ``weights`` is None; ``weights`` = a local CLIPModel folder), ``processor``
(hub id or local processor folder), ``processor_backend`` ("pil" or "torchvision").
"""

from __future__ import annotations

import torch
from PIL import Image

from diffalign.rewards.base import REWARDS, RewardModel, RewardSpec
from diffalign.rewards.common import resolve_device, resolve_dtype, resolve_options, rgb_images

MODEL_ID = "yuvalkirstain/PickScore_v1"
PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
DEFAULTS = dict(model_id=MODEL_ID, processor=PROCESSOR_ID, processor_backend="pil")


def preference_probabilities(scores_per_candidate) -> torch.Tensor:
    """Softmax over the last axis: the k candidates of one prompt (a (k,) or (prompts, k) array of scores)."""
    return torch.softmax(torch.as_tensor(scores_per_candidate, dtype=torch.float32), dim=-1)


def pooled(output) -> torch.Tensor:
    """The projected embedding: a tensor in transformers 4, ``.pooler_output`` of the output object in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_image_processor(path: str, backend: str = "pil"):
    import transformers  # heavy (about 1 s): imported when a PickScore is built, so `diffalign --help` stays fast
    from transformers import AutoImageProcessor

    if int(transformers.__version__.split(".")[0]) >= 5:
        return AutoImageProcessor.from_pretrained(path, backend=backend)
    return AutoImageProcessor.from_pretrained(path, use_fast=backend != "pil")


class PickScore(RewardModel):
    name = "pickscore"

    def __init__(self, model, image_processor, tokenizer, device: torch.device, dtype: torch.dtype):
        self.model, self.image_processor, self.tokenizer = model, image_processor, tokenizer
        self.device, self.dtype = device, dtype

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def embed(self, images: list[Image.Image], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised float32 (image, text) embeddings, one row per image."""
        pixels = self.pixels(rgb_images(images, prompts)).to(self.device, self.dtype)
        text = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_emb = pooled(self.model.get_image_features(pixel_values=pixels)).float()
        text_emb = pooled(self.model.get_text_features(input_ids=text["input_ids"].to(self.device),
                                                       attention_mask=text["attention_mask"].to(self.device)))
        normalize = torch.nn.functional.normalize
        return normalize(image_emb, dim=-1), normalize(text_emb.float(), dim=-1)

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        if len(images) == 0:
            return torch.zeros(0, dtype=torch.float32)
        image_emb, text_emb = self.embed(images, prompts)
        logit_scale = self.model.logit_scale.float().exp()
        return (logit_scale * (image_emb * text_emb).sum(dim=-1)).float().cpu()

    def preference_probabilities(self, images: list[Image.Image], prompt: str) -> torch.Tensor:
        """P(each of the k images is preferred) for one prompt."""
        return preference_probabilities(self.score(images, [prompt] * len(images)))

    def pairwise_probability(self, image_a: Image.Image, image_b: Image.Image, prompt: str) -> float:
        """P(image_a preferred over image_b) = sigmoid(score_a - score_b)."""
        return float(self.preference_probabilities([image_a, image_b], prompt)[0])


def build_pickscore(weights=None, device=None, dtype=None, **options) -> PickScore:
    """Options: model_id, processor, processor_backend (see the module docstring)."""
    from transformers import AutoTokenizer, CLIPModel  # heavy: see load_image_processor

    weights, options = resolve_options(weights, options, DEFAULTS, "pickscore")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    model = CLIPModel.from_pretrained(weights or options["model_id"])
    model = model.eval().requires_grad_(False).to(device=device, dtype=dtype)
    image_processor = load_image_processor(options["processor"], options["processor_backend"])
    tokenizer = AutoTokenizer.from_pretrained(options["processor"])
    return PickScore(model, image_processor, tokenizer, device, dtype)


REWARDS.register(
    "pickscore",
    RewardSpec(build_pickscore, backbone="transformers CLIPModel (ViT-H-14)",
               weights_source=f"hub {MODEL_ID}, processor {PROCESSOR_ID}",
               score_range="logit scale (100) x cosine, about 18-23; softmax over candidates gives probabilities"),
    description="PickScore: exp(logit_scale) * cos(text, image) with the Pick-a-Pic-tuned CLIP-H",
    source="Kirstain et al. 2023 (Pick-a-Pic, arXiv 2305.01569); yuvalkirstain/PickScore",
)
