"""What robolora's two policies share: proprio normalisation statistics and the skill-token hook
(docs/policy.md "Two optional hooks"). Mixed into ``VisuomotorPolicy`` and ``ACTPolicy``, which both keep
``proprio_mean``/``proprio_std`` buffers and a ``config`` with ``proprio_dim`` and ``d_model``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn


class ProprioAndSkillToken:
    """``set_normalization(stats)`` and ``set_skill_token(token)`` for a policy module (see the module docstring)."""

    def set_normalization(self, stats: Mapping[str, Any]) -> None:
        """Write ``proprio_mean`` / ``proprio_std`` (e.g. ``BCDataset.stats``); they travel in the checkpoint."""
        size = self.config.proprio_dim  # type: ignore[attr-defined]
        for key in ("proprio_mean", "proprio_std"):
            if key not in stats:
                raise ValueError(f"set_normalization: stats lack {key!r} (have {sorted(stats)}); "
                                 f"pass BCDataset.stats or a dict with proprio_mean and proprio_std")
            value = torch.as_tensor(np.asarray(stats[key], dtype=np.float32)) if not torch.is_tensor(stats[key]) \
                else stats[key].detach().float()
            if value.shape != (size,) or not torch.isfinite(value).all():
                raise ValueError(f"set_normalization: {key} must be finite with shape ({size},), "
                                 f"got shape {tuple(value.shape)}")
            if key == "proprio_std" and (value <= 0).any():
                raise ValueError("set_normalization: proprio_std must be > 0; floor it (BCDataset floors at 1e-2)")
            getattr(self, key).copy_(value)

    def set_skill_token(self, token: nn.Parameter | None) -> None:
        """Install (or with None remove) the skill token that replaces the task embedding for every sample.

        The token is registered as the parameter ``skill_token``, so it appears in ``parameters()`` and
        ``state_dict()`` while set. Train it with weight decay 0 (docs/design.md §9.3).
        """
        if token is not None:
            d = self.config.d_model  # type: ignore[attr-defined]
            if not isinstance(token, nn.Parameter):
                raise TypeError(f"set_skill_token expects an nn.Parameter or None, got {type(token).__name__}; "
                                f"wrap it: nn.Parameter(tensor)")
            if token.shape != (d,):
                raise ValueError(f"skill token must have shape ({d},) = (d_model,), got {tuple(token.shape)}")
            device = self.proprio_mean.device  # type: ignore[attr-defined]
            if token.device != device:
                raise ValueError(f"skill token is on {token.device} but the policy is on {device}; "
                                 f"create it there: nn.Parameter(t.to({str(device)!r}))")
        self.skill_token = token
