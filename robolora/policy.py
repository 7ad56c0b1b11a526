"""The policy protocol: what robolora needs from a policy, and nothing more (docs/policy.md, docs/design.md §7).

A policy is an ``nn.Module`` that

- describes its inputs and outputs: ``spec -> PolicySpec`` (observation keys with shapes, dtypes and bounds, the
  action space, the chunk length K, an optional task-id input, the default chunk execution);
- predicts an action chunk from a batch of observations: ``predict_chunk(batch) -> (B, K, A)`` with every
  ``spec.observation`` key batched (``spec.batch(obs)`` builds such a batch from env observations);
- can be reset: ``reset(indices=None)`` forgets whatever per-episode state it keeps (nothing, for most);
- gives training a loss: ``forward(batch) -> (loss, {"train/...": float})`` on batches that also hold ``action``
  (B, K, A) and ``action_is_pad`` (B, K). A policy without one can be trained with ``chunk_l1_loss``.

Four hooks are optional and explicit, never private attributes that robolora writes:

- skill conditioning: a policy whose ``spec.skill_token_dim`` is set has ``set_skill_token(nn.Parameter | None)``;
  the token (shape ``(skill_token_dim,)``) replaces its task conditioning while set. robolora trains one per skill
  and the SkillManager installs its own token Parameter through this hook and writes only into that Parameter.
- acting: ``select_action(obs)``. Chunk execution (``n_action_steps``, temporal ensembling) is robolora's own
  ``ChunkExecutor``; ``ChunkedActing`` gives a policy ``select_action``/``set_execution`` on top of it, and the
  SkillManager keeps one executor per skill of its own.
- observation features: a policy whose ``spec.feature_dim`` is set has ``features(batch) -> (B, feature_dim)``, its
  own pooled summary of the observation under the current weights and skill (robolora never needs its gradient).
  A skill's completion head reads them (``robolora.completion``); ``predict_chunk`` must not change for it.
- residual action head: a policy with ``spec.feature_dim`` set may have ``set_action_residual(head | None)``; while
  a skill's ``robolora.residual.ResidualHead`` is set, ``predict_chunk`` returns ``clamp(chunk + head(features,
  chunk))`` from its one forward pass. ``attach_active`` and the SkillManager install a skill's head through it.

Everything robolora builds inputs for (probes on attach, export, the controller) reads ``spec``, never one policy
class's config.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

Batch = Mapping[str, Any]
_KEEP = object()  # set_execution: leave this setting as it is


@dataclass(frozen=True)
class TensorSpec:
    """One observation or action array, per sample (no batch dimension).

    Attributes:
        shape: per-sample shape, e.g. ``(64, 64, 3)`` for an image or ``(10,)`` for proprio.
        dtype: numpy dtype name (``"uint8"``, ``"float32"``, ``"int64"``).
        low, high: bounds (scalars), or None where unbounded.
        mean, std: per-element statistics the policy normalises with (tuples), if any; probes draw around them.
    """

    shape: tuple[int, ...]
    dtype: str
    low: float | None = None
    high: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if any(s < 1 for s in self.shape):
            raise ValueError(f"TensorSpec.shape must hold positive sizes, got {self.shape}")
        try:
            np.dtype(self.dtype)
        except TypeError as err:
            raise ValueError(f"TensorSpec.dtype {self.dtype!r} is not a numpy dtype name (e.g. 'float32')") from err
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in np.asarray(value, dtype=np.float64).reshape(-1))
                if len(value) != math.prod(self.shape):
                    raise ValueError(f"TensorSpec.{name} has {len(value)} values for shape {self.shape}")
                object.__setattr__(self, name, value)

    @property
    def is_image(self) -> bool:
        """A uint8 (H, W, 3) camera image."""
        return self.dtype == "uint8" and len(self.shape) == 3 and self.shape[-1] == 3

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Execution:
    """How predicted chunks become one action per step.

    ``n_action_steps`` actions of each chunk are executed before the model is queried again; with
    ``temporal_ensemble = m`` (needs ``n_action_steps == 1``) the model is queried every step and the action for time
    t is the weighted mean of every chunk's prediction for t, weight exp(-m * i) for the i-th oldest (ACT).
    """

    n_action_steps: int = 1
    temporal_ensemble: float | None = None

    def __post_init__(self) -> None:
        n = self.n_action_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"Execution.n_action_steps must be an int >= 1, got {n!r}")
        m = self.temporal_ensemble
        if m is not None:
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not (math.isfinite(m) and m >= 0):
                raise ValueError(f"Execution.temporal_ensemble must be None or a finite float >= 0, got {m!r}")
            if n != 1:
                raise ValueError(f"Execution.temporal_ensemble={m} re-queries every step, so it needs "
                                 f"n_action_steps=1 (got {n}); pass n_action_steps=1")

    def check(self, chunk_size: int) -> Execution:
        """Raise unless this execution fits chunks of ``chunk_size``; returns self."""
        if self.n_action_steps > chunk_size:
            raise ValueError(f"n_action_steps={self.n_action_steps} must be in [1, chunk_size={chunk_size}]")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PolicySpec:
    """What a policy reads and writes.

    Attributes:
        observation: observation keys in input order -> ``TensorSpec``; images are uint8 (H, W, 3).
        action: the per-step action, ``(A,)`` float32, usually bounded to [-1, 1].
        chunk_size: K, actions predicted per query.
        execution: the default chunk execution.
        task_key: name of an optional int64 task-id input (multi-task policies), else None.
        num_tasks: values the task id may take (0 without a task input).
        skill_token_dim: length of the skill token the policy accepts through ``set_skill_token``, or None.
        feature_dim: F of the observation features the policy returns from ``features(batch)`` (B, F), or None.
    """

    observation: Mapping[str, TensorSpec]
    action: TensorSpec
    chunk_size: int
    execution: Execution = field(default_factory=Execution)
    task_key: str | None = None
    num_tasks: int = 0
    skill_token_dim: int | None = None
    feature_dim: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "observation", dict(self.observation))
        if not self.observation:
            raise ValueError("PolicySpec.observation is empty; a policy reads at least one observation key")
        if len(self.action.shape) != 1:
            raise ValueError(f"PolicySpec.action must be a vector (A,), got shape {self.action.shape}")
        if self.chunk_size < 1:
            raise ValueError(f"PolicySpec.chunk_size must be >= 1, got {self.chunk_size}")
        self.execution.check(self.chunk_size)
        if (self.task_key is None) != (self.num_tasks == 0):
            raise ValueError(f"PolicySpec: task_key={self.task_key!r} and num_tasks={self.num_tasks} disagree; "
                             "give both (a multi-task policy) or neither")
        f = self.feature_dim
        if f is not None and (isinstance(f, bool) or not isinstance(f, int) or f < 1):
            raise ValueError(f"PolicySpec.feature_dim must be None or an int >= 1, got {f!r}")

    @property
    def action_dim(self) -> int:
        return self.action.shape[0]

    @property
    def image_keys(self) -> tuple[str, ...]:
        return tuple(k for k, s in self.observation.items() if s.is_image)

    def env_kwargs(self) -> dict[str, Any]:
        """What a robolora env must render for this policy: ``image_size`` and ``cameras`` (``make(env_id,
        **spec.env_kwargs())``); a policy without images gets the envs' default."""
        images = self.image_keys
        if not images:
            return {}
        return {"image_size": self.observation[images[0]].shape[0],
                "cameras": tuple(k.removeprefix("rgb_") for k in images)}

    @property
    def input_keys(self) -> tuple[str, ...]:
        """Every batch input the policy reads: observation keys, then the task key if any."""
        return tuple(self.observation) + ((self.task_key,) if self.task_key else ())

    def batch(self, obs: Mapping[str, Any], device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], bool]:
        """Env observation(s) -> (a batch of tensors on ``device``, whether the input was a single observation).

        A single observation has each key at its spec shape; a batch adds a leading dimension. A missing task id
        defaults to 0.
        """
        missing = [k for k in self.observation if k not in obs]
        if missing:
            raise KeyError(f"observation lacks {missing} (has {sorted(obs)}); the policy reads "
                           f"{list(self.observation)}")
        first = next(iter(self.observation))
        unbatched = np.ndim(obs[first]) == len(self.observation[first].shape)
        batch = {}
        for key in self.observation:
            value = torch.as_tensor(obs[key], device=device)
            batch[key] = value.unsqueeze(0) if unbatched else value
        if self.task_key is not None:
            size = batch[first].shape[0]
            task = torch.as_tensor(obs.get(self.task_key, 0), device=device, dtype=torch.long)
            batch[self.task_key] = task.expand(size) if task.dim() == 0 else task.reshape(size)
        return batch, unbatched

    def probe(self, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Fixed random inputs in the policy's format: images uniform in [0, 255], other observations drawn around
        their ``mean``/``std`` (standard normal without them, clipped to finite bounds), task ids 0, 1, ...
        For the live check on attach and export's parity probes."""
        g = torch.Generator().manual_seed(seed)
        probe = {k: torch.randint(0, 256, (batch_size, *s.shape), generator=g, dtype=torch.uint8)
                 for k, s in self.observation.items() if s.is_image}
        for key, s in self.observation.items():
            if s.is_image:
                continue
            value = torch.randn(batch_size, *s.shape, generator=g)
            if s.mean is not None or s.std is not None:
                mean = torch.tensor(s.mean or (0.0,) * value[0].numel()).reshape(s.shape)
                std = torch.tensor(s.std or (1.0,) * value[0].numel()).reshape(s.shape)
                value = mean + std * value
            if s.low is not None or s.high is not None:
                value = value.clamp(s.low, s.high)
            probe[key] = value.to(getattr(torch, s.dtype))
        if self.task_key is not None:
            probe[self.task_key] = torch.arange(batch_size, dtype=torch.long) % self.num_tasks
        return probe

    def to_dict(self) -> dict[str, Any]:
        return {"observation": {k: s.to_dict() for k, s in self.observation.items()}, "action": self.action.to_dict(),
                "chunk_size": self.chunk_size, "execution": self.execution.to_dict(), "task_key": self.task_key,
                "num_tasks": self.num_tasks, "skill_token_dim": self.skill_token_dim, "feature_dim": self.feature_dim}


@runtime_checkable
class Policy(Protocol):
    """The protocol (module docstring). ``nn.Module`` subclasses satisfy it with four members."""

    @property
    def spec(self) -> PolicySpec: ...

    def predict_chunk(self, batch: Batch) -> torch.Tensor: ...

    def reset(self, indices: Sequence[int] | None = None) -> None: ...

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]: ...


def check_policy(policy: Any, *, skill_token: bool = False, features: bool = False,
                 residual: bool = False) -> PolicySpec:
    """Raise a TypeError naming what is missing unless ``policy`` follows the protocol; returns its spec.

    ``skill_token=True`` also requires the skill-conditioning hook, ``features=True`` the observation-features hook,
    ``residual=True`` the residual-action hook (``set_action_residual`` and ``spec.feature_dim``).
    """
    missing = [m for m in ("spec", "predict_chunk", "reset") if not hasattr(type(policy), m)]
    if not isinstance(policy, nn.Module):
        missing.insert(0, "nn.Module base class")
    if missing:
        raise TypeError(f"{type(policy).__name__} does not follow robolora's policy protocol: it lacks {missing}. "
                        "See docs/policy.md: an nn.Module with spec, predict_chunk(batch), reset() and "
                        "forward(batch) -> (loss, metrics)")
    spec = policy.spec
    if not isinstance(spec, PolicySpec):
        raise TypeError(f"{type(policy).__name__}.spec must be a robolora.policy.PolicySpec, got {type(spec).__name__}")
    if skill_token and (spec.skill_token_dim is None or not callable(getattr(policy, "set_skill_token", None))):
        raise TypeError(f"{type(policy).__name__} has no skill-conditioning hook (spec.skill_token_dim and "
                        "set_skill_token); train the skill without a skill token (skill_token=False)")
    if features and (spec.feature_dim is None or not callable(getattr(policy, "features", None))):
        raise TypeError(f"{type(policy).__name__} has no observation-features hook (spec.feature_dim and "
                        "features(batch) -> (B, feature_dim)), which a completion head reads; see docs/policy.md")
    if residual and (spec.feature_dim is None or not callable(getattr(policy, "set_action_residual", None))):
        raise TypeError(f"{type(policy).__name__} has no residual-action hook (set_action_residual(head | None) and "
                        "spec.feature_dim), which a skill's residual head needs; attach the skill to a policy that "
                        "has it (robolora's VisuomotorPolicy and ACTPolicy do) or drop the residual (docs/policy.md)")
    return spec


def chunk_l1_loss(pred: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked L1 behaviour-cloning loss of predicted chunks (B, K, A) against ``batch["action"]``, padded steps
    (``action_is_pad``) excluded. The loss robolora supplies to policies that bring none (ACT's choice)."""
    target = batch["action"].float()  # (B, K, A)
    valid = (~batch["action_is_pad"].bool()).unsqueeze(-1).float()  # (B, K, 1)
    denom = valid.sum().clamp_min(1.0) * pred.shape[-1]
    err = pred.float() - target  # (B, K, A)
    loss = (err.abs() * valid).sum() / denom
    with torch.no_grad():
        mse = (err.square() * valid).sum() / denom
        l1_value, mse_value = torch.stack([loss, mse]).tolist()  # one device sync for both
    return loss, {"train/loss": l1_value, "train/l1": l1_value, "train/mse": mse_value}


def policy_device(policy: nn.Module) -> torch.device:
    """The device of the policy's first parameter or buffer (CPU for a policy with neither)."""
    for tensor in (*policy.parameters(), *policy.buffers()):
        return tensor.device
    return torch.device("cpu")


class ChunkExecutor:
    """Turns predicted chunks into one action per step, per batch element (ACT / LeRobot semantics).

    Without ensembling each element executes the first ``n_action_steps`` actions of its chunk, then the model is
    queried again (for the elements that ran out only). With temporal ensembling the model is queried every step
    and the action for time t is the weighted mean of every chunk's prediction for t (``Execution``).
    """

    def __init__(self, execution: Execution, chunk_size: int, action_dim: int) -> None:
        self.execution = execution.check(chunk_size)
        self.chunk_size = chunk_size
        self.action_dim = action_dim
        self.chunks: torch.Tensor | None = None  # (B, K, A) current chunk, or ensemble weighted sums
        self.position: torch.Tensor | None = None  # (B,) index of the next action; K means "query"
        self.counts: torch.Tensor | None = None  # (B, K) predictions accumulated per future step (ensembling)
        self.weights: torch.Tensor | None = None  # (B, K) summed ensemble weights per future step

    @classmethod
    def for_spec(cls, spec: PolicySpec, execution: Execution | None = None) -> ChunkExecutor:
        return cls(execution or spec.execution, spec.chunk_size, spec.action_dim)

    def reset(self, indices: Sequence[int] | None = None) -> None:
        if indices is None or self.chunks is None:
            self.chunks = self.position = self.counts = self.weights = None
            return
        idx = torch.as_tensor(list(indices), dtype=torch.long, device=self.chunks.device)
        self.position[idx] = self.chunk_size
        self.chunks[idx] = 0.0
        self.counts[idx] = 0
        self.weights[idx] = 0.0

    def step(self, batch: dict[str, torch.Tensor], predict: Callable[[Batch], torch.Tensor]) -> torch.Tensor:
        """The next action (B, A) for a batch, querying ``predict`` for the elements that need a new chunk."""
        B = next(iter(batch.values())).shape[0]
        if self.chunks is not None and self.chunks.shape[0] != B:
            raise ValueError(f"select_action got a batch of {B} but the action queue holds {self.chunks.shape[0]}; "
                             f"call reset() when the number of environments changes")
        if self.chunks is None:
            device = next(iter(batch.values())).device
            self.chunks = torch.zeros(B, self.chunk_size, self.action_dim, device=device)
            self.position = torch.full((B,), self.chunk_size, dtype=torch.long, device=device)
            self.counts = torch.zeros(B, self.chunk_size, dtype=torch.long, device=device)
            self.weights = torch.zeros(B, self.chunk_size, device=device)
        if self.execution.temporal_ensemble is not None:
            return self._ensemble_step(predict(batch).float())
        need = self.position >= self.execution.n_action_steps  # (B,)
        if need.any():
            rows = need.nonzero().squeeze(1)
            sub = batch if bool(need.all()) else {k: v[rows] for k, v in batch.items()}
            self.chunks[rows] = predict(sub).float()  # (b, K, A)
            self.position[rows] = 0
        action = self.chunks[torch.arange(B, device=self.chunks.device), self.position]  # (B, A)
        self.position += 1
        return action

    def _ensemble_step(self, chunk: torch.Tensor) -> torch.Tensor:
        # slot j of the buffers is the action for time t + j
        w = torch.exp(-self.execution.temporal_ensemble * self.counts.float())  # (B, K)
        self.chunks += w.unsqueeze(-1) * chunk
        self.weights += w
        self.counts += 1
        action = self.chunks[:, 0] / self.weights[:, :1]  # (B, A)
        self.chunks = torch.roll(self.chunks, -1, dims=1)
        self.weights = torch.roll(self.weights, -1, dims=1)
        self.counts = torch.roll(self.counts, -1, dims=1)
        self.chunks[:, -1] = 0.0
        self.weights[:, -1] = 0.0
        self.counts[:, -1] = 0
        return action


def act(executor: ChunkExecutor, predict: Callable[[Batch], torch.Tensor], spec: PolicySpec, obs: Mapping[str, Any],
        device: torch.device) -> np.ndarray:
    """One control step: observation(s) -> batch -> the executor's next action, (A,) or (B, A) float32 numpy."""
    batch, unbatched = spec.batch(obs, device)
    action = executor.step(batch, predict).float().cpu().numpy()  # (B, A)
    return action[0] if unbatched else action


class ChunkedActing:
    """Mixin giving a protocol policy ``select_action``, ``reset`` and ``set_execution`` on robolora's
    ``ChunkExecutor``. The executor and the spec it was built for are this mixin's own state, created from
    ``spec`` on first use and rebuilt by ``set_execution`` (the spec is read once, not on every step)."""

    _acting: tuple[ChunkExecutor, PolicySpec] | None = None

    def _acting_state(self) -> tuple[ChunkExecutor, PolicySpec]:
        if self._acting is None:
            spec = self.spec  # type: ignore[attr-defined]
            self._acting = (ChunkExecutor.for_spec(spec), spec)
        return self._acting

    def reset(self, indices: Sequence[int] | None = None) -> None:
        """Forget queued / ensembled actions: all, or only those of the given batch elements (vector envs)."""
        self._acting_state()[0].reset(indices)

    def set_execution(self, n_action_steps: int | None = None, temporal_ensemble: float | None | object = _KEEP) -> None:
        """Change how predicted chunks are executed (weights untouched); an argument left out keeps its value.
        The action queue is cleared (call between episodes)."""
        spec = self.spec  # type: ignore[attr-defined]
        changes: dict[str, Any] = {}
        if n_action_steps is not None:
            changes["n_action_steps"] = int(n_action_steps)
        if temporal_ensemble is not _KEEP:
            changes["temporal_ensemble"] = temporal_ensemble
        execution = dataclasses.replace(spec.execution, **changes).check(spec.chunk_size)
        self._set_default_execution(execution)
        self._acting = None

    def _set_default_execution(self, execution: Execution) -> None:
        raise NotImplementedError(f"{type(self).__name__} must store its default Execution (spec.execution)")

    @torch.no_grad()
    def select_action(self, obs: Mapping[str, Any]) -> np.ndarray:
        """Next action for an env observation, (A,) float32 for one env or (B, A) for a batch. Runs under
        ``torch.no_grad`` (not inference_mode, whose tensors would block later in-place LoRA weight swaps)."""
        executor, spec = self._acting_state()
        return act(executor, self.predict_chunk, spec, obs, policy_device(self))  # type: ignore[attr-defined]


def probe_batch(source: PolicySpec | nn.Module, batch_size: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """``PolicySpec.probe`` of a spec or of a protocol policy's ``spec``: fixed random inputs for checks/benches."""
    spec = source if isinstance(source, PolicySpec) else source.spec
    return spec.probe(batch_size, seed)
