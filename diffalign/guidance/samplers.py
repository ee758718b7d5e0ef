"""Samplers by name: the diffusers schedulers ``load_pipeline(scheduler=...)`` and ``--scheduler`` accept.

    pipe = load_pipeline("tiny:sd15", scheduler="dpm")      # DPMSolverMultistepScheduler from the pipeline's config
    SAMPLERS.names()                                        # ['ddim', 'dpm', ..., 'flow_euler']

Each entry names a diffusers scheduler class, built with ``from_config`` from the pipeline's own scheduler
config (so the noise schedule, prediction type, SD3's shift and FLUX's dynamic shifting are kept). DDPM-schedule
samplers fit SD1.x, SD2.x and SDXL; ``flow_euler`` fits flow-matching models (SD3, FLUX). A sampler that does not
fit the model is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffalign.errors import ConfigError
from diffalign.registry import Registry


@dataclass(frozen=True)
class Sampler:
    scheduler_class: str  # the diffusers class name
    flow_matching: bool = False  # True: for flow-matching models (SD3, FLUX); False: for DDPM-schedule models


SAMPLERS: Registry[Sampler] = Registry("sampler", "--scheduler")

SAMPLERS.register("ddim", Sampler("DDIMScheduler"), description="DDIM: deterministic implicit sampling (eta 0)",
                  source="Song et al. 2020 (DDIM, arXiv 2010.02502); diffusers DDIMScheduler")
SAMPLERS.register("dpm", Sampler("DPMSolverMultistepScheduler"),
                  description="DPM-Solver++ multistep (second order): good images in 20-25 steps",
                  source="Lu et al. 2022 (DPM-Solver++, arXiv 2211.01095); diffusers DPMSolverMultistepScheduler")
SAMPLERS.register("euler", Sampler("EulerDiscreteScheduler"),
                  description="Euler steps of the probability-flow ODE (SDXL's default)",
                  source="Karras et al. 2022 (EDM, arXiv 2206.00364); diffusers EulerDiscreteScheduler")
SAMPLERS.register("euler_a", Sampler("EulerAncestralDiscreteScheduler"),
                  description="ancestral Euler: fresh noise at every step (stochastic)",
                  source="crowsonkb/k-diffusion; diffusers EulerAncestralDiscreteScheduler")
SAMPLERS.register("pndm", Sampler("PNDMScheduler"),
                  description="PNDM / PLMS pseudo linear multistep (SD1.x's default)",
                  source="Liu et al. 2022 (PNDM, arXiv 2202.09778); diffusers PNDMScheduler")
SAMPLERS.register("ddpm", Sampler("DDPMScheduler"),
                  description="DDPM ancestral sampling: the training chain, needs many steps",
                  source="Ho et al. 2020 (DDPM, arXiv 2006.11239); diffusers DDPMScheduler")
SAMPLERS.register("unipc", Sampler("UniPCMultistepScheduler"),
                  description="UniPC predictor-corrector multistep: few steps",
                  source="Zhao et al. 2023 (UniPC, arXiv 2302.04867); diffusers UniPCMultistepScheduler")
SAMPLERS.register("flow_euler", Sampler("FlowMatchEulerDiscreteScheduler", flow_matching=True),
                  description="Euler steps of the flow-matching ODE, for SD3 and FLUX (their default)",
                  source="Esser et al. 2024 (SD3, arXiv 2403.03206); diffusers FlowMatchEulerDiscreteScheduler")


def set_scheduler(pipe, name: str) -> None:
    """Replace ``pipe.scheduler`` by the sampler ``name``, built from the current scheduler's config.

    Raises ``ConfigError`` for an unknown name, or a sampler of the other kind (flow matching vs DDPM schedule).
    """
    import diffusers  # heavy (seconds): imported when a pipeline is built, so `diffalign --help` stays fast

    if name not in SAMPLERS:
        raise ConfigError(f"unknown scheduler '{name}'; choose one of {', '.join(SAMPLERS)}")
    sampler = SAMPLERS.get(name)
    flow_model = type(pipe.scheduler).__name__.startswith("FlowMatch")
    if flow_model != sampler.flow_matching:
        usable = [entry.name for entry in SAMPLERS.entries() if entry.value.flow_matching == flow_model]
        kind = "a flow-matching" if flow_model else "a DDPM-schedule"
        raise ConfigError(f"scheduler '{name}' does not fit {kind} model ({type(pipe).__name__}); use one of "
                          f"{', '.join(usable)}")
    pipe.scheduler = getattr(diffusers, sampler.scheduler_class).from_config(pipe.scheduler.config)
