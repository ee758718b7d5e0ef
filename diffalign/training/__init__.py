"""Training: the loop (``trainer``) and its setup phases (``setup``), the step procedures objectives plug into
(``steps``), reference models, LoRA handling, optimizers, non-finite guards, checkpoints, validation images,
run outputs and model cards."""
