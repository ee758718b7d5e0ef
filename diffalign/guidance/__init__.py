"""Inference: pipeline loading with NPO-guided CFG and timestep-segment LoRA switching."""

from diffalign.guidance.pipeline import AdapterRouter, load_pipeline
from diffalign.guidance.segments import Segment, parse_segments, write_segments

__all__ = ["AdapterRouter", "Segment", "load_pipeline", "parse_segments", "write_segments"]
