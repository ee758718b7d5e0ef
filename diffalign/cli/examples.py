"""The example epilogs of ``diffalign --help`` and each command's ``--help``: every line is a working command
(``tests/test_cli.py`` parses each one and checks the configs it names)."""

MAIN_EXAMPLES = """examples:
  diffalign train configs/tiny_dpo.yaml                     # DPO LoRA on a tiny offline model, a few minutes on CPU
  diffalign train configs/sd15_dpo.yaml train.max_steps=500 # the real SD1.5 recipe, with an override
  diffalign tiny model /tmp/tiny-sd15 --model sd15          # a tiny random-weight diffusers checkpoint
  diffalign tiny data /tmp/tiny-pairs                       # a small synthetic preference set (parquet + jsonl)
  diffalign sample --prompt-set shapes --lora runs/tiny_dpo --npo runs/tiny_npo   # NPO-guided sampling
  diffalign score --images samples/npo --reward clip --out scores.csv             # reward models
  diffalign pairs --model tiny:toy --prompt-set toy --repeat 128 --reward toy_redness --steps 20 --guidance 4 --out runs/toy/pairs
  diffalign train configs/toy/dpo.yaml                      # DPO on those pairs (toy base: pre-trained here on CPU)
  diffalign eval --model tiny:toy --prompts toy --steps 20 --guidance 4 --setup dpo:lora=runs/toy/dpo --reward toy_redness --out eval/toy
  diffalign export runs/tiny_dpo --format kohya             # LoRA for ComfyUI / A1111
  diffalign list rewards                                    # what --reward takes; `diffalign list` shows every kind
"""

TRAIN_EXAMPLES = """examples:
  diffalign train configs/tiny_dpo.yaml
  diffalign train configs/tiny_dpo.yaml train.max_steps=20 objective.dpo.beta=2500 train.output_dir=runs/try
  diffalign train configs/toy/dpo.yaml                      # toy world: after diffalign pairs (see its --help)
  diffalign train configs/sd15_dpo.yaml train.resume=latest
  diffalign train configs/sd15_dpo.yaml data.source=/data/HPD                         # HPDv2 train.json pairs
  diffalign train configs/sd15_rank_dpo.yaml data.source=/data/HPD data.split=test    # HPDv2 test.json rankings
  accelerate launch --num_processes 2 scripts/train.py --config configs/sd15_dpo.yaml
  diffalign train configs/tiny_flux_dpo.yaml                  # FLUX.1-dev-shaped tiny model, offline
  diffalign train configs/flux_dev_dpo.yaml model.quantize=int8 train.compile=blocks   # 24 GB card plan (GPU)

Overrides are dotted keys with YAML values; unknown keys are errors that name the closest valid key.
The run folder gets config.yaml, pytorch_lora_weights.safetensors, README.md, samples/, logs/, checkpoint-N/.
"""

TINY_EXAMPLES = """examples:
  diffalign tiny model /tmp/tiny-sd15 --model sd15 --seed 0
  diffalign tiny model /tmp/tiny-sd2v --model sd2v          # SD2.x-shaped, v-prediction
  diffalign tiny model /tmp/tiny-sdxl --model sdxl          # SDXL-shaped: two text encoders, time ids
  diffalign tiny model /tmp/tiny-sd3 --model sd3            # SD3-shaped: flow-matching MMDiT, CLIP x2 + T5
  diffalign tiny model /tmp/tiny-flux --model flux          # FLUX.1-dev-shaped: packed latents, embedded guidance
  diffalign tiny data /tmp/tiny-pairs --num-pairs 64
  diffalign tiny reward /tmp/tiny-hps --reward hpsv21
  diffalign tiny lora /tmp/tiny-lora --base tiny:sd15
Configs can name them without building by hand: model.pretrained=tiny:sd15, data.source=tiny:pairs.
model.pretrained=tiny:toy is the toy world's base: pre-trained on red or blue shapes on first use (minutes), cached.
"""

SAMPLE_EXAMPLES = """examples:
  diffalign sample --model tiny:sd15 --prompt-set shapes --lora runs/tiny_dpo --out samples/dpo
  diffalign sample --model tiny:sd15 --prompt "a square" --lora runs/tiny_dpo --npo runs/tiny_npo --num-images 4
  diffalign sample --model tiny:sd15 --prompts prompts.txt --segments runs/tiny_dpo_segments/segments.yaml
  diffalign sample --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompt-set everyday \\
      --npo runs/sd15_npo --scheduler dpm --steps 25 --guidance 7.5
  diffalign sample --model black-forest-labs/FLUX.1-dev --prompt "a fox" --lora runs/flux_dev_dpo \
      --npo runs/flux_npo --true-cfg 4 --guidance 3.5 --compile blocks   # FLUX: NPO needs true CFG
Writes one PNG per image, samples.jsonl (prompt, seed and settings of each image) and overview/grid.png.
Image j of prompt i uses seed SEED + i * NUM_IMAGES + j, so setups sampled with one seed compare image by image.
"""

SCORE_EXAMPLES = """examples:
  diffalign score --images samples/dpo --reward clip --out scores.csv            # folder from diffalign sample
  diffalign score --images 'photos/*.jpg' --prompts prompts.jsonl --reward hpsv21,pickscore --out scores.jsonl
  diffalign score --images samples/dpo --reward hpsv21 --weights /models/HPS_v2.1_compressed.pt --device cuda
  diffalign score --images samples/dpo --reward clip,aesthetic --weights clip=/m/clip --weights aesthetic=/m/aes
  diffalign score --images 'photos/**/*.jpg' --prompts prompts.jsonl --max-image-pixels 200000000 --follow-symlinks
Prompts: --prompts FILE (one per line, matched to the sorted images; or jsonl with file_name, prompt), else the
folder's samples.jsonl. Images are scored upright (EXIF orientation applied). Unreadable images, images over
--max-image-pixels (default Pillow's 89478485; none = no limit), symlinks that resolve outside the folder (or a
glob's fixed folder; --follow-symlinks scores them) and missing prompts become rows with an error; the exit code
is non-zero only when nothing could be scored. With several rewards an ensemble_z column (mean per-prompt
z-score) is added when some prompt has two or more scored images; otherwise a line says why it was left out.
"""

PAIRS_EXAMPLES = """examples:
  diffalign pairs --model tiny:toy --prompt-set toy --repeat 128 --reward toy_redness --steps 20 --guidance 4 --out runs/toy/pairs
  diffalign pairs --model tiny:sd15 --prompt-set shapes --repeat 4 --reward clip --steps 4 --out data/tiny_ai
  diffalign pairs --model tiny:sd15 --prompt "a red square" --reward clip,aesthetic --images-per-prompt 6 \\
      --selection all --margin 0.5 --out data/tiny_all
  diffalign pairs --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompts parti --limit 500 \\
      --reward hpsv21,pickscore --weights hpsv21=/models/HPS_v2.1_compressed.pt --steps 25 --guidance 7.5 --out data/sd15_ai
  diffalign train configs/tiny_dpo.yaml data.source=data/tiny_ai/pairs train.output_dir=runs/tiny_ai_dpo
Image j of group i uses seed SEED + i * K + j. Each group is scored by every reward (several rewards: mean per-group
z-score, --ensemble-weights to weigh them). Writes images/, groups.jsonl (one line per finished group: rerunning
the same command resumes), and four folders train reads as data.source: pairs/ (dpo, mapo, ...), scored/ (smpo),
ranked/ (rank_dpo), kto/ (kto); the folder's own metadata.jsonl is the --format view. Also summary.json and
overview/grid.png.
"""

EVAL_EXAMPLES = """examples:
  diffalign eval --model tiny:toy --prompts toy --num-images 67 --seed 1000000 --steps 20 --guidance 4 --reward toy_redness \\
      --setup dpo:lora=runs/toy/dpo --setup guided:lora=runs/toy/dpo,npo=runs/toy/npo --out eval/toy
  diffalign eval --model tiny:sd15 --prompts shapes --setup dpo:lora=runs/tiny_dpo --reward clip --steps 4 --out eval/tiny
  diffalign eval --model tiny:sd15 --prompts shapes --num-images 8 --reward clip \\
      --setup dpo:lora=runs/tiny_dpo --setup guided:lora=runs/tiny_dpo,npo=runs/tiny_npo --out eval/tiny_guided
  diffalign eval --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompts parti:Animals --limit 200 \\
      --setup dpo:lora=runs/sd15_dpo --reward hpsv21,pickscore --steps 25 --guidance 7.5 --out eval/sd15
  diffalign eval --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompts hpsv2:photo --prompts-source /data/HPDv2 \\
      --setup half:lora=runs/sd15_dpo,lora_scale=0.5 --setup dpm:scheduler=dpm --reward hpsv21 --out eval/sd15_photo
Prompts: a prompt set (diffalign list prompt-sets: shipped ones such as shapes; parti, parti:<Category>, hpsv2,
hpsv2:<style> with style anime, concept-art, paintings or photo), or a .txt/.jsonl file; --prompts-source is a local copy of parti (PartiPrompts.tsv) or hpsv2 (a
folder with benchmark/<style>.json). Setup keys: lora, npo, npo_merge_weight, segments, lora_scale, npo_scale,
scheduler. "base" (no adapters) is always the baseline. Every setup samples the same prompts and seeds; a win is
a higher score than base on the same (prompt, seed), ties count half. Writes samples/<setup>/, scores.jsonl,
report.json, report.md, grid.png and winrate.png.
"""

EXPORT_EXAMPLES = """examples:
  diffalign export runs/tiny_dpo --format kohya
  diffalign export runs/tiny_dpo/checkpoint-500 --format kohya --out my_lora.safetensors
"""

LIST_EXAMPLES = """examples:
  diffalign list                   # every kind: objectives, families, rewards, formats, prompt sets, samplers
  diffalign list rewards           # the names --reward takes, each with what it is and its source
  diffalign list samplers          # the names --scheduler takes
Each entry is a registry entry (diffalign.registry.Registry): the README's tables list the same names.
"""
