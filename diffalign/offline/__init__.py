"""Offline builders: tiny random-weight models and data, and the toy world, all from a seed with no network.

Everything is saved exactly as the real thing is (diffusers ``save_pretrained`` folders, parquet and jsonl data
sets, LoRA files), so tests, the demo and the benchmarks go through the same loading code as a hub id.

- ``specs``: the ``tiny:<name>`` specs, ``TINY_MODELS`` and ``TINY_DATASETS``, built on first use and cached
  (``resolve_model_spec``, ``resolve_data_spec``); importing it registers ``tiny:`` for ``model.pretrained``;
- ``models``: the tiny model builders, one per checkpoint they imitate (sd15, sd2v, sdxl, sd3);
- ``data``: the tiny preference data (red vs blue shapes) in every on-disk form the readers take;
- ``lora``: random LoRAs for a base, saved as training saves them;
- ``toy_base``: the toy world's base (``tiny:toy``), a tiny model *pre-trained here* on red or blue shapes, so
  that alignment has something to move;
- ``toy_loop``: the toy world's product loop, pairs -> train each objective -> eval against the base.

This package sits beside the library: it may import families, training and evaluation, and nothing below it
imports the builders except through the ``tiny:`` specs. ``lora`` and ``toy_loop`` are not imported here (they
sit on top of training, guidance and evaluation); import them by their module.
"""

from diffalign.offline.specs import (
    TINY_DATASETS,
    TINY_MODELS,
    build_tiny_model,
    is_tiny_spec,
    resolve_data_spec,
    resolve_model_spec,
)

__all__ = ["TINY_DATASETS", "TINY_MODELS", "build_tiny_model", "is_tiny_spec", "resolve_data_spec",
           "resolve_model_spec"]
