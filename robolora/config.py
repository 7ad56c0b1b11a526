"""LoRA hyper-parameters (docs/design.md §4; Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models";
Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" for the rsLoRA scaling).

One frozen dataclass describes one adapter: its rank r, alpha, which layers it targets (``nn.Linear``,
``nn.Conv2d``, ``nn.MultiheadAttention`` projections), dropout on the LoRA input, the std of A's Gaussian init and
the scaling rule. It round-trips through JSON with
``to_dict``/``from_dict`` so it can travel beside the adapter weights.

Target patterns (matched against a layer's qualified name, e.g. ``blocks.0.attn.q``):

- ``"blocks.0.attn.q"`` — an exact qualified name;
- ``"attn.q"`` — a dotted suffix: matches ``blocks.0.attn.q`` and ``attn.q`` but not ``blocks.0.attn.qq``;
- ``"re:<pattern>"`` — a Python regular expression that must match the WHOLE qualified name
  (``re.fullmatch``), e.g. ``"re:blocks\\.[01]\\.mlp\\.fc\\d"``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

ATTENTION_TARGETS: tuple[str, ...] = ("attn.q", "attn.k", "attn.v", "attn.o")
REGEX_PREFIX = "re:"


@dataclass(frozen=True)
class LoRAConfig:
    """Hyper-parameters of one LoRA adapter: h = W0 x + b + s * B A x with s = alpha / r (or alpha / sqrt(r)).

    Attributes:
        rank: r, the inner dimension of A (r x d_in) and B (d_out x r); >= 1.
        alpha: numerator of the scaling s; > 0.
        targets: name patterns of the layers to adapt (see the module docstring for the syntax).
        dropout: dropout probability applied to the LoRA branch's input in training mode only; in [0, 1).
        init_std: std of A's Gaussian init N(0, init_std^2); None means 1 / rank (the LoRA paper's Gaussian option,
            PEFT's ``init_lora_weights="gaussian"``).
        rslora: use the rank-stabilised scaling alpha / sqrt(rank) instead of alpha / rank.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ATTENTION_TARGETS
    dropout: float = 0.0
    init_std: float | None = None
    rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank={self.rank!r} is invalid; use an integer >= 1 (typically 4-64)")
        if not _is_real(self.alpha) or not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha={self.alpha!r} is invalid; use a finite number > 0")
        if isinstance(self.targets, str):
            raise ValueError(
                f"LoRAConfig.targets={self.targets!r} is a single string; pass a tuple of patterns, "
                f"e.g. ({self.targets!r},)"
            )
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.targets, tuple) or not self.targets:
            raise ValueError(f"LoRAConfig.targets={self.targets!r} is invalid; use a non-empty tuple of patterns")
        for pattern in self.targets:
            _check_pattern(pattern)
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout={self.dropout!r} is invalid; use a probability in [0, 1)")
        if self.init_std is not None and (not _is_real(self.init_std) or not self.init_std > 0):
            raise ValueError(
                f"LoRAConfig.init_std={self.init_std!r} is invalid; use a finite number > 0, or None for 1/rank"
            )
        if not isinstance(self.rslora, bool):
            raise ValueError(f"LoRAConfig.rslora={self.rslora!r} is invalid; use True or False")

    @property
    def scaling(self) -> float:
        """s = alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def std(self) -> float:
        """The std actually used for A's init (``init_std`` or 1 / rank)."""
        return self.init_std if self.init_std is not None else 1.0 / self.rank

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (targets as a list)."""
        out = asdict(self)
        out["targets"] = list(self.targets)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        """Inverse of ``to_dict``; unknown keys are an error (they usually mean a typo or a newer format)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LoRAConfig fields {unknown}; valid fields: {sorted(known)}")
        kwargs = dict(data)
        if "targets" in kwargs and isinstance(kwargs["targets"], list):
            kwargs["targets"] = tuple(kwargs["targets"])
        return cls(**kwargs)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_ints(owner: str, obj: Any, fields: Any, *, optional: tuple[str, ...] = ()) -> None:
    """Raise ``ValueError("<owner>.<name> must be an int >= <low>, got ...")`` unless every ``(name, low)`` of
    ``fields`` is an int (not a bool) >= low on ``obj``; names in ``optional`` may also be None."""
    for name, low in fields:
        value = getattr(obj, name)
        if value is None and name in optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            none = "None or " if name in optional else ""
            raise ValueError(f"{owner}.{name} must be {none}an int >= {low}, got {value!r}")


def _check_pattern(pattern: Any) -> None:
    if not isinstance(pattern, str) or not pattern or pattern == REGEX_PREFIX:
        raise ValueError(
            f"LoRAConfig.targets contains {pattern!r}; each pattern must be a non-empty string: an exact name, "
            f"a dotted suffix such as 'attn.q', or '{REGEX_PREFIX}<regex>'"
        )
    if pattern.startswith(REGEX_PREFIX):
        try:
            re.compile(pattern[len(REGEX_PREFIX):])
        except re.error as err:
            raise ValueError(f"LoRAConfig.targets contains {pattern!r}, an invalid regular expression: {err}") from err
