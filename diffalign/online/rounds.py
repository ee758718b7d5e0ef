"""Online rounds on one process: which prompts a round samples, sampling, scoring, advantages, and the micro-step
schedule that trains on them.

The trainer's loop is unchanged: ``OnlineRounds.batches`` yields one ``WorkItem`` per micro-step (round, inner
epoch, sampling batch, trained slot), and the step procedure (``diffalign.online.steps``) calls ``ensure`` at the
first micro-step of each round, which samples the round with the weights as they are then. Everything random is
seeded by (seed, round, image) or (seed, round, epoch), so a run resumed at a round boundary samples exactly what an
uninterrupted one would have; checkpoints therefore fall on round boundaries (``train.checkpointing_steps`` is a
multiple of the optimizer steps per round), and the running reward statistics go into them (``state``).

Prompt order: passes over the prompt list, each a permutation seeded by (seed, pass); round r takes the next
``prompts_per_round`` prompts. Layout: the round's M = P G images are prompt-major; process p holds images
p n .. (p + 1) n - 1 (n = M / processes), so a group may span processes. Rewards are gathered over the round
before advantages are computed (``accelerator.gather``: the same statistics on every process).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from diffalign.errors import ConfigError
from diffalign.logs import get_logger
from diffalign.objectives.online import ScoredRound
from diffalign.online.advantages import pair_indices, preferences_from_pairs, win_rates
from diffalign.online.sampling import SamplerSettings, Trajectory, sample_trajectory, sampling_grid
from diffalign.online.settings import check_online, round_layout, trained_steps
from diffalign.rewards.base import PairwiseRewardModel, build_reward, is_pairwise

logger = get_logger(__name__)
ROUNDS_FILE = "online_rounds.jsonl"


def seeded(*parts: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of integers (mixed so that nearby tuples give unrelated streams)."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2 ** 61 - 1)
    return torch.Generator().manual_seed(value)


@dataclass(frozen=True)
class WorkItem:
    """One micro-step of online training: round, inner epoch, position in that epoch's batch order, trained slot."""

    round: int
    epoch: int
    position: int
    slot: int


@dataclass
class Round:
    """One round's samples on this process (n images)."""

    index: int
    prompts: list[str]  # (n,)
    cond: dict[str, torch.Tensor]  # per image, n rows, in the weight dtype
    uncond: dict[str, torch.Tensor] | None  # the negative prompt's, n rows; None without CFG
    trajectory: Trajectory
    advantages: torch.Tensor  # (n,): GRPO's advantages, or NFT's optimality probabilities
    metrics: dict[str, float] = field(default_factory=dict)  # logged once, with the round's first micro-step
    orders: dict[int, list[int]] = field(default_factory=dict)  # inner epoch -> sampling batches in training order
    steps: dict[int, torch.Tensor] = field(default_factory=dict)  # inner epoch -> (n, J) trained step indices

    def pop_metrics(self) -> dict[str, float]:
        metrics, self.metrics = self.metrics, {}
        return metrics


class OnlineRounds:
    """This process's share of every round, and the micro-step schedule over it.

    Raises ``ConfigError`` (before any work) for sizes that do not divide over the processes and micro-batches,
    checkpoints that would fall inside a round, a pairwise reward where a scalar one is needed (or the reverse),
    and an empty prompt source.
    """

    def __init__(self, cfg, accelerator, components, objective, params, weight_dtype: torch.dtype,
                 output_dir: Path):
        online, train = cfg.online, cfg.train
        self.cfg, self.accelerator, self.components, self.params = cfg, accelerator, components, params
        self.family, self.weight_dtype, self.output_dir = components.family, weight_dtype, output_dir
        self.objective = objective
        self.rank, self.processes = accelerator.process_index, accelerator.num_processes
        self.group_size, self.prompts_per_round = online.group_size, online.prompts_per_round
        self.batch_size, self.seed = train.batch_size, train.seed
        self.per_process, self.batches_per_epoch, self.updates_per_round = round_layout(
            online, train.batch_size, train.gradient_accumulation_steps, self.processes)
        self.trained = trained_steps(online)
        self.inner_epochs = online.inner_epochs
        self.micro_steps_per_round = online.inner_epochs * self.batches_per_epoch * self.trained
        window = tuple(online.sde_window) if online.sde_window else None
        self.sampler = SamplerSettings(online.sample_steps, online.guidance_scale, online.eta, online.noise_level,
                                       window)
        self.grid = sampling_grid(self.family, components, online.sample_steps)
        if self.family.true_cfg and not self.family.embedded_guidance(components) and online.guidance_scale != 1.0:
            raise ConfigError(f"online.guidance_scale={online.guidance_scale}: FLUX.1-schnell samples without CFG "
                              "(FluxPipeline ignores guidance_scale there), so rounds must too: set "
                              "online.guidance_scale=1")
        self.prompt_list = check_online(cfg, self.processes)
        self.rewards, self.judge = self.build_rewards(online, accelerator.device)
        self.monitors = {name: build_reward(name, weights=online.reward_weights.get(name), device=accelerator.device)
                         for name in online.monitor_rewards}
        if self.judge is not None and self.per_process % self.group_size:
            raise ConfigError(f"a pairwise reward compares the images of a group on one process: make the "
                              f"{self.per_process} images per process a multiple of online.group_size="
                              f"{self.group_size}")
        self.weights = dict(online.rewards)
        self.tracker = params.tracker()
        self.current: Round | None = None
        self.negative = online.negative_prompt
        self.trained_since: float | None = None  # when the last round's training began

    # -- setup ----------------------------------------------------------------------------------------------
    @staticmethod
    def build_rewards(online, device) -> tuple[dict, PairwiseRewardModel | None]:
        """The scalar rewards by name, and the pairwise judge (Pref-GRPO with a pairwise reward model); their
        names and kinds were checked by ``check_online``."""
        pairwise = [name for name in online.rewards if is_pairwise(name)]
        built = {name: build_reward(name, weights=online.reward_weights.get(name), device=device)
                 for name in online.rewards}
        if pairwise:
            return {}, built[pairwise[0]]
        return built, None

    # -- schedule -------------------------------------------------------------------------------------------
    def work(self, micro_step: int) -> WorkItem:
        round_index, rest = divmod(micro_step, self.micro_steps_per_round)
        epoch, rest = divmod(rest, self.batches_per_epoch * self.trained)
        position, slot = divmod(rest, self.trained)
        return WorkItem(round_index, epoch, position, slot)

    def batches(self, micro_step: int, state: dict | None = None):
        """Work items from ``micro_step`` on; ``state`` is a checkpoint's ``online`` entry."""
        if state is not None and self.tracker is not None:
            self.tracker.load_state_dict(state["tracker"])
        if self.accelerator.is_main_process:
            self.truncate_log(micro_step // self.micro_steps_per_round)
        while True:
            yield self.work(micro_step)
            micro_step += 1

    def state(self) -> dict:
        """What a checkpoint keeps: the running per-prompt statistics (JSON data)."""
        return {"tracker": self.tracker.state_dict() if self.tracker is not None else None}

    def round_prompts(self, index: int) -> list[str]:
        """The P prompts of round ``index`` (the same on every process)."""
        count = len(self.prompt_list)
        prompts, orders = [], {}
        for slot in range(index * self.prompts_per_round, (index + 1) * self.prompts_per_round):
            pass_index, position = divmod(slot, count)
            if pass_index not in orders:
                orders[pass_index] = torch.randperm(count, generator=seeded(self.seed, 17, pass_index))
            prompts.append(self.prompt_list[int(orders[pass_index][position])])
        return prompts

    def rows(self, position: int, round_: Round, epoch: int) -> torch.Tensor:
        """Indices (b,) of the sampling batch trained at ``position`` of ``epoch``."""
        batch = round_.orders[epoch][position]
        return torch.arange(batch * self.batch_size, (batch + 1) * self.batch_size)

    # -- a round --------------------------------------------------------------------------------------------
    def ensure(self, index: int, sampling_model) -> Round:
        """Round ``index`` on this process, sampled now (with ``sampling_model``, a context manager giving the
        model to sample with) unless it is the current one."""
        if self.current is not None and self.current.index == index:
            return self.current
        self.current = None  # free the last round's tensors before sampling the next
        started = time.time()
        training_seconds = started - self.trained_since if self.trained_since is not None else None
        prompts = self.round_prompts(index)
        first = self.rank * self.per_process
        local = [prompts[k // self.group_size] for k in range(first, first + self.per_process)]
        cond, uncond = self.conditioning(local)
        chunks = []
        with sampling_model() as model:
            for batch in range(self.per_process // self.batch_size):
                rows = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
                chunks.append(sample_trajectory(
                    self.family, self.components, model, self.grid, self.sampler,
                    {k: v[rows] for k, v in cond.items()},
                    {k: v[rows] for k, v in uncond.items()} if uncond is not None else None,
                    [seeded(self.seed, index, first + k) for k in range(rows.start, rows.stop)],
                    self.accelerator.device, self.weight_dtype))
        trajectory = Trajectory(torch.cat([c.latents for c in chunks]), torch.cat([c.log_probs for c in chunks]))
        sampled = time.time()
        scores, preferences = self.score(trajectory, local)
        scored = time.time()
        advantages, metrics = self.advantages(prompts, scores, preferences)
        metrics.update(seconds_sampling=sampled - started, seconds_scoring=scored - sampled)
        if training_seconds is not None:
            metrics["seconds_training"] = training_seconds
        round_ = Round(index, local, cond, uncond, trajectory, advantages[first:first + self.per_process], metrics)
        self.schedule(round_)
        self.log_round(index, metrics)
        self.current = round_
        self.trained_since = time.time()
        return round_

    def conditioning(self, prompts: list[str]) -> tuple[dict, dict | None]:
        """Per-image conditioning (n rows) for ``prompts`` and, under CFG, for the negative prompt."""
        family, components, device = self.family, self.components, self.accelerator.device
        position = {prompt: i for i, prompt in enumerate(dict.fromkeys(prompts))}
        encoded = family.encode_prompts(components, list(position))
        index = torch.tensor([position[p] for p in prompts])
        cond = {k: v[index.to(v.device)] for k, v in encoded.items()}
        uncond = None
        if family.embedded_guidance(components):  # FLUX.1-dev: the value goes in, and there is no CFG branch
            cond["guidance"] = torch.full((len(prompts),), float(self.sampler.guidance_scale), device=device)
        elif self.sampler.guidance_scale != 1.0:
            negative = family.encode_prompts(components, [self.negative])
            uncond = {k: v.expand(len(prompts), *v.shape[1:]) for k, v in negative.items()}
        if family.needs_image_sizes:  # SDXL: generated images are uncropped squares at the training resolution
            size = components.resolution
            sizes = torch.tensor([[size, size, 0, 0]], device=device).expand(len(prompts), 1, 4)
            extra = {k: v.flatten(0, 1) for k, v in family.image_cond(components, sizes).items()}
            cond.update(extra)
            if uncond is not None:
                uncond.update(extra)

        def cast(values):
            return {k: v.to(device, self.weight_dtype).contiguous() for k, v in values.items()}

        return cast(cond), cast(uncond) if uncond is not None else None

    @torch.no_grad()
    def score(self, trajectory: Trajectory, prompts: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Each reward's and monitor's (n,) scores of this process's samples, decoded in sampling batches; and
        (groups, G, G) in-group preferences when a pairwise judge is used (this process's whole groups)."""
        scores: dict[str, list] = {name: [] for name in (*self.rewards, *self.monitors)}
        images: list[Image.Image] = []
        for start in range(0, len(prompts), self.batch_size):
            pixels = self.family.decode_latents(self.components, trajectory.samples[start:start + self.batch_size])
            batch = to_pil(pixels)
            batch_prompts = prompts[start:start + self.batch_size]
            for name, reward in (*self.rewards.items(), *self.monitors.items()):
                scores[name].append(reward.score(batch, batch_prompts).float())
            if self.judge is not None:
                images.extend(batch)
        result = {name: torch.cat(values) for name, values in scores.items()}
        if self.judge is None:
            return result, None
        first, second = pair_indices(self.group_size)
        groups = []
        for start in range(0, len(prompts), self.group_size):
            members = images[start:start + self.group_size]
            won = self.judge.prefer([members[i] for i in first.tolist()], [members[j] for j in second.tolist()],
                                    [prompts[start]] * len(first))
            groups.append(won.float())
        return result, preferences_from_pairs(torch.stack(groups), self.group_size)

    def advantages(self, prompts: list[str], scores: dict[str, torch.Tensor],
                   preferences: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        """Gather the round's scores from every process, then the objective's advantages (M,) and the round's
        metrics (every reward's mean, the advantage spread, the share of groups with no reward spread)."""
        device = self.accelerator.device
        gathered = {name: self.accelerator.gather(values.to(device)).cpu().double() for name, values in scores.items()}
        metrics = {f"reward_{name}": float(values.mean()) for name, values in gathered.items()}
        if self.judge is not None:  # no scalar reward: the spread of the win rates tells whether the judge ties
            preferences = self.accelerator.gather(preferences.to(device)).cpu()
            total = torch.zeros(self.prompts_per_round * self.group_size, dtype=torch.float64)
            wins = win_rates(preferences).double()
            metrics["win_rate_std"] = float(wins.std(unbiased=False))
            spread = wins.view(-1, self.group_size).std(dim=1, unbiased=False)
            metrics["zero_std_groups"] = float((spread < 1e-8).double().mean())
        else:
            total = neutralise_nonfinite(sum(self.weights[name] * gathered[name] for name in self.rewards),
                                         self.group_size, metrics)
            metrics["reward"] = float(total.mean())
            metrics["reward_std"] = float(total.std(unbiased=False))
            spread = total.view(-1, self.group_size).std(dim=1, unbiased=False)
            metrics["zero_std_groups"] = float((spread < 1e-8).double().mean())
        per_image = [p for p in prompts for _ in range(self.group_size)]
        advantages = self.params.advantages(ScoredRound(total, per_image, self.group_size, preferences), self.tracker)
        name = "optimality" if self.objective.step == "nft" else "advantage"  # NFT's r in [0, 1]
        metrics[f"{name}_std"] = float(advantages.std(unbiased=False))
        metrics[f"{name}_abs_mean"] = float(advantages.abs().mean())
        return advantages.to(device), metrics

    def schedule(self, round_: Round) -> None:
        """Each inner epoch's order of sampling batches, and each sample's trained steps (a random J of its
        stochastic steps), from generators seeded by (seed, round, epoch[, image])."""
        stochastic = self.sampler.stochastic().nonzero().flatten()
        if self.objective.step == "nft":  # NFT trains at the grid's timesteps, whatever the sampler's noise
            stochastic = torch.arange(self.grid.steps)
        for epoch in range(self.inner_epochs):
            order = torch.randperm(self.batches_per_epoch, generator=seeded(self.seed, round_.index, epoch, 7))
            round_.orders[epoch] = order.tolist()
            first = self.rank * self.per_process
            round_.steps[epoch] = torch.stack([
                stochastic[torch.randperm(len(stochastic), generator=seeded(self.seed, round_.index, epoch, 11, k))]
                [:self.trained] for k in range(first, first + self.per_process)])

    # -- the run folder -------------------------------------------------------------------------------------
    def log_round(self, index: int, metrics: dict[str, float]) -> None:
        """The main process appends the round to ``online_rounds.jsonl`` and redraws ``reward_curve.png``."""
        if not self.accelerator.is_main_process:
            return
        from diffalign.online.curves import reward_curve  # matplotlib: imported when drawn

        self.output_dir.mkdir(parents=True, exist_ok=True)
        record = {"round": index, "step": index * self.updates_per_round, "monitors": list(self.monitors), **metrics}
        with open(self.output_dir / ROUNDS_FILE, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
        with contextlib.suppress(OSError):  # a full disk must not stop training over a chart
            reward_curve(self.output_dir / ROUNDS_FILE, self.output_dir / "reward_curve.png")

    def truncate_log(self, first_round: int) -> None:
        """Keep the rounds before ``first_round`` (a resumed run samples the later ones again)."""
        path = self.output_dir / ROUNDS_FILE
        if not path.is_file():
            return
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["round"] < first_round]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def summary(self) -> dict:
        """For ``run_info.json``: the layout, and the first and last rounds' reward means."""
        path = self.output_dir / ROUNDS_FILE
        rounds = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        keys = [k for k in (rounds[0] if rounds else {}) if k.startswith("reward")]
        return {"rounds": len(rounds), "images_per_round": self.prompts_per_round * self.group_size,
                "optimizer_steps_per_round": self.updates_per_round,
                "first_round": {k: rounds[0][k] for k in keys} if rounds else {},
                "last_round": {k: rounds[-1][k] for k in keys} if rounds else {},
                "seconds": {part: round(sum(r.get(f"seconds_{part}", 0.0) for r in rounds), 2)
                            for part in ("sampling", "scoring", "training")}}


def neutralise_nonfinite(total: torch.Tensor, group_size: int, metrics: dict) -> torch.Tensor:
    """An image whose reward is NaN or inf (a reward model's failure) gets its group's mean of the finite rewards
    (0 when none is), so it carries no advantage instead of poisoning the round; counted in
    ``metrics["nonfinite_rewards"]`` and logged."""
    bad = ~torch.isfinite(total)
    metrics["nonfinite_rewards"] = float(bad.sum())
    if not bad.any():
        return total
    grouped, bad_groups = total.clone().view(-1, group_size), bad.view(-1, group_size)
    finite = torch.where(bad_groups, torch.zeros_like(grouped), grouped)
    counts = (~bad_groups).sum(dim=1, keepdim=True)
    means = finite.sum(dim=1, keepdim=True) / counts.clamp(min=1)
    grouped = torch.where(bad_groups, means.expand_as(grouped), grouped)
    logger.warning(f"online round: {int(bad.sum())} of {total.numel()} images got a non-finite reward; they count "
                   "as their group's mean (no advantage)")
    return grouped.flatten()


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] -> N RGB images."""
    array = ((pixels.float().cpu() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(image) for image in array]
