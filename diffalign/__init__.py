"""diffalign: align text-to-image diffusion models with human preferences."""

import logging

__version__ = "0.1.0"

# diffusers (0.42) warns at import, whenever torchao is installed, that torchao's tensor classes cannot be added to
# torch.load's safe globals: that only concerns unpickling torchao checkpoints, which diffalign never does.
logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").addFilter(
    lambda record: "Unable to import `torchao`" not in record.getMessage())
# torchao (imported by diffusers and peft when installed) registers enums with torch's pytree, which torch 2.14
# deprecates with a warning per enum at import; nothing for a diffalign user to act on.
logging.getLogger("torch.utils._pytree").addFilter(lambda record: "register_constant" not in record.getMessage())
