"""The one behaviour-cloning loop (docs/design.md §5).

Pretraining the base, training a skill adapter and the full-fine-tuning baseline all call :func:`train`; what
differs is only which parameters have ``requires_grad`` (the caller decides: everything, LoRA A/B + skill token,
...). The loop is AdamW with linear warmup and cosine decay, gradient clipping, bf16 autocast on CUDA, DDP when
launched by ``torchrun``, periodic evaluation through a callback, atomic checkpoints of the trainable state (as
safetensors, never pickle) and exact resume, and metrics as JSON lines with slash keys (``train/loss``).

Batches are drawn by a stateless sampler: the global batch of step ``t`` depends only on ``(seed, t)``, so a run
resumed from step ``t`` sees exactly the batches the uninterrupted run would have seen, and ``W`` DDP processes
split among them the very batch one process would draw.

A checkpoint is one safetensors file, its step and config in the header beside the weights, optimizer state and RNG
they belong to, so one rename commits all of it and a kill at any moment leaves the previous checkpoint or the new
one. (Format 1 kept the step in a JSON file written after the tensors; such checkpoints still resume, and one torn
between its two writes is refused.)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset, default_collate

from robolora.atomic import atomic_file

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "train_state.safetensors"
CHECKPOINT_HEADER_KEY = "robolora/train_state"
LEGACY_CHECKPOINT_META = "train_state.json"  # format 1: the step beside the tensors, read only to resume old runs
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one behaviour-cloning run.

    ``batch_size`` is per process. Under ``torchrun`` with ``W`` processes an optimizer step sees a global batch of
    ``W * batch_size`` samples, and the run equals one process with ``batch_size=W * b`` up to float rounding: the
    same samples in the same steps, the same random shifts, the same gradient (each process's loss is weighted by
    its share of the batch's valid action steps before DDP averages). Dropout is the exception: each process draws
    its masks from its own torch RNG, so a policy with ``dropout > 0`` matches one process only in distribution.
    """

    steps: int = 10_000
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    log_every: int = 50
    checkpoint_every: int = 500
    eval_every: int = 0
    augment_shift: int = 0

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "log_every", "checkpoint_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr={self.lr!r}: must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay={self.weight_decay!r}: must be >= 0")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"TrainConfig.warmup_steps={self.warmup_steps!r}: must be in [0, steps={self.steps})")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio={self.min_lr_ratio!r}: must be in [0, 1]")
        if self.grad_clip < 0:
            raise ValueError(f"TrainConfig.grad_clip={self.grad_clip!r}: must be >= 0 (0 disables clipping)")
        if self.eval_every < 0:
            raise ValueError(f"TrainConfig.eval_every={self.eval_every!r}: must be >= 0 (0 disables evaluation)")
        if not 0 <= self.augment_shift <= 16:
            raise ValueError(f"TrainConfig.augment_shift={self.augment_shift!r}: must be in [0, 16] pixels")
        resolve_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cuda`` without a GPU is an error that says so."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device={device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(device)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Norm gains, biases, embeddings and skill tokens are not decayed: AdamW's decay would pull them to zero
    # (docs/design.md §9.3: decay even changes rows of a shared table that receive no gradient).
    return param.ndim < 2 or "embed" in name or "token" in name or "pos" in name


def build_optimizer(named: list[tuple[str, nn.Parameter]], config: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in named if not _no_decay(n, p)]
    no_decay = [p for n, p in named if _no_decay(n, p)]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=(0.9, 0.999))


def random_shift(images: torch.Tensor, pad: int, offsets: torch.Tensor) -> torch.Tensor:
    """DrQ random shift (Kostrikov et al. 2020): replicate-pad by ``pad`` pixels, crop back at ``offsets`` (B, 2),
    each row ``(dx, dy)`` in ``[0, 2 * pad]`` (``(pad, pad)`` leaves an image unchanged); see
    :meth:`BatchSampler.shift_offsets`."""
    b, h, w, c = images.shape  # (B, H, W, 3) uint8
    padded = torch.nn.functional.pad(images.permute(0, 3, 1, 2).float(), (pad,) * 4, mode="replicate")
    dx, dy = offsets[:, 0], offsets[:, 1]  # (B,)
    rows = (dy[:, None] + torch.arange(h)[None]).to(images.device)  # (B, H)
    cols = (dx[:, None] + torch.arange(w)[None]).to(images.device)  # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, 3)
    return out.to(images.dtype)


class BatchSampler:
    """Stateless batch sampler: the global batch of step ``t`` depends only on (seed, t).

    The global batch holds ``batch_size * world_size`` samples; process ``rank`` takes its contiguous share of
    ``batch_size``, so ``world_size`` processes train on exactly the batch one process with the global size would.
    ``weights`` (one per sample) draws with replacement in proportion, e.g. 1/len(task) to balance tasks by
    samples; ``None`` draws uniformly.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 weights: torch.Tensor | None = None):
        if n < 1:
            raise ValueError("the training dataset is empty: collect demos first (robolora collect)")
        if weights is not None and weights.shape != (n,):
            raise ValueError(f"sample weights have shape {tuple(weights.shape)}, expected ({n},)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside the world of {world_size} processes")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.global_batch_size = batch_size * world_size
        self.share = slice(rank * batch_size, (rank + 1) * batch_size)
        self.weights = None if weights is None else weights.double() / weights.double().sum()

    def generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) % (2**63))

    def indices(self, step: int) -> list[int]:
        g = self.generator(step)
        if self.weights is None:
            drawn = torch.randint(0, self.n, (self.global_batch_size,), generator=g)
        else:
            drawn = torch.multinomial(self.weights, self.global_batch_size, replacement=True, generator=g)
        return drawn[self.share].tolist()

    def shift_offsets(self, step: int, pad: int, views: int) -> list[torch.Tensor]:
        """:func:`random_shift` offsets (B, 2) of step ``step`` for each of ``views`` cameras, this process's share."""
        g = self.generator(step)
        draws = [[torch.randint(0, 2 * pad + 1, (self.global_batch_size,), generator=g) for _ in "xy"]
                 for _ in range(views)]
        return [torch.stack([dx, dy], 1)[self.share] for dx, dy in draws]


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _save_checkpoint(out_dir: Path, step: int, named: list[tuple[str, nn.Parameter]],
                     optimizer: torch.optim.AdamW, config: TrainConfig) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, param in named:
        tensors[f"param/{name}"] = param.detach().float().cpu().contiguous()
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"optim/{name}/{key}"] = torch.as_tensor(value).detach().float().cpu().contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    meta = {"step": step, "config": config.to_dict(), "params": [n for n, _ in named], "format": 2}
    with atomic_file(out_dir / CHECKPOINT_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={CHECKPOINT_HEADER_KEY: json.dumps(meta)})
    # A run resumed from a format-1 checkpoint: its JSON now names an older step than the file above.
    (out_dir / LEGACY_CHECKPOINT_META).unlink(missing_ok=True)


def _read_checkpoint(out_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checkpoint's meta (step, config, parameter names) and tensors, refused if the two disagree."""
    path = out_dir / CHECKPOINT_FILE
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if CHECKPOINT_HEADER_KEY in header:
        meta = json.loads(header[CHECKPOINT_HEADER_KEY])
    elif (out_dir / LEGACY_CHECKPOINT_META).exists():
        meta = json.loads((out_dir / LEGACY_CHECKPOINT_META).read_text())
        logger.info("%s is a format-1 checkpoint; the next save rewrites it as one file", path)
    else:
        raise ValueError(f"{path} holds no training step (it was not written by robolora.train); start a fresh "
                         "run in another --out directory")
    saved = sorted(key.split("/", 1)[1] for key in tensors if key.startswith("param/"))
    # AdamW counts its own steps, at most one per training step: more than the meta's step means the tensors are
    # newer than the meta (a format-1 run killed between its two writes).
    optimizer_step = max((int(v) for k, v in tensors.items() if k.startswith("optim/") and k.endswith("/step")),
                         default=0)
    if saved != sorted(meta["params"]) or optimizer_step > meta["step"]:
        raise ValueError(f"cannot resume from {out_dir}: its checkpoint's parts disagree (step {meta['step']} and "
                         f"{len(meta['params'])} parameters in the meta; optimizer at step {optimizer_step} and "
                         f"{len(saved)} parameters in the tensors), as when a run is killed between writing them. "
                         "Start a fresh run in another --out directory")
    return meta, tensors


def _load_checkpoint(out_dir: Path, named: list[tuple[str, nn.Parameter]], optimizer: torch.optim.AdamW) -> int:
    meta, tensors = _read_checkpoint(out_dir)
    names = [n for n, _ in named]
    if meta["params"] != names:
        missing = sorted(set(meta["params"]) ^ set(names))
        raise ValueError(f"cannot resume from {out_dir}: its trainable parameters differ from this run's "
                         f"({missing[:5]}...); resume with the same model, adapter targets and rank, or start "
                         "a fresh run in another --out directory")
    torch.set_rng_state(tensors.pop("rng/torch"))
    with torch.no_grad():
        for name, param in named:
            saved = tensors[f"param/{name}"]
            if saved.shape != param.shape:
                raise ValueError(f"cannot resume: {name} has shape {tuple(saved.shape)} in the checkpoint, "
                                 f"{tuple(param.shape)} in the model")
            param.copy_(saved.to(param.dtype))
            state = {key.rsplit("/", 1)[1]: value.to(param.device)
                     for key, value in tensors.items() if key.startswith(f"optim/{name}/")}
            if state:
                state["step"] = state["step"].cpu()
                state["exp_avg"] = state["exp_avg"].to(param.dtype)
                state["exp_avg_sq"] = state["exp_avg_sq"].to(param.dtype)
                optimizer.state[param] = state
    return int(meta["step"])


def _rewind_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from, so the log has no duplicated steps."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _join_process_group(config: TrainConfig) -> tuple[int, int, torch.device]:
    """This process's rank, the number of processes and its device; joins the DDP group under ``torchrun``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(config.device)
    if world_size > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    return rank, world_size, device


def _start_step(out: Path, resume: bool, named: list[tuple[str, nn.Parameter]], optimizer: torch.optim.AdamW,
                is_main: bool) -> int:
    """The step to start from: the checkpoint's when resuming from one (its later metric lines dropped), else 0."""
    if resume and (out / CHECKPOINT_FILE).exists():
        start = _load_checkpoint(out, named, optimizer)
        logger.info("resumed from %s at step %d", out, start)
        if is_main:
            _rewind_metrics(out / METRICS_FILE, start)
        return start
    if resume:
        logger.info("no checkpoint in %s: starting from step 0", out)
    elif is_main:
        (out / METRICS_FILE).unlink(missing_ok=True)
    return 0


def _batch_at(step: int, dataset: Dataset, sampler: BatchSampler, augment_shift: int,
              device: torch.device) -> dict[str, torch.Tensor]:
    """This process's share of step ``step``'s batch, randomly shifted when ``augment_shift`` > 0, on ``device``."""
    indices = sampler.indices(step)
    if hasattr(dataset, "get_batch"):
        batch = dataset.get_batch(indices)
    else:
        batch = default_collate([dataset[i] for i in indices])
    if augment_shift:
        views = [key for key in batch if key.startswith("rgb_")]
        for key, offsets in zip(views, sampler.shift_offsets(step, augment_shift, len(views))):
            batch[key] = random_shift(batch[key], augment_shift, offsets)
    return _to_device(batch, device)


def _share_of_valid_steps(batch: Mapping[str, torch.Tensor], world_size: int) -> torch.Tensor:
    """The weight of this process's loss under DDP, which averages the processes' gradients.

    A policy's loss is a mean over its batch's valid (not padded) action steps (``chunk_l1_loss``); weighting
    process ``r`` by ``W * valid_r / valid_all`` makes the average the gradient of the global batch's loss even when
    the shares hold different amounts of padding.
    """
    valid = (~batch["action_is_pad"].bool()).sum().float()
    total = valid.clone()
    dist.all_reduce(total)
    return world_size * valid / total.clamp_min(1.0)


def train(
    policy: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    sample_weights: torch.Tensor | None = None,
    resume: bool = False,
    eval_fn: Callable[[nn.Module, int], dict[str, float]] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Behaviour-clone ``policy`` on ``dataset``; only parameters with ``requires_grad`` are trained.

    ``policy.forward(batch)`` must return ``(loss, metrics)``. Checkpoints of the trainable parameters and the
    optimizer state are written atomically to ``out_dir`` every ``checkpoint_every`` steps and at the end;
    ``resume=True`` continues from the last one. Under ``torchrun`` the processes train as one with the global
    batch (see :class:`TrainConfig`) and the first one writes the checkpoints and metrics. Returns the final metrics
    (``train/loss``, ``train/samples_per_s``, ``train/wall_s`` and the last evaluation's keys).
    """
    out = Path(out_dir)
    rank, world_size, device = _join_process_group(config)
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    policy.to(device)
    named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("no parameter of the policy requires grad: nothing to train (did you freeze everything?)")
    optimizer = build_optimizer(named, config)
    start = _start_step(out, resume, named, optimizer, is_main)
    model: nn.Module = policy
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(policy, device_ids=[device] if device.type == "cuda" else None)
    sampler = BatchSampler(len(dataset), config.batch_size, config.seed, rank, world_size, sample_weights)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    params = [p for _, p in named]
    last: dict[str, float] = {}
    window_start, window_samples = time.perf_counter(), 0
    started = time.perf_counter()
    policy.train()
    for step in range(start, config.steps):
        batch = _batch_at(step, dataset, sampler, config.augment_shift, device)
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast:
            loss, metrics = model(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower --lr or check "
                                     "the data (robolora info DATASET) for NaN")
        optimizer.zero_grad(set_to_none=True)
        (loss if world_size == 1 else loss * _share_of_valid_steps(batch, world_size)).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip else float("inf"))
        optimizer.step()
        window_samples += sampler.global_batch_size
        done = step + 1
        eval_now = eval_fn is not None and config.eval_every and (done % config.eval_every == 0
                                                                  or done == config.steps)
        if eval_now or done % config.log_every == 0 or done == config.steps:
            elapsed = time.perf_counter() - window_start
            last = {**{k: float(v) for k, v in metrics.items()}, "train/loss": float(loss.detach()),
                    "train/lr": lr, "train/grad_norm": float(grad_norm),
                    "train/samples_per_s": window_samples / max(elapsed, 1e-9),
                    "train/wall_s": time.perf_counter() - started}
            window_start, window_samples = time.perf_counter(), 0
            if eval_now:
                policy.eval()
                last.update(eval_fn(policy, done))
                policy.train()
            if is_main:
                with (out / METRICS_FILE).open("a") as f:
                    f.write(json.dumps({"step": done, **last}) + "\n")
            logger.info("step %d/%d loss %.4f (%.0f samples/s)", done, config.steps, last["train/loss"],
                        last["train/samples_per_s"])
        if on_step is not None:
            on_step(done, last)
        if is_main and (done % config.checkpoint_every == 0 or done == config.steps):
            _save_checkpoint(out, done, named, optimizer, config)
    policy.eval()
    if world_size > 1:
        dist.barrier()
    last["train/wall_s"] = time.perf_counter() - started
    return last
