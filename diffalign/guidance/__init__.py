"""Inference: pipeline loading with NPO-guided CFG and timestep-segment LoRA switching, and samplers by name.

``load_pipeline`` and ``AdapterRouter`` are imported on first use: they pull in diffusers and peft, while
``diffalign.config`` only needs the segments parser, and reading a config should not load a model library.
"""

from diffalign.guidance.samplers import SAMPLERS, Sampler, set_scheduler
from diffalign.guidance.segments import Segment, parse_segments, write_segments

_PIPELINE_NAMES = ("AdapterRouter", "load_pipeline")


def __getattr__(name: str):
    if name in _PIPELINE_NAMES:
        from diffalign.guidance import pipeline  # noqa: PLC0415  (lazy: diffusers and peft, see above)

        return getattr(pipeline, name)
    raise AttributeError(f"module 'diffalign.guidance' has no attribute {name!r}")


__all__ = ["SAMPLERS", "AdapterRouter", "Sampler", "Segment", "load_pipeline", "parse_segments", "set_scheduler",
           "write_segments"]
