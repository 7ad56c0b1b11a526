"""Learned completion: a skill adapter's small head that says when the skill's goal is reached (docs/completion.md).

On a robot nothing tells the controller that the table is clean. A skill adapter can therefore carry a completion
head: a tiny MLP on the policy's own observation features (``policy.features(batch) -> (B, F)``, the protocol hook
of ``robolora.policy``) computed with the skill active on the frozen base, and/or on a tiny image branch over the
policy's own camera (a few convolution maps, max- and mean-pooled: "is a dirt spot anywhere in view", which the
pooled features cannot tell), giving the logit of "the skill's goal is reached". The sequencer that reads it switches to the next skill once the probability stays at or above
``threshold`` for ``k`` consecutive ticks, and gives up after ``timeout_ticks``.

Training is behaviour cloning from the skill's demos. A frame is positive from the step whose action reached the
goal on (``success[t]`` is the env's success after action t), plus optionally the ``lead`` frames before it. Demos
end at success, so they are collected with ``post_success`` (``robolora collect --post-success 20``): the expert
runs on after success and its frames are the positives. The loss is class-balanced BCE, validation episodes are
held out whole, and the threshold is chosen on them for the switching rule itself: the middle of the widest range
of thresholds with the fewest validation episodes that would switch early (k ticks at or above the threshold before
success) or never. The head counts against the skill's budget: adapter + head <= 2% of the base's parameters.
Demo frames flatter a head whose positives look unlike what the policy shows after success: check it in closed
loop (docs/completion.md measures the shipped ones: a feature-only wipe head did not transfer, its image head does).

Files: ``completion.safetensors`` in the adapter folder (``fc1.weight`` (H, I), ``fc1.bias`` (H,), ``fc2.weight``
(1, H), ``fc2.bias`` (1,); a linear head has only ``fc2``, (1, I); I = F features + 2C pooled maps; with an image
branch also ``image.weight`` (C, 3, k, k) and ``image.bias`` (C,)) and a ``"completion"`` entry in ``adapter.json``
(:meth:`Completion.to_dict`; ``"image"`` names the camera, C and k); ``robolora.adapters`` reads and writes them
with the adapter. An entry without ``"image"`` is the feature-only head, unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from robolora.config import check_ints
from robolora.data import load_manifest
from robolora.policy import check_policy, policy_device

if TYPE_CHECKING:
    from robolora.adapters import SkillAdapter

logger = logging.getLogger(__name__)

FILE = "completion.safetensors"
BUDGET_PERCENT = 2.0  # adapter + head, in percent of the base's parameters (issue 19)
THRESHOLDS = tuple(round(0.5 + 0.01 * i, 2) for i in range(50))  # 0.50 ... 0.99, candidates on validation
FEATURE_BATCH = 256
IMAGE_POOLS = ("max", "mean")  # how the image branch's maps are summarised, in this order
IMAGE_MEAN_SCALE = 64.0  # the mean pool reads per 1/64 of the image: a 64-pixel blob of activation 1 reads 1 at 64 px


@dataclass(frozen=True)
class CompletionConfig:
    """How a completion head is trained and how its signal is read.

    Attributes:
        hidden: width of the head's one hidden layer (GELU); 0 makes it linear (F + 1 parameters).
        features: read the policy's features (``policy.features``); False leaves only the image branch.
        image_channels: C of the image branch on the policy's camera (0: none): a C-channel convolution + ReLU
            over the raw image, max- and mean-pooled into 2C inputs (:class:`CompletionHead`).
        image_kernel: the branch's kernel size (odd).
        image_key: the observation the branch reads; None: the policy's first camera.
        lead: frames before the first success also labelled positive.
        steps: optimizer steps (AdamW, cosine decay), each on ``batch_size`` frames drawn uniformly.
        batch_size: frames per step.
        lr: peak learning rate.
        weight_decay: AdamW weight decay of the weight matrices.
        val_fraction: share of the demo episodes held out (whole) to choose the threshold and report on.
        k: consecutive ticks at or above the threshold before the sequencer switches.
        timeout_ticks: ticks after which the sequencer gives up on the skill; None: 1.5 x the longest demo's
            ticks to success, plus the k - 1 ticks the rule needs to confirm.
        seed: seeds the episode split, the initialisation and the batches.
    """

    hidden: int = 8
    features: bool = True
    image_channels: int = 0
    image_kernel: int = 3
    image_key: str | None = None
    lead: int = 0
    steps: int = 2000
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-2
    val_fraction: float = 0.25
    k: int = 3
    timeout_ticks: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_ints("CompletionConfig", self, (("hidden", 0), ("image_channels", 0), ("image_kernel", 1),
                                              ("lead", 0), ("steps", 1), ("batch_size", 1), ("k", 1),
                                              ("timeout_ticks", 1)), optional=("timeout_ticks",))
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise ValueError(f"CompletionConfig: lr={self.lr!r} must be > 0 and weight_decay={self.weight_decay!r} "
                             ">= 0")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"CompletionConfig.val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.image_kernel % 2 == 0:
            raise ValueError(f"CompletionConfig.image_kernel must be odd, got {self.image_kernel}")
        if not self.features and not self.image_channels:
            raise ValueError("CompletionConfig: a head without the policy's features needs an image branch "
                             "(image_channels >= 1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class CompletionHead(nn.Module):
    """The logit (B,) of "the skill's goal is reached" from the policy's features (B, F) and, optionally, its camera.

    Inputs: the features (none when ``feature_dim`` is 0) and, with ``image_channels`` C >= 1, a tiny image branch
    on the raw camera observation ``image_key`` ((B, H, W, 3), 0..255): a C-channel ``image_kernel`` x
    ``image_kernel`` convolution + ReLU, each map max-pooled and mean-pooled (x ``IMAGE_MEAN_SCALE``) over the
    image: 2C numbers that say whether, and how much of, a local pattern (a dirt spot) is anywhere in view, which the
    pooled transformer features do not (docs/completion.md). Then Linear-GELU-Linear, or one Linear, on the
    concatenation [features, max pools, mean pools]. Without the branch this is the original feature-only head,
    file for file.
    """

    def __init__(self, feature_dim: int, hidden: int = 8, image_channels: int = 0, image_kernel: int = 3,
                 image_key: str | None = None) -> None:
        super().__init__()
        self.feature_dim, self.hidden = int(feature_dim), int(hidden)
        self.image_channels, self.image_kernel, self.image_key = int(image_channels), int(image_kernel), image_key
        if self.feature_dim < 0 or self.image_channels < 0 or self.feature_dim + self.image_channels == 0:
            raise ValueError(f"a completion head reads features (feature_dim={feature_dim}) or an image "
                             f"(image_channels={image_channels}); give at least one")
        if self.image_channels and (not image_key or self.image_kernel < 1 or self.image_kernel % 2 == 0):
            raise ValueError(f"an image branch needs the camera's observation key (got {image_key!r}) and an odd "
                             f"kernel size (got {image_kernel})")
        self.image = (nn.Conv2d(3, self.image_channels, self.image_kernel, padding=self.image_kernel // 2)
                      if self.image_channels else None)
        self.fc1 = nn.Linear(self.input_dim, hidden) if hidden else None
        self.fc2 = nn.Linear(hidden or self.input_dim, 1)

    @property
    def input_dim(self) -> int:
        """The width of the first linear layer: F features + 2C pooled image maps."""
        return self.feature_dim + len(IMAGE_POOLS) * self.image_channels

    @property
    def reads_features(self) -> bool:
        return self.feature_dim > 0

    @torch.no_grad()
    def center_image_branch(self, images: torch.Tensor, quantile: float = 0.0) -> None:
        """Set each map's bias so that it is active on the top ``1 - quantile`` of the pixels of ``images``
        (N, H, W, 3); by default on all of them, so every pixel passes a gradient at first: a randomly initialised
        map can be negative on every pixel of a scene and would then never learn (dead ReLU). On a gray scene with
        small spots, 3 of 3 seeds learned the spots this way, 2 of 3 from the median, 1 of 3 from the 0.9 quantile."""
        maps = self.image(images.permute(0, 3, 1, 2).float() / 255.0)  # (N, C, H, W), before the ReLU
        self.image.bias -= maps.transpose(0, 1).flatten(1).quantile(quantile, dim=1)

    def image_summary(self, image: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) camera image, 0..255 (uint8 or float) -> (B, 2C): each map's max, then each map's mean."""
        maps = F.relu(self.image(image.permute(0, 3, 1, 2).float() / 255.0)).flatten(2)  # (B, C, H * W)
        # The mean is accumulated in float64: a map's mean over 4,096 pixels carries the signal in its last digits
        # (a few dirt pixels against the background), and onnxruntime's float32 ReduceMean was 5e-6 off relative
        # (6e-4 absolute, 4e-4 in the probability on real wipe frames); in float64 both runtimes agree to 5e-6.
        mean = maps.double().mean(-1).float()
        return torch.cat([maps.amax(-1), mean * IMAGE_MEAN_SCALE], -1)  # (B, 2C)

    def forward(self, features: torch.Tensor | None = None, image: torch.Tensor | None = None) -> torch.Tensor:
        return self.classify(self.inputs(features, image))  # (B,)

    def inputs(self, features: torch.Tensor | None = None, image: torch.Tensor | None = None) -> torch.Tensor:
        """What the first linear layer reads (B, input_dim): the features, then the image branch's pooled maps."""
        parts = []
        if self.feature_dim:
            if features is None:
                raise ValueError("this completion head reads the policy's features; pass them")
            parts.append(features.float())  # (B, F)
        if self.image is not None:
            if image is None:
                raise ValueError(f"this completion head reads the camera image {self.image_key!r}; pass it")
            parts.append(self.image_summary(image))  # (B, 2C)
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)  # (B, input_dim)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, input_dim) -> logit (B,)."""
        if self.fc1 is not None:
            x = F.gelu(self.fc1(x))  # (B, H)
        return self.fc2(x).squeeze(-1)  # (B,)

    def probability(self, features: torch.Tensor | None = None, image: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self(features, image))  # (B,)

    def read(self, policy: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The probability (B,) on a policy batch, as the policy stands (its skill active): what the exported
        graph's ``done`` output and the rollout compute."""
        features = policy.features(batch) if self.feature_dim else None
        return self.probability(features, batch[self.image_key] if self.image is not None else None)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def sizes(self) -> list[int]:
        return [self.input_dim, *([self.hidden] if self.hidden else []), 1]

    def image_entry(self) -> dict[str, Any] | None:
        """adapter.json's "completion" "image": what the branch reads and how it pools; None without one."""
        if self.image is None:
            return None
        return {"key": self.image_key, "channels": self.image_channels, "kernel": self.image_kernel,
                "pools": list(IMAGE_POOLS), "mean_scale": IMAGE_MEAN_SCALE}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The tensor shapes of this head's file, by name."""
        return {name: tuple(p.shape) for name, p in self.named_parameters()}

    @torch.no_grad()
    def fold_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Make a head trained on standardised inputs ((x - mean) / std, (input_dim,) each: the features, then the
        pooled image maps) read raw inputs: W' = W / std, b' = b - W' mean, in float64 (no normalisation parameters
        to store or export)."""
        layer = self.fc1 if self.fc1 is not None else self.fc2
        w = layer.weight.double() / std.double()
        layer.bias.copy_((layer.bias.double() - w @ mean.double()).float())
        layer.weight.copy_(w.float())


@dataclass
class Completion:
    """A trained head and how its signal is read: switch after ``k`` ticks at or above ``threshold``, give up after
    ``timeout_ticks``. ``info`` holds the rest of adapter.json's entry (validation precision and recall, labels,
    data, training)."""

    head: CompletionHead
    threshold: float
    k: int = 3
    timeout_ticks: int = 300
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, (int, float)) and 0.0 < self.threshold < 1.0):
            raise ValueError(f"completion threshold must be a probability in (0, 1), got {self.threshold!r}")
        check_ints("completion", self, (("k", 1), ("timeout_ticks", 1)))
        self.threshold = float(self.threshold)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.head.state_dict().items()}

    def to_dict(self) -> dict[str, Any]:
        """adapter.json's "completion" entry ("image" only for a head with an image branch)."""
        image = self.head.image_entry()
        return {"file": FILE, "sizes": self.head.sizes, "parameters": self.head.num_parameters,
                **({"image": image} if image else {}), "threshold": self.threshold, "k": self.k,
                "timeout_ticks": self.timeout_ticks, **self.info}

    @classmethod
    def from_files(cls, entry: Any, tensors: Mapping[str, torch.Tensor], where: Path) -> Completion:
        """A completion from adapter.json's entry and the tensors of ``completion.safetensors``, validated (sizes,
        shapes, finite values); ``where`` names the folder in errors."""
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: adapter.json's \"completion\" must be an object, got {entry!r}; the file is "
                             "corrupt or hand-edited, retrain the head (robolora train-completion)")
        try:
            sizes = [int(s) for s in entry["sizes"]]
            threshold, k, timeout = entry["threshold"], entry["k"], entry["timeout_ticks"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: adapter.json's \"completion\" lacks or has an invalid field ({e}); retrain "
                             "the head (robolora train-completion)") from e
        if len(sizes) not in (2, 3) or sizes[-1] != 1 or min(sizes) < 1:
            raise ValueError(f"{where}: completion sizes {sizes} must be [F, 1] or [F, H, 1]")
        image = entry.get("image")
        try:
            channels = 0 if image is None else int(image["channels"])
            kernel, key = (3, None) if image is None else (int(image["kernel"]), str(image["key"]))
            if image is not None and (list(image.get("pools", IMAGE_POOLS)) != list(IMAGE_POOLS)
                                      or float(image.get("mean_scale", IMAGE_MEAN_SCALE)) != IMAGE_MEAN_SCALE):
                raise ValueError(f"pools {image.get('pools')} / mean_scale {image.get('mean_scale')} are not this "
                                 f"version's {list(IMAGE_POOLS)} / {IMAGE_MEAN_SCALE}")
            head = CompletionHead(sizes[0] - len(IMAGE_POOLS) * channels, sizes[1] if len(sizes) == 3 else 0,
                                  channels, kernel, key)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: adapter.json's completion \"image\" {image!r} does not fit sizes {sizes} "
                             f"({e}); retrain the head (robolora train-completion)") from e
        want = head.shapes()
        got = {name: tuple(t.shape) for name, t in tensors.items()}
        if got != want:
            raise ValueError(f"{where / FILE} holds {got} but adapter.json's sizes {sizes} need {want}; the files do "
                             "not belong together, retrain the head (robolora train-completion)")
        bad = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
        if bad:
            raise ValueError(f"{where / FILE}: {bad} hold NaN or Inf; this completion head is unusable, retrain it")
        head.load_state_dict({name: t.float() for name, t in tensors.items()})
        info = {key: value for key, value in entry.items()
                if key not in ("file", "sizes", "parameters", "image", "threshold", "k", "timeout_ticks")}
        try:
            return cls(head.eval().requires_grad_(False), threshold, k, timeout, info)
        except ValueError as e:
            raise ValueError(f"{where}: {e}; fix adapter.json's \"completion\" or retrain the head") from e


# ------------------------------------------------------------------------------------------------- budget


def check_budget(adapter_parameters: int, head: CompletionHead, base_parameters: int,
                 budget_percent: float = BUDGET_PERCENT) -> dict[str, float]:
    """Raise ValueError unless adapter + head <= ``budget_percent`` of the base; returns the totals.
    ``adapter_parameters`` counts everything else the skill adds (LoRA, token, residual head)."""
    total = adapter_parameters + head.num_parameters
    budget = base_parameters * budget_percent / 100
    if total > budget:
        branch = 0 if head.image is None else sum(p.numel() for p in head.image.parameters())
        room = math.floor(budget) - adapter_parameters - branch
        widest = (room - 1) // (head.input_dim + 2)  # hidden H costs H * (inputs + 2) + 1
        fix = (f"use a hidden width <= {widest} (--hidden {widest})" if widest >= 1 else
               "use a linear head (--hidden 0)" if room >= head.input_dim + 1 else
               "the adapter alone leaves no room: train a smaller adapter")
        raise ValueError(f"the completion head ({head.num_parameters} parameters, sizes {head.sizes}) and the adapter "
                         f"({adapter_parameters}) hold {total} parameters, {100 * total / base_parameters:.3f}% of "
                         f"the base's {base_parameters}: over the {budget_percent:g}% budget ({math.floor(budget)}); "
                         f"{fix}")
    return {"completion/head_parameters": head.num_parameters, "completion/adapter_parameters": adapter_parameters,
            "completion/total_parameters": total, "completion/percent_of_base": 100 * total / base_parameters}


# ------------------------------------------------------------------------------------------------- data


def completion_labels(success: np.ndarray, lead: int = 0) -> np.ndarray:
    """Per-frame labels (T,) float32 of one episode: 1 from the first step whose action reached the goal on, and
    the ``lead`` frames before it; all 0 for an episode that never succeeds."""
    success = np.asarray(success).astype(bool).reshape(-1)
    labels = np.zeros(len(success), dtype=np.float32)
    if success.any():
        labels[max(int(np.argmax(success)) - lead, 0):] = 1.0
    return labels


@dataclass(frozen=True)
class EpisodeFeatures:
    """The features (T, F) of every frame of one demo episode (F = 0 when the head reads none), its per-step
    ``success`` (T,) and, for a head with an image branch, the camera frames ``images`` (T, H, W, 3) uint8."""

    features: torch.Tensor
    success: np.ndarray
    images: torch.Tensor | None = None

    def probabilities(self, head: CompletionHead) -> np.ndarray:
        """``head``'s probability on every frame (T,), in batches."""
        with torch.no_grad():
            return torch.cat([head.probability(self.features[i:i + FEATURE_BATCH],
                                               None if self.images is None else self.images[i:i + FEATURE_BATCH])
                              for i in range(0, len(self.success), FEATURE_BATCH)]).numpy()

    @property
    def ticks_to_success(self) -> int | None:
        return int(np.argmax(self.success)) + 1 if self.success.any() else None


@torch.no_grad()
def episode_features(policy: nn.Module, data_dirs: Sequence[str | Path],
                     on_episode: Callable[[int], None] | None = None, *, features: bool = True,
                     image_key: str | None = None) -> list[EpisodeFeatures]:
    """``policy.features`` of every frame of every episode in ``data_dirs`` (as the policy stands: activate the
    skill first), in episode order; ``features=False`` skips them ((T, 0)); ``image_key`` also keeps that camera's
    frames (for a head with an image branch)."""
    spec = check_policy(policy, features=features)
    if image_key is not None and image_key not in spec.image_keys:
        raise ValueError(f"image_key={image_key!r} is not one of the policy's cameras {list(spec.image_keys)}")
    device = policy_device(policy)
    episodes = []
    for folder in data_dirs:
        manifest = load_manifest(folder)
        for entry in manifest["episodes"]:
            with safe_open(str(Path(folder) / entry["file"]), framework="pt") as f:
                missing = [k for k in spec.observation if f"obs.{k}" not in f.keys()]
                if missing:
                    raise ValueError(f"{folder}/{entry['file']} lacks {missing}; the policy reads "
                                     f"{list(spec.observation)}: collect the demos with its cameras")
                obs = {k: f.get_tensor(f"obs.{k}") for k in spec.observation}
                success = f.get_tensor("success").numpy().astype(bool)
            chunks = []
            for start in range(0, len(success) if features else 0, FEATURE_BATCH):
                batch = {k: v[start:start + FEATURE_BATCH].to(device) for k, v in obs.items()}
                if spec.task_key is not None:  # ignored under a skill token
                    batch[spec.task_key] = torch.zeros(len(next(iter(batch.values()))), dtype=torch.long,
                                                       device=device)
                chunks.append(policy.features(batch).float().cpu())  # (b, F)
            episodes.append(EpisodeFeatures(torch.cat(chunks) if chunks else torch.zeros(len(success), 0), success,
                                            None if image_key is None else obs[image_key]))
            if on_episode is not None:
                on_episode(len(episodes))
    if not episodes:
        raise ValueError(f"{list(map(str, data_dirs))} hold no episodes; collect demos first (robolora collect)")
    return episodes


# ------------------------------------------------------------------------------------------------- training


def fit_head(episodes: Sequence[EpisodeFeatures], config: CompletionConfig = CompletionConfig(),
             on_step: Callable[[int, dict[str, float]], None] | None = None) -> tuple[Completion, dict[str, float]]:
    """Train a head on the features of demo episodes (some held out), choose its threshold on the held-out ones.

    Returns the :class:`Completion` and its metrics (``completion/val_precision``, ``completion/val_recall``, ...).
    """
    if len(episodes) < 2:
        raise ValueError(f"a completion head needs at least 2 demo episodes (train and validation), got "
                         f"{len(episodes)}")
    g = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(episodes), generator=g).tolist()
    n_val = min(max(1, round(config.val_fraction * len(episodes))), len(episodes) - 1)
    val, train = sorted(order[:n_val]), sorted(order[n_val:])
    labels = [torch.from_numpy(completion_labels(e.success, config.lead)) for e in episodes]
    x = torch.cat([episodes[i].features for i in train])  # (N, F)
    images = torch.cat([episodes[i].images for i in train]) if config.image_channels else None  # (N, H, W, 3)
    if config.image_channels and (images is None or (config.image_key or "") == ""):
        raise ValueError("an image branch needs the episodes' camera frames and CompletionConfig.image_key "
                         "(episode_features(..., image_key=...))")
    if not config.features and x.shape[1]:
        raise ValueError("CompletionConfig(features=False) but the episodes carry features")
    y = torch.cat([labels[i] for i in train])  # (N,)
    positives = float(y.mean())
    if positives in (0.0, 1.0):
        raise ValueError(f"the training episodes hold {'no' if positives == 0 else 'only'} positive frames; a "
                         "completion head needs demos that reach success (collect with --post-success N)")
    if positives < 0.05:
        logger.warning("only %.1f%% of the frames are positive: the demos end at success; collect them with "
                       "`robolora collect --post-success 20` for a better head", 100 * positives)
    mean, std = (x.mean(0), x.std(0).clamp_min(1e-6)) if x.shape[1] else (x.new_zeros(0), x.new_ones(0))
    with torch.random.fork_rng(devices=[]):  # the initialisation is seeded without touching the caller's RNG
        torch.manual_seed(config.seed)
        head = CompletionHead(x.shape[1], config.hidden, config.image_channels, config.image_kernel,
                              config.image_key if config.image_channels else None)
    if images is not None:  # on 64 training frames spread over the set
        head.center_image_branch(images[torch.linspace(0, len(images) - 1, min(64, len(images))).long()])
    _train(head, (x - mean) / std, images, y, positives, config, g, on_step)
    if images is not None:  # the pooled maps were standardised per batch in training: fold the set's statistics
        with torch.no_grad():
            pooled = torch.cat([head.image_summary(images[i:i + FEATURE_BATCH])
                                for i in range(0, len(images), FEATURE_BATCH)])  # (N, 2C)
        mean, std = torch.cat([mean, pooled.mean(0)]), torch.cat([std, pooled.std(0).clamp_min(1e-6)])
    head.fold_normalization(mean, std)
    head.eval().requires_grad_(False)

    probs = [episodes[i].probabilities(head) for i in val]
    threshold, _ = choose_threshold(probs, [labels[i].numpy() for i in val], config.k)
    ticks = [e.ticks_to_success for e in episodes if e.ticks_to_success is not None]
    # the k-tick rule decides k - 1 ticks after the goal at the earliest: a skill that reaches it late still hands over
    timeout = config.timeout_ticks or math.ceil(1.5 * max(ticks)) + config.k - 1
    info = {"features": "policy.features" if head.reads_features else None, "feature_dim": head.feature_dim,
            "labels": {"positive": "frames from the first success step on", "lead": config.lead},
            "train": {**config.to_dict(), "train_episodes": len(train), "positive_share": positives}}
    completion = Completion(head, threshold, config.k, timeout, info)
    completion.info["validation"] = head_metrics(completion, [episodes[i] for i in val])
    metrics = {**{f"completion/val_{k}": v for k, v in completion.info["validation"].items()},
               "completion/threshold": threshold, "completion/train_episodes": len(train),
               "completion/train_positive_share": positives}
    return completion, metrics


@torch.no_grad()
def head_metrics(completion: Completion, episodes: Sequence[EpisodeFeatures]) -> dict[str, float]:
    """How ``completion`` does on demo episodes at its threshold: frame precision and recall (labels with its
    ``lead``), and how its k-tick rule would switch (:func:`switching_metrics`)."""
    lead = completion.info.get("labels", {}).get("lead", 0)
    probs = [e.probabilities(completion.head) for e in episodes]
    labels = [completion_labels(e.success, lead) for e in episodes]
    return {"episodes": len(episodes),
            **frame_metrics(np.concatenate(probs), np.concatenate(labels), completion.threshold),
            **switching_metrics(probs, labels, completion.threshold, completion.k)}


def _train(head: CompletionHead, x: torch.Tensor, images: torch.Tensor | None, y: torch.Tensor, positives: float,
           config: CompletionConfig, g: torch.Generator,
           on_step: Callable[[int, dict[str, float]], None] | None) -> None:
    """Class-balanced BCE on standardised features (and the frames, for an image branch): each class carries half
    the loss, whatever its share."""
    weights = torch.where(y > 0, 0.5 / positives, 0.5 / (1 - positives))  # (N,)
    decay = [p for n, p in head.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in head.named_parameters() if not n.endswith("weight")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps, eta_min=0.05 * config.lr)
    head.train()
    for step in range(config.steps):
        idx = torch.randint(0, len(y), (config.batch_size,), generator=g)
        inputs = x[idx]  # standardised features
        if images is not None:  # the pooled maps, standardised over the batch (their scale moves as the maps learn)
            pooled = head.image_summary(images[idx])
            pooled = (pooled - pooled.mean(0)) / pooled.std(0).clamp_min(1e-6)
            inputs = torch.cat([inputs, pooled], -1)
        logits = head.classify(inputs)
        loss = (F.binary_cross_entropy_with_logits(logits, y[idx], reduction="none") * weights[idx]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(step + 1, {"completion/loss": float(loss.detach())})


def frame_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Frame-level precision and recall of ``probs >= threshold`` against ``labels``, with the counts."""
    predicted, actual = probs >= threshold, labels > 0
    hits = int((predicted & actual).sum())
    return {"precision": hits / max(int(predicted.sum()), 1), "recall": hits / max(int(actual.sum()), 1),
            "frames": int(len(labels)), "positives": int(actual.sum())}


def switch_tick(probs: np.ndarray, threshold: float, k: int) -> int | None:
    """The first tick at which ``probs`` has been at or above ``threshold`` for ``k`` ticks in a row, or None."""
    run = 0
    for t, above in enumerate(probs >= threshold):
        run = run + 1 if above else 0
        if run >= k:
            return t
    return None


def switching_metrics(probs: Sequence[np.ndarray], labels: Sequence[np.ndarray], threshold: float,
                      k: int) -> dict[str, float]:
    """How the k-tick rule would switch on each episode: early (before its first positive frame), never, and the
    mean delay in ticks from the first positive frame to the switch over the others."""
    early = never = 0
    delays = []
    for p, y in zip(probs, labels):
        first = int(np.argmax(y > 0)) if (y > 0).any() else len(y)
        tick = switch_tick(p, threshold, k)
        if tick is None:
            never += 1
        elif tick < first:
            early += 1
        else:
            delays.append(tick - first)
    return {"premature_episodes": early, "missed_episodes": never,
            "mean_delay_ticks": float(np.mean(delays)) if delays else float("nan")}


def choose_threshold(probs: Sequence[np.ndarray], labels: Sequence[np.ndarray], k: int) -> tuple[float, dict]:
    """The middle of the widest run of candidate thresholds (``THRESHOLDS``) with the fewest validation episodes
    switching early or never: the margin from both kinds of error, as closed-loop frames differ from the demos'.
    Returns it and its :func:`switching_metrics`."""
    wrong = []
    for threshold in THRESHOLDS:
        metrics = switching_metrics(probs, labels, threshold, k)
        wrong.append(metrics["premature_episodes"] + metrics["missed_episodes"])
    fewest = min(wrong)
    runs: list[list[int]] = []
    for i, count in enumerate(wrong):
        if count == fewest:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
    widest = max(runs, key=len)
    threshold = THRESHOLDS[widest[len(widest) // 2]]
    return threshold, switching_metrics(probs, labels, threshold, k)


# ------------------------------------------------------------------------------------------------- a skill's head


def train_completion(base: str | Path | nn.Module, adapter: SkillAdapter, data_dirs: Sequence[str | Path],
                     config: CompletionConfig = CompletionConfig(), *, test_dirs: Sequence[str | Path] | None = None,
                     device: str = "cpu", on_episode: Callable[[int], None] | None = None,
                     on_step: Callable[[int, dict[str, float]], None] | None = None) -> tuple[SkillAdapter, dict]:
    """Train ``adapter``'s completion head on ``data_dirs`` with the skill active on the frozen ``base``.

    ``base`` is a checkpoint folder or a plain protocol policy (copied, never modified). The budget is checked
    before any work. ``test_dirs``: more demos, never trained on nor used to choose the threshold, reported as the
    entry's "test". Features are computed on ``device``; the head trains on the CPU. Returns a copy of the adapter
    carrying the head (its LoRA weights and token untouched) and the metrics; save it with
    ``robolora.adapters.save_adapter``.
    """
    # robolora.adapters stores completions through this module, so it is imported here, not at the top
    from robolora.adapters import attach_active
    from robolora.policies import load_policy

    policy = copy.deepcopy(base) if isinstance(base, nn.Module) else load_policy(base)
    policy = policy.to(device).eval()
    spec = check_policy(policy, features=config.features)
    if config.image_channels:
        if not spec.image_keys:
            raise ValueError("an image branch (image_channels >= 1) needs a policy with a camera; it has none")
        config = dataclasses.replace(config, image_key=config.image_key or spec.image_keys[0])
        if config.image_key not in spec.image_keys:
            raise ValueError(f"image_key={config.image_key!r} is not one of the policy's cameras "
                             f"{list(spec.image_keys)}")
    image_key = config.image_key if config.image_channels else None
    base_parameters = sum(p.numel() for p in policy.parameters())
    # the adapter's share: LoRA weights, skill token and its residual action head (robolora.residual), if any
    budget = check_budget(adapter.num_parameters + adapter.residual_parameters,
                          CompletionHead(spec.feature_dim if config.features else 0, config.hidden,
                                         config.image_channels, config.image_kernel, image_key), base_parameters)
    attach_active(policy, adapter)
    policy.requires_grad_(False)
    episodes = episode_features(policy, data_dirs, on_episode, features=config.features, image_key=image_key)
    completion, metrics = fit_head(episodes, config, on_step)
    completion.info["data"] = [str(d) for d in data_dirs]
    if test_dirs:
        done = len(episodes)
        test = episode_features(policy, test_dirs, on_episode and (lambda n: on_episode(done + n)),
                                features=config.features, image_key=image_key)
        completion.info["test"] = {"data": [str(d) for d in test_dirs], **head_metrics(completion, test)}
        metrics.update({f"completion/test_{k}": v for k, v in completion.info["test"].items() if k != "data"})
    completion.info["budget"] = {k.split("/", 1)[1]: v for k, v in budget.items()}
    logger.info("completion head for %s: threshold %.2f, validation precision %.3f recall %.3f", adapter.skill,
                completion.threshold, metrics["completion/val_precision"], metrics["completion/val_recall"])
    return dataclasses.replace(adapter, completion=completion), {**metrics, **budget}
