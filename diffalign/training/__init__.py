"""Training: the loop, LoRA handling, optimizers, checkpoints, validation images and model cards."""
