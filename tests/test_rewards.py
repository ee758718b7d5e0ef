"""Reward models on tiny random weights saved in the real formats: formulas checked against independent
computations, preprocessing checked on pixel values, batching, image modes and safe loading."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.config import ConfigError
from diffalign.rewards import available_rewards, build_reward, reward_spec
from diffalign.rewards.aesthetic import MLP_KEYS, AestheticMLP, load_mlp
from diffalign.rewards.common import (
    OPENAI_MEAN,
    OPENAI_STD,
    TINY_OPEN_CLIP_NAME,
    load_state_dict_file,
    resolve_dtype,
    tag_config,
)
from diffalign.rewards.hpsv2 import letterbox
from diffalign.rewards.pickscore import preference_probabilities
from diffalign.rewards.tiny import TINY_REWARDS, build_tiny_reward

MEAN = torch.tensor(OPENAI_MEAN)[:, None, None]
STD = torch.tensor(OPENAI_STD)[:, None, None]
PROMPTS = ["a red square", "a blue circle on grey", "a photo of a cat", "", "a green triangle",
           "an extremely long prompt " * 20, "two dogs", "a painting of a mountain at sunset"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewards")
    return {name: build_tiny_reward(root / name, name, seed=3) for name in TINY_REWARDS}


@pytest.fixture(scope="module")
def rewards(tiny_dirs):
    return {name: build_reward(name, weights=folder) for name, folder in tiny_dirs.items()}


def noise_images(count, sizes=((32, 32), (48, 96), (80, 40), (33, 65)), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in
            (sizes[i % len(sizes)] for i in range(count))]


def normalise(image):
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - MEAN) / STD


def tiny_open_clip(path, hps=False):
    import open_clip

    model = open_clip.create_model(TINY_OPEN_CLIP_NAME)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"] if hps else state)
    return model.eval()


# ---------------------------------------------------------------------------------------------- formulas
def test_clip_score_is_100_cosine_with_shortest_edge_centre_crop(tiny_dirs, rewards):
    model = tiny_open_clip(tiny_dirs["clip"] / "open_clip_model.pt")
    image = noise_images(2)[1]  # 48 wide, 96 high: shortest edge 48 -> 32 gives 32x64, crop rows 16..47
    by_hand = normalise(image.resize((32, 64), Image.BICUBIC).crop((0, 16, 32, 48)))[None]
    import open_clip

    with torch.no_grad():
        img = model.encode_image(by_hand)[0]
        txt = model.encode_text(open_clip.tokenize(["a blue circle"]))[0]
    expected = 100 * torch.dot(img, txt) / (img.norm() * txt.norm())
    got = rewards["clip"].score([image], ["a blue circle"])
    assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (1,)
    assert got[0].item() == pytest.approx(expected.item(), abs=1e-4)


@pytest.mark.parametrize("version", ["hpsv2", "hpsv21"])
def test_hps_score_is_cosine_of_hps_checkpoint_features(tiny_dirs, rewards, version):
    filename = {"hpsv2": "HPS_v2_compressed.pt", "hpsv21": "HPS_v2.1_compressed.pt"}[version]
    model = tiny_open_clip(tiny_dirs[version] / filename, hps=True)
    image = noise_images(1, sizes=((32, 32),))[0]  # square at the model size: the letterbox is the identity
    import open_clip

    with torch.no_grad():  # as HPS does it: forward() returns normalised features, score = their dot product
        out = model(normalise(image)[None], open_clip.tokenize(["a cat"]))
        expected = (out[0] @ out[1].T).diagonal()
    got = rewards[version].score([image], ["a cat"])
    assert got[0].item() == pytest.approx(expected[0].item(), abs=1e-5)
    assert -1.0 <= got[0].item() <= 1.0


def test_pickscore_is_logit_scale_times_cosine(tiny_dirs, rewards):
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(tiny_dirs["pickscore"] / "model")).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_dirs["pickscore"] / "processor"))
    images, prompts = noise_images(2, sizes=((32, 32),)), ["a red square", "a much longer prompt about a dog"]
    text = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():  # CLIPModel.forward: logits_per_image = exp(logit_scale) * image_emb @ text_emb.T
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                    pixel_values=torch.stack([normalise(image) for image in images]))
    torch.testing.assert_close(rewards["pickscore"].score(images, prompts), out.logits_per_image.diagonal(),
                               rtol=1e-5, atol=1e-5)


def test_aesthetic_is_linear_mlp_on_normalised_clip_embedding(tiny_dirs, rewards):
    model = tiny_open_clip(tiny_dirs["aesthetic"] / "clip_model.pt")
    mlp = torch.load(tiny_dirs["aesthetic"] / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
    images = noise_images(3, sizes=((32, 32),))
    with torch.no_grad():
        x = model.encode_image(torch.stack([normalise(image) for image in images]))
        x = x / x.norm(dim=-1, keepdim=True)
        for index in (0, 2, 4, 6, 7):  # no activations between the layers
            x = x @ mlp[f"layers.{index}.weight"].T + mlp[f"layers.{index}.bias"]
    got = rewards["aesthetic"].score(images, ["ignored"] * 3)
    torch.testing.assert_close(got, x[:, 0], rtol=1e-5, atol=1e-6)
    assert torch.equal(got, rewards["aesthetic"].score(images, ["other", "prompts", "here"]))


# ---------------------------------------------------------------------------------------------- preprocessing
def striped(width=96, height=32):
    """Red | green | blue with narrow red and blue bands at the left and right edges."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, :16, 0] = 255
    pixels[:, 16:width - 16, 1] = 255
    pixels[:, width - 16:, 2] = 255
    return Image.fromarray(pixels)


def colour(rgb):
    return ((torch.tensor(rgb, dtype=torch.float32)[:, None, None] - MEAN) / STD)[:, 0, 0]


def test_hps_letterbox_keeps_the_whole_image_with_black_bands():
    pixels = letterbox(striped(), 32)  # 96x32 -> 32x11, padded 10 rows on top and 11 below
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    black = colour((0, 0, 0))
    for row in (0, 9, 21, 31):
        torch.testing.assert_close(pixels[:, row, :], black[:, None].expand(3, 32))
    for column, rgb in ((1, (1, 0, 0)), (16, (0, 1, 0)), (30, (0, 0, 1))):
        torch.testing.assert_close(pixels[:, 15, column], colour(rgb), atol=2e-2, rtol=0)
    tall = letterbox(striped(32, 64), 32)  # a tall image is padded left and right instead
    torch.testing.assert_close(tall[:, :, 0], black[:, None].expand(3, 32))
    assert not torch.allclose(tall[:, :, 16], black[:, None].expand(3, 32))


def test_pickscore_processor_centre_crops(rewards):
    pixels = rewards["pickscore"].pixels([striped()])[0]  # shortest edge already 32: crop the middle 32 columns
    assert pixels.shape == (3, 32, 32)
    torch.testing.assert_close(pixels, colour((0, 1, 0))[:, None, None].expand(3, 32, 32), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- batching, modes
@pytest.mark.parametrize("name", TINY_REWARDS)
def test_a_batch_of_8_equals_8_singles(rewards, name):
    reward, images = rewards[name], noise_images(8)
    batch = reward.score(images, PROMPTS)
    singles = torch.cat([reward.score([image], [prompt]) for image, prompt in zip(images, PROMPTS)])
    assert batch.shape == (8,) and batch.dtype == torch.float32
    torch.testing.assert_close(batch, singles, rtol=1e-5, atol=1e-5)
    assert batch.unique().numel() > 1  # the scores depend on the input


@pytest.mark.parametrize("name", TINY_REWARDS)
def test_rgba_grayscale_and_16_bit_images_score(rewards, name):
    rgb = noise_images(1, sizes=((40, 40),))[0]
    rgba = rgb.copy()
    rgba.putalpha(255)
    gray = rgb.convert("L")
    sixteen = Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257)  # the same values on 0..65535
    scores = rewards[name].score([rgb, rgba, gray, sixteen], ["a cat"] * 4)
    assert torch.isfinite(scores).all()
    assert scores[0].item() == pytest.approx(scores[1].item(), abs=1e-5)  # opaque RGBA == RGB
    assert scores[2].item() == pytest.approx(scores[3].item(), abs=1e-5)  # 16-bit rescaled, not clipped


def test_empty_batch_and_mismatched_prompts(rewards):
    assert rewards["clip"].score([], []).shape == (0,)
    with pytest.raises(ValueError, match="prompt"):
        rewards["clip"].score(noise_images(2), ["only one"])


def test_low_precision_still_returns_float32_cpu_scores(tiny_dirs, rewards):
    images = noise_images(3)
    half = build_reward("clip", weights=tiny_dirs["clip"], dtype=torch.bfloat16)
    scores = half.score(images, PROMPTS[:3])
    assert scores.dtype == torch.float32 and scores.device.type == "cpu"
    torch.testing.assert_close(scores, rewards["clip"].score(images, PROMPTS[:3]), atol=1.0, rtol=0)
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cuda")) == torch.bfloat16


# ---------------------------------------------------------------------------------------------- loading
SIDE_EFFECTS = []


def record(value):
    SIDE_EFFECTS.append(value)
    return value


class Payload:
    def __reduce__(self):
        return (record, ("unpickled!",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    path = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": {"weight": Payload()}}, path)
    with pytest.raises(ValueError, match="unpickle"):
        load_state_dict_file(path)
    with pytest.raises(ValueError, match="unpickle"):
        build_reward("hpsv2", weights=str(path), model_name=TINY_OPEN_CLIP_NAME)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module, like the MPS checkpoint
    with pytest.raises(ValueError, match="unpickle"):
        load_state_dict_file(tmp_path / "module.pt")
    assert SIDE_EFFECTS == []


def test_hps_checkpoint_formats_load_the_same(tiny_dirs, rewards, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(tiny_dirs["hpsv2"] / "HPS_v2_compressed.pt", weights_only=True)["state_dict"]
    torch.save(state, tmp_path / "bare.pt")
    save_file({key: value.contiguous() for key, value in state.items()}, str(tmp_path / "hps.safetensors"))
    torch.save({"state_dict": {f"module.{key}": value for key, value in state.items()}}, tmp_path / "ddp.pt")
    images = noise_images(3)
    expected = rewards["hpsv2"].score(images, PROMPTS[:3])
    for name in ("bare.pt", "hps.safetensors", "ddp.pt"):
        reward = build_reward("hpsv2", weights=str(tmp_path / name), model_name=TINY_OPEN_CLIP_NAME)
        torch.testing.assert_close(reward.score(images, PROMPTS[:3]), expected)
    state.pop("logit_scale")
    torch.save({"state_dict": state}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="logit_scale"):
        build_reward("hpsv2", weights=str(tmp_path / "partial.pt"), model_name=TINY_OPEN_CLIP_NAME)


def test_reward_json_options_and_overrides(tiny_dirs):
    spec = json.loads((tiny_dirs["aesthetic"] / "reward.json").read_text())
    assert spec["reward"] == "aesthetic" and spec["weights"] == "sac+logos+ava1-l14-linearMSE.pth"
    clip = build_reward("clip", weights=tiny_dirs["clip"], quick_gelu=True)  # caller options win over the file
    assert type(clip.model.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    with pytest.raises(ConfigError, match="model_name"):
        build_reward("clip", weights=tiny_dirs["clip"], model_nme="ViT-B-32")


def test_open_clip_local_dir_and_cached_tiny(tiny_dirs, rewards, tmp_path):
    from safetensors.torch import save_file

    from diffalign.rewards.common import TINY_OPEN_CLIP_CONFIG
    from diffalign.rewards.tiny import tiny_reward_path

    state = torch.load(tiny_dirs["clip"] / "open_clip_model.pt", weights_only=True)
    save_file({key: value.contiguous() for key, value in state.items()}, str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP_CONFIG}))
    local = build_reward("clip", model_name=f"local-dir:{tmp_path}")
    images = noise_images(3)
    torch.testing.assert_close(local.score(images, PROMPTS[:3]), rewards["clip"].score(images, PROMPTS[:3]))
    with pytest.raises(ConfigError, match="local-dir"):
        build_reward("clip", weights=str(tmp_path), model_name=TINY_OPEN_CLIP_NAME)
    cached = tiny_reward_path("hpsv21")
    assert (cached / "reward.json").is_file() and tiny_reward_path("hpsv21") == cached


def test_openai_tags_get_quick_gelu():
    # open_clip 3.x only warns when OpenAI weights are built without QuickGELU; the builders follow the tag
    assert tag_config("ViT-L-14", "openai")["quick_gelu"] is True
    assert tag_config("ViT-H-14", "laion2b_s32b_b79k").get("quick_gelu", False) is False
    assert tag_config("ViT-L-14", None) == {}


def test_unknown_reward_names_the_closest():
    assert set(TINY_REWARDS) <= set(available_rewards())
    with pytest.raises(ConfigError, match="hpsv2"):
        build_reward("hpsv3")
    with pytest.raises(ConfigError, match="pickscore"):
        build_reward("pick_score")
    assert "xswu/HPSv2" in reward_spec("hpsv21").weights_source


def test_aesthetic_mlp_keys_are_exactly_the_released_ones(tiny_dirs, tmp_path):
    assert set(AestheticMLP().state_dict()) == MLP_KEYS
    assert MLP_KEYS == {f"layers.{i}.{kind}" for i in (0, 2, 4, 6, 7) for kind in ("weight", "bias")}
    saved = torch.load(tiny_dirs["aesthetic"] / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
    assert set(saved) == MLP_KEYS and saved["layers.0.weight"].shape == (1024, 32)
    assert [type(layer).__name__ for layer in AestheticMLP().layers] == ["Linear", "Dropout"] * 3 + ["Linear"] * 2
    saved["layers.1.weight"] = torch.zeros(1)
    torch.save(saved, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="aesthetic"):
        load_mlp(tmp_path / "bad.pth")


# ---------------------------------------------------------------------------------------------- PickScore extras
def test_pickscore_preference_probabilities(rewards):
    probs = preference_probabilities([1.0, 3.0, 2.0])
    assert probs.sum().item() == pytest.approx(1.0)
    assert probs.argsort().tolist() == [0, 2, 1]
    torch.testing.assert_close(preference_probabilities(torch.zeros(2, 4)).sum(-1), torch.ones(2))
    reward, (a, b) = rewards["pickscore"], noise_images(2)
    s_a, s_b = reward.score([a, b], ["a dog", "a dog"]).tolist()
    p = reward.pairwise_probability(a, b, "a dog")
    assert p == pytest.approx(1 / (1 + np.exp(s_b - s_a)), abs=1e-6)
    assert p + reward.pairwise_probability(b, a, "a dog") == pytest.approx(1.0, abs=1e-6)
    assert (p > 0.5) == (s_a > s_b)
