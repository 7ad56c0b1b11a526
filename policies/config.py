"""Configuration of the visuomotor transformer policy (docs/design.md §3).

``PolicyConfig`` is a frozen dataclass validated on construction; sizes that follow from the fields (token counts,
stem channels, head width) are properties. Three presets:

- ``tiny``: d=32, 2 blocks, 2 heads (~42 k parameters), for tests and smoke runs.
- ``base``: the shipped CPU-trainable default measured in docs/design.md §9.1 (d=128, 4 pre-norm blocks, 4 heads, K=8
  action queries, front camera through a conv stem to a 4x4 grid of 16 image tokens at 64 px; ~1.0 M parameters,
  ~300 samples/s at batch 64 fwd+bwd+AdamW on 2 CPU cores).
- ``large``: a GPU-sized model (d=512, 12 blocks, 8 heads, 8x8 = 64 image tokens, ~38.5 M parameters).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from robolora.config import check_ints

CAMERAS = ("front", "wrist")

_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=32, n_layers=2, n_heads=2, stem_width=8),
    "base": dict(d_model=128, n_layers=4, n_heads=4, stem_width=32),
    "large": dict(d_model=512, n_layers=12, n_heads=8, stem_width=64, patch_grid=8, dropout=0.1),
}


def check_shared_fields(config: Any, int_fields: tuple[tuple[str, int], ...]) -> None:
    """The validation both policy configs share (``PolicyConfig``, ``ACTConfig``): cameras, integer sizes (each
    ``(name, lowest value)``), heads dividing d_model, mlp_ratio, dropout and the stem's image / grid ratio.
    Messages name the class, the field, the bad value and the valid range."""
    cls = type(config).__name__
    if isinstance(config.cameras, str) or not isinstance(config.cameras, (tuple, list)):
        raise ValueError(f"{cls}.cameras must be a tuple of camera names, got {config.cameras!r}")
    object.__setattr__(config, "cameras", tuple(config.cameras))
    if not config.cameras or len(set(config.cameras)) != len(config.cameras):
        raise ValueError(f"{cls}.cameras must be non-empty without repeats, got {config.cameras!r}")
    unknown = [c for c in config.cameras if c not in CAMERAS]
    if unknown:
        raise ValueError(f"{cls}.cameras has unknown camera(s) {unknown}; valid: {list(CAMERAS)}")
    check_ints(cls, config, int_fields)
    if config.d_model % config.n_heads:
        raise ValueError(f"{cls}.d_model={config.d_model} must be divisible by n_heads={config.n_heads}")
    if not (isinstance(config.mlp_ratio, (int, float)) and 0 < config.mlp_ratio <= 16):
        raise ValueError(f"{cls}.mlp_ratio must be in (0, 16], got {config.mlp_ratio!r}")
    if not (isinstance(config.dropout, (int, float)) and 0.0 <= config.dropout < 1.0):
        raise ValueError(f"{cls}.dropout must be in [0, 1), got {config.dropout!r}")
    ratio, rest = divmod(config.image_size, config.patch_grid)
    if rest or ratio < 2 or ratio & (ratio - 1):
        raise ValueError(f"{cls}.image_size / patch_grid must be a power of two >= 2 (the stem halves the image "
                         f"per conv), got {config.image_size} / {config.patch_grid}")


@dataclass(frozen=True)
class PolicyConfig:
    """Sizes and behaviour of ``VisuomotorPolicy``.

    Attributes:
        image_size: side of the square uint8 camera images in pixels (the env's ``image_size``).
        cameras: camera names read from observations as ``rgb_<camera>``; each has its own conv stem.
        proprio_dim: length of the proprioception vector (``robolora.envs.PROPRIO_DIM``).
        action_dim: action size; actions live in [-1, 1] (the env's action space).
        num_tasks: rows of the task-id embedding (the multi-task base's tasks).
        d_model: transformer width.
        n_layers: pre-norm transformer blocks.
        n_heads: attention heads; must divide ``d_model``.
        mlp_ratio: hidden width of each block's MLP as a multiple of ``d_model``.
        chunk_size: K, actions predicted per query (one learned query token each).
        n_action_steps: execution horizon, actions of each chunk executed before re-querying (1..K).
        temporal_ensemble: ACT temporal-ensembling coefficient m (weights exp(-m * i), oldest prediction i=0);
            None executes chunks open-loop for ``n_action_steps``. Requires ``n_action_steps == 1``.
        patch_grid: side of the image-token grid per camera; the stem downsamples by ``image_size / patch_grid``.
        stem_width: channels of the first stem conv; doubles per stride-2 conv, the last conv outputs ``d_model``.
        dropout: dropout in attention and MLP residual branches.
    """

    image_size: int = 64
    cameras: tuple[str, ...] = ("front",)
    proprio_dim: int = 10
    action_dim: int = 4
    num_tasks: int = 5
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: float = 4.0
    chunk_size: int = 8
    n_action_steps: int = 4
    temporal_ensemble: float | None = None
    patch_grid: int = 4
    stem_width: int = 32
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_shared_fields(self, (("image_size", 8), ("proprio_dim", 1), ("action_dim", 1), ("num_tasks", 1),
                                   ("d_model", 8), ("n_layers", 1), ("n_heads", 1), ("chunk_size", 1),
                                   ("n_action_steps", 1), ("patch_grid", 1), ("stem_width", 1)))
        if not self.n_action_steps <= self.chunk_size:
            raise ValueError(f"PolicyConfig.n_action_steps={self.n_action_steps} must be in "
                             f"[1, chunk_size={self.chunk_size}]")
        if self.temporal_ensemble is not None:
            m = self.temporal_ensemble
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not (math.isfinite(m) and m >= 0):
                raise ValueError(f"PolicyConfig.temporal_ensemble must be None or a finite float >= 0, got {m!r}")
            if self.n_action_steps != 1:
                raise ValueError(f"PolicyConfig.temporal_ensemble={m} re-queries every step, so it needs "
                                 f"n_action_steps=1 (got {self.n_action_steps}); pass n_action_steps=1")

    # ---- derived sizes -------------------------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.mlp_ratio * self.d_model))

    @property
    def image_keys(self) -> tuple[str, ...]:
        """Observation / batch keys holding the camera images, e.g. ``("rgb_front",)``."""
        return tuple(f"rgb_{c}" for c in self.cameras)

    @property
    def tokens_per_camera(self) -> int:
        return self.patch_grid * self.patch_grid

    @property
    def num_image_tokens(self) -> int:
        return len(self.cameras) * self.tokens_per_camera

    @property
    def num_tokens(self) -> int:
        """Sequence length: task token + proprio token + image tokens + K action queries."""
        return 2 + self.num_image_tokens + self.chunk_size

    @property
    def stem_channels(self) -> tuple[int, ...]:
        """Output channels of each stride-2 stem conv; the last is ``d_model``."""
        n_down = int(math.log2(self.image_size // self.patch_grid))
        return tuple(min(self.stem_width * 2**i, self.d_model) for i in range(n_down - 1)) + (self.d_model,)

    # ---- construction and serialisation --------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> PolicyConfig:
        """A named preset (``tiny``, ``base``, ``large``) with optional field overrides."""
        if name not in _PRESETS:
            raise ValueError(f"unknown policy preset {name!r}; available: {sorted(_PRESETS)}")
        return cls.from_dict({**_PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["cameras"] = list(self.cameras)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PolicyConfig:
        """Inverse of ``to_dict``; missing fields take their defaults, unknown fields are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown PolicyConfig field(s) {unknown}; valid fields: {sorted(names)}")
        d = dict(d)
        if "cameras" in d and isinstance(d["cameras"], list):
            d["cameras"] = tuple(d["cameras"])
        return cls(**d)
