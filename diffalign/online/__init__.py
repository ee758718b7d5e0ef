"""Online reinforcement learning from rewards: GRPO (DDPO / Flow-GRPO), Pref-GRPO and DiffusionNFT.

A run with ``objective.name: grpo | pref_grpo | nft`` trains in rounds: sample ``online.group_size`` images for each
of ``online.prompts_per_round`` prompts from the model being trained, score them with the ``online.rewards``, turn
the gathered scores into advantages, and update. The modules, bottom up:

- ``settings``: the ``online`` config section and the round layout;
- ``sampling``: sampling grids, DDIM-with-eta and Flow-GRPO-SDE transitions with exact log-probabilities;
- ``advantages`` and ``losses``: pure functions, tested against their formulas;
- ``rounds``: prompts, sampling, scoring and the micro-step schedule on one process; ``curves``: reward_curve.png;
- ``steps``: the ``grpo`` and ``nft`` step procedures the trainer calls.
"""
