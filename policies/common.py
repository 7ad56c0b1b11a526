"""What robolora's two policies share: both read ``rgb_<camera>`` images, ``proprio`` and a task id, and act in
[-1, 1]. The mixin gives them their protocol ``spec``, the batch checks, proprio normalisation statistics and the
skill-token hook (docs/policy.md). ``VisuomotorPolicy`` and ``ACTPolicy`` both keep ``proprio_mean``/
``proprio_std`` buffers and a ``config`` with image_size, image_keys, proprio_dim, action_dim, chunk_size,
n_action_steps, temporal_ensemble, num_tasks and d_model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dataclasses

import numpy as np
import torch
from torch import nn

from robolora.policy import Batch, Execution, PolicySpec, TensorSpec


class CameraProprioPolicy:
    """``spec``, batch checks, ``set_normalization`` and ``set_skill_token`` (see the module docstring)."""

    @property
    def spec(self) -> PolicySpec:
        """Observation/action spaces, chunk length, default execution, task input, skill-token and feature sizes."""
        cfg = self.config  # type: ignore[attr-defined]
        image = TensorSpec((cfg.image_size, cfg.image_size, 3), "uint8", 0, 255)
        proprio = TensorSpec((cfg.proprio_dim,), "float32", mean=self.proprio_mean.tolist(),  # type: ignore[attr-defined]
                             std=self.proprio_std.tolist())  # type: ignore[attr-defined]
        return PolicySpec(observation={**dict.fromkeys(cfg.image_keys, image), "proprio": proprio},
                          action=TensorSpec((cfg.action_dim,), "float32", -1.0, 1.0), chunk_size=cfg.chunk_size,
                          execution=Execution(cfg.n_action_steps, cfg.temporal_ensemble), task_key="task_id",
                          num_tasks=cfg.num_tasks, skill_token_dim=cfg.d_model, feature_dim=cfg.d_model)

    def _set_default_execution(self, execution: Execution) -> None:
        self.config = dataclasses.replace(self.config, **execution.to_dict())  # __post_init__ validates

    def _check_batch(self, batch: Mapping[str, Any], training: bool = False) -> None:
        cfg = self.config  # type: ignore[attr-defined]
        need = (*cfg.image_keys, "proprio") + (("action", "action_is_pad") if training else ())
        missing = [k for k in need if k not in batch]
        if self.skill_token is None and "task_id" not in batch:  # type: ignore[attr-defined]
            missing.append("task_id")
        if missing:
            raise KeyError(f"batch lacks {missing} (has {sorted(batch)}); the policy needs {list(need)} "
                           f"and task_id unless a skill token is set")
        for key in cfg.image_keys:
            shape = tuple(batch[key].shape)
            if len(shape) != 4 or shape[1:] != (cfg.image_size, cfg.image_size, 3):
                raise ValueError(f"batch[{key!r}] must be (B, {cfg.image_size}, {cfg.image_size}, 3) uint8, got "
                                 f"{shape}; make the env with image_size={cfg.image_size}")
        if tuple(batch["proprio"].shape[1:]) != (cfg.proprio_dim,):
            raise ValueError(f"batch['proprio'] must be (B, {cfg.proprio_dim}), got {tuple(batch['proprio'].shape)}")
        if training and tuple(batch["action"].shape[1:]) != (cfg.chunk_size, cfg.action_dim):
            raise ValueError(f"batch['action'] must be (B, {cfg.chunk_size}, {cfg.action_dim}), got "
                             f"{tuple(batch['action'].shape)}; build the dataset with chunk_size={cfg.chunk_size}")

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

    # ---- acting on the action-query tokens: each policy supplies ``_query_tokens`` and ``action_head`` ----------

    def _query_tokens(self, batch: Batch) -> torch.Tensor:
        """The final-normed action-query tokens (B, K, D) that ``action_head`` maps to the chunk."""
        raise NotImplementedError

    def predict_chunk(self, batch: Batch) -> torch.Tensor:
        """Predicted action chunk (B, K, A), clamped to the action space [-1, 1]. Gradients are not disabled."""
        self._check_batch(batch)  # type: ignore[attr-defined]
        tokens = self._query_tokens(batch)  # (B, K, D)
        return self._with_residual(self.action_head(tokens), tokens).clamp(-1.0, 1.0)  # type: ignore[attr-defined]

    def raw_chunk_and_features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The unclamped chunk (B, K, A) without any residual head, and ``features`` (B, D), from one forward pass:
        what a residual head reads (``robolora.residual``; RL fine-tuning builds its actor on this)."""
        self._check_batch(batch)  # type: ignore[attr-defined]
        tokens = self._query_tokens(batch)  # (B, K, D)
        return self.action_head(tokens), tokens.mean(1)  # type: ignore[attr-defined]

    def features(self, batch: Batch) -> torch.Tensor:
        """Observation features (B, D) for a skill's completion head (robolora.policy's hook): the mean of the
        final-normed action-query tokens, what the action head reads. Against the pooled whole sequence, the task
        token and the image tokens as inputs to a completion head on wipe demos: all within 0.006 AUC, this one
        the best (docs/completion.md)."""
        self._check_batch(batch)  # type: ignore[attr-defined]
        return self._query_tokens(batch).mean(1)  # (B, D)

    _action_residual: nn.Module | None = None  # a skill's residual head (robolora.residual), not a registered module

    def set_action_residual(self, head: nn.Module | None) -> None:
        """Install (or with None remove) a skill's residual action head (``robolora.residual``): ``predict_chunk``
        then returns ``clamp(chunk + head(features, chunk))`` from one forward pass.

        The head is kept outside ``state_dict()`` and ``parameters()`` (it belongs to the skill, not to the base:
        the base's fingerprint and checkpoints do not change) and is moved to the policy's device here.
        """
        if head is not None:
            if not isinstance(head, nn.Module):
                raise TypeError(f"set_action_residual expects an nn.Module or None, got {type(head).__name__}")
            check = getattr(head, "check_fits", None)
            if callable(check):
                spec = self.spec  # type: ignore[attr-defined]
                check(spec.feature_dim, spec.chunk_size, spec.action_dim, type(self).__name__)
            head = head.to(self.proprio_mean.device)  # type: ignore[attr-defined]
        self.__dict__["_action_residual"] = head

    def _with_residual(self, chunk: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``chunk`` (B, K, A) before the clamp plus the installed residual on the features ``tokens.mean(1)``."""
        head = self._action_residual
        return chunk if head is None else chunk + head(tokens.mean(1), chunk)

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
