"""A skill's residual action head: a small correction on top of the policy's predicted chunk (docs/rl.md).

RL fine-tuning (``robolora.rl``) trains it; behaviour cloning never does. With features ``f = policy.features(batch)``
(B, F) and the policy's own chunk ``c`` (B, K, A) before the clamp, the skill acts with

    clamp(c + R(f, c), -1, 1),        R(f, c) = W2 · tanh(W1 · [f, c.flatten()] + b1) + b2,   (B, K, A)

W2 and b2 zero at start, so a fresh head changes nothing (the policy is exactly the behaviour-cloned skill).
Residual corrections on a frozen chunked BC policy are how ResiP (Ankile et al., 2024) and Policy Decorator
(Yuan et al., 2024) make precise insertion work with RL without the policy drifting from its demos; here the
residual is part of the skill, so it travels, switches and exports with the skill's LoRA weights.

The head is not a LoRA weight and cannot be merged into the base's matrices. A policy runs it through the optional
protocol hook ``set_action_residual(head | None)`` (``robolora.policy``): ``predict_chunk`` then adds it inside the
one forward pass that computes the features (the shipped policies do). A residual skill on a policy without the
hook is refused at attach.

Files: ``residual.safetensors`` in the adapter folder (``fc1.weight`` (H, F + K*A), ``fc1.bias`` (H,),
``fc2.weight`` (K*A, H), ``fc2.bias`` (K*A,)) and a ``"residual"`` entry in ``adapter.json`` (:meth:`to_dict`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

FILE = "residual.safetensors"
TENSORS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


class ResidualHead(nn.Module):
    """R(f, c): features (B, F) and chunk (B, K, A) -> correction (B, K, A); zero at initialisation."""

    def __init__(self, feature_dim: int, chunk_size: int, action_dim: int, hidden: int = 8) -> None:
        super().__init__()
        for name, value in (("feature_dim", feature_dim), ("chunk_size", chunk_size), ("action_dim", action_dim),
                            ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ResidualHead {name}={value!r}: must be an int >= 1")
        self.feature_dim, self.chunk_size, self.action_dim, self.hidden = feature_dim, chunk_size, action_dim, hidden
        self.fc1 = nn.Linear(feature_dim + chunk_size * action_dim, hidden)
        self.fc2 = nn.Linear(hidden, chunk_size * action_dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, features: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        B = chunk.shape[0]
        x = torch.cat([features, chunk.reshape(B, -1)], dim=1)  # (B, F + K*A)
        return self.fc2(torch.tanh(self.fc1(x))).view(B, self.chunk_size, self.action_dim)  # (B, K, A)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def to_dict(self) -> dict[str, Any]:
        return {"feature_dim": self.feature_dim, "chunk_size": self.chunk_size, "action_dim": self.action_dim,
                "hidden": self.hidden, "parameters": self.num_parameters()}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    @classmethod
    def from_files(cls, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], where: str | Path) -> ResidualHead:
        """Rebuild a head from adapter.json's "residual" entry and residual.safetensors; clear errors otherwise."""
        try:
            head = cls(int(meta["feature_dim"]), int(meta["chunk_size"]), int(meta["action_dim"]),
                       int(meta.get("hidden", 8)))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: adapter.json's \"residual\" entry is malformed ({err}); it needs feature_dim, "
                             f"chunk_size, action_dim and hidden (written by robolora finetune-rl)") from None
        expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != expected:
            raise ValueError(f"{where}/{FILE} holds {got} but the \"residual\" entry describes {expected}; the two "
                             f"files do not belong together (rewrite the adapter with robolora finetune-rl)")
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise ValueError(f"{where}/{FILE} holds non-finite values; the adapter is corrupt")
        head.load_state_dict({k: v.float() for k, v in tensors.items()})
        return head.eval().requires_grad_(False)

    def check_fits(self, feature_dim: int, chunk_size: int, action_dim: int, where: str = "the policy") -> None:
        """Refuse a head made for another policy shape, naming both."""
        have = (self.feature_dim, self.chunk_size, self.action_dim)
        want = (feature_dim, chunk_size, action_dim)
        if have != want:
            raise ValueError(f"the residual head expects (features, chunk, action) = {have} but {where} has {want}; "
                             "it was trained for another policy")
