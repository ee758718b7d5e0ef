"""The command line: help with working examples, tiny builders, clear one-line errors."""

import json
import os
import shlex
import subprocess
import sys

from conftest import ROOT, tiny_overrides

import diffalign.cli as cli
from diffalign.cli import build_parser, main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "diffalign", *args], capture_output=True, text=True, cwd=ROOT)


def test_main_and_train_help_show_examples():
    top = run_cli("--help")
    assert top.returncode == 0
    assert "diffalign train configs/tiny_dpo.yaml" in top.stdout and "examples:" in top.stdout
    train = run_cli("train", "--help")
    assert train.returncode == 0
    assert "accelerate launch" in train.stdout and "train.resume=latest" in train.stdout
    for command in ("tiny", "export"):
        assert "examples:" in run_cli(command, "--help").stdout


def test_help_examples_name_real_configs():
    # every config the help text mentions exists, so the examples work in a fresh clone
    from diffalign.cli import MAIN_EXAMPLES, TRAIN_EXAMPLES

    for text in (MAIN_EXAMPLES, TRAIN_EXAMPLES):
        for word in text.split():
            if word.startswith("configs/"):
                assert (ROOT / word).is_file(), word


def test_every_help_example_parses():
    # each example line of every --help is a command the parser accepts (flags, choices, required arguments)
    parser = build_parser()
    texts = [getattr(cli, name) for name in cli.__all__ if name.endswith("_EXAMPLES")]
    commands = [line.strip() for text in texts for line in text.replace("\\\n", " ").splitlines()
                if line.strip().startswith("diffalign ")]
    assert len(texts) == 9 and len(commands) > 30
    for command in commands:
        parser.parse_args(shlex.split(command, comments=True)[1:])


def test_tiny_model_and_data_commands_build_loadable_outputs(tmp_path):
    from diffusers import StableDiffusionPipeline

    assert main(["tiny", "model", str(tmp_path / "model"), "--seed", "3"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "model"))
    assert pipe.tokenizer.vocab_size == 49408 and pipe.unet.config.cross_attention_dim == 32
    assert main(["tiny", "data", str(tmp_path / "data"), "--num-pairs", "6"]) == 0
    lines = (tmp_path / "data" / "jsonl" / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 6 and set(json.loads(lines[0])) == {"prompt", "chosen_file_name", "rejected_file_name"}
    assert (tmp_path / "data" / "pairs.parquet").is_file()


def test_tiny_sd3_command_builds_a_stock_sd3_pipeline_with_a_working_t5_tokenizer(tmp_path):
    from diffusers import DiffusionPipeline

    assert main(["tiny", "model", str(tmp_path / "sd3"), "--family", "sd3"]) == 0
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "sd3"))
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and type(pipe.scheduler).__name__.startswith("FlowMatch")
    ids = pipe.tokenizer_3("a Red square!").input_ids
    assert ids[-1] == 1 and 2 not in ids  # ends with </s>, no unknown pieces
    assert pipe.tokenizer_3.convert_ids_to_tokens(ids[:2]) == ["\u2581a", "\u2581R"]  # word-initial pieces
    assert pipe.text_encoder_3.config.d_model == pipe.transformer.config.joint_attention_dim


def test_tiny_tokenizer_matches_open_clip():
    import open_clip

    from diffalign.offline.models import build_clip_tokenizer

    text = "A Red squaré, with commas! 123"
    ours = build_clip_tokenizer()(text).input_ids
    reference = open_clip.get_tokenizer("ViT-B-32")([text])[0].tolist()
    assert ours == reference[: len(ours)] and reference[len(ours)] == 0


def test_bad_input_gives_one_line_error_and_exit_code_2(tmp_path):
    bad_key = run_cli("train", "configs/tiny_dpo.yaml", "train.max_step=3")
    assert bad_key.returncode == 2
    assert "Did you mean 'max_steps'" in bad_key.stderr and "Traceback" not in bad_key.stderr
    missing = run_cli("export", str(tmp_path))
    assert missing.returncode == 2 and "pytorch_lora_weights.safetensors" in missing.stderr


def test_readme_objective_table_covers_every_objective():
    from diffalign.objectives import available_objectives, get_objective

    readme = (ROOT / "README.md").read_text()
    shipped = [n for n in available_objectives() if get_objective(n).params_cls.__module__.startswith("diffalign.")]
    assert len(shipped) >= 8
    for name in shipped:
        assert f"| `{name}` |" in readme, name
        assert (ROOT / "configs" / f"tiny_{name}.yaml").is_file(), name
        if get_objective(name).data_kind == "prompts":  # online: a toy recipe, and the real ones the README names
            assert (ROOT / "configs" / "toy" / f"{name}.yaml").is_file(), name
        else:
            assert (ROOT / "configs" / f"sd15_{name}.yaml").is_file(), name
    for recipe in ("sd15_ddpo_aesthetic", "sd3_flow_grpo_pickscore", "sd3_nft"):
        assert f"configs/{recipe}.yaml" in readme and (ROOT / "configs" / f"{recipe}.yaml").is_file(), recipe


def test_under_accelerate_launch_only_the_main_process_prints_results(tmp_path, tiny_model_path, tiny_data_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "tiny_dpo.yaml"),
               *tiny_overrides(run, **{"train.max_steps": 2, "train.batch_size": 2, "train.checkpointing_steps": 10})]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    printed = completed.stdout.splitlines()
    assert [line for line in printed if line.startswith(("LoRA:", "weights:", "model card:"))] == [
        f"LoRA:        {run / 'pytorch_lora_weights.safetensors'}", f"model card:  {run / 'README.md'}"]
