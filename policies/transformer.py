"""Visuomotor transformer policy: images + proprio + task -> a chunk of K actions (docs/design.md §3).

An encoder-only transformer in the spirit of ACT (Zhao et al., 2023, "Learning Fine-Grained Bimanual Manipulation
with Low-Cost Hardware"), written like nanoGPT. The sequence is

    [task token | proprio token | image tokens (grid x grid per camera) | K action queries]

processed by pre-norm blocks with full attention; a linear head reads the K action-query tokens. Attention uses
separate ``attn.q/k/v/o`` and ``mlp.fc1/fc2`` ``nn.Linear`` layers so LoRA can target them by name.

A new skill on the frozen base has no task id, so ``set_skill_token`` installs a trainable (d_model,) token that
replaces the task embedding for every sample (docs/design.md §3 and §9.3).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from robolora.policy import ChunkedActing, chunk_l1_loss

from .common import CameraProprioPolicy
from .config import PolicyConfig

logger = logging.getLogger(__name__)

Batch = Mapping[str, Any]


class ConvStem(nn.Module):
    """Stride-2 3x3 convs from (B, 3, S, S) to a (B, grid*grid, D) token grid.

    No normalisation inside the conv stack: GroupNorm cost 15% of a training step on CPU (docs/design.md §9.1) and
    BatchNorm couples samples and breaks under a frozen base. Instead the input is standardised, convs use
    Kaiming init for ReLU, and one LayerNorm on the few output tokens fixes their scale cheaply.
    """

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c_out in enumerate(config.stem_channels):
            layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1))
            if i < len(config.stem_channels) - 1:  # the last conv is linear so tokens can be signed
                layers.append(nn.ReLU(inplace=True))
            c_in = c_out
        self.convs = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x)  # (B, D, g, g)
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, g*g, D)


class Attention(nn.Module):
    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k(x).view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, H, T, Dh)
        v = self.v(x).view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, H, T, Dh)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.resid_dropout(self.o(y))


class MLP(nn.Module):
    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.mlp_hidden)
        self.fc2 = nn.Linear(config.mlp_hidden, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = Attention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class VisuomotorPolicy(CameraProprioPolicy, ChunkedActing, nn.Module):
    """The policy. Training: ``forward(batch) -> (loss, metrics)``; acting: ``reset()`` + ``select_action(obs)``.

    Batches are dicts as produced by ``robolora.data.BCDataset`` (batched): ``rgb_<camera>`` uint8 (B, H, W, 3),
    ``proprio`` float (B, P), ``task_id`` int64 (B,), and for training ``action`` (B, K, A) in [-1, 1] and
    ``action_is_pad`` bool (B, K).
    """

    lora_targets: tuple[str, ...] = ("attn.q", "attn.k", "attn.v", "attn.o")  # train-skill's default
    lora_mlp_targets: tuple[str, ...] = ("mlp.fc1", "mlp.fc2")  # added by train-skill --mlp
    lora_conv_targets: tuple[str, ...] = (r"re:stems\..+",)  # the camera stems' convolutions (train-skill --conv)

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.stems = nn.ModuleDict({cam: ConvStem(config) for cam in config.cameras})
        self.image_pos = nn.Parameter(torch.zeros(len(config.cameras), config.tokens_per_camera, d))
        self.proprio_proj = nn.Linear(config.proprio_dim, d)
        self.task_embed = nn.Embedding(config.num_tasks, d)
        self.action_queries = nn.Parameter(torch.zeros(config.chunk_size, d))
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(d)
        self.action_head = nn.Linear(d, config.action_dim)
        self.register_buffer("proprio_mean", torch.zeros(config.proprio_dim))
        self.register_buffer("proprio_std", torch.ones(config.proprio_dim))
        self.register_parameter("skill_token", None)
        self._init_weights()

    def _init_weights(self) -> None:
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                # nanoGPT: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers)
                std = 0.02 / math.sqrt(2 * self.config.n_layers) if name.endswith(("attn.o", "mlp.fc2")) else 0.02
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for p in (self.image_pos, self.action_queries, self.task_embed.weight):
            nn.init.normal_(p, std=0.02)

    # ---- the network ---------------------------------------------------------------------------------------

    def _query_tokens(self, batch: Batch) -> torch.Tensor:
        """Run the transformer; returns the final-normed action-query tokens (B, K, D)."""
        return self.ln_f(self._encode(batch)[:, -self.config.chunk_size:])  # (B, K, D)

    def _encode(self, batch: Batch) -> torch.Tensor:
        """The transformer's output over the whole sequence, before the final norm (B, T, D)."""
        cfg = self.config
        proprio = batch["proprio"]
        B = proprio.shape[0]
        tokens = []
        if self.skill_token is not None:
            task = self.skill_token.expand(B, -1)  # (B, D)
        else:
            task = self.task_embed(batch["task_id"].long().reshape(B))  # (B, D)
        tokens.append(task.unsqueeze(1))  # (B, 1, D)
        proprio = (proprio.float() - self.proprio_mean) / self.proprio_std  # (B, P)
        tokens.append(self.proprio_proj(proprio).unsqueeze(1))  # (B, 1, D)
        for i, (cam, key) in enumerate(zip(cfg.cameras, cfg.image_keys)):
            img = batch[key]  # (B, S, S, 3) uint8
            # /255 then standardise to about zero mean, unit std; permute gives a channels-last view for free
            x = (img.permute(0, 3, 1, 2).float() - 127.5) / 64.0  # (B, 3, S, S)
            tokens.append(self.stems[cam](x) + self.image_pos[i])  # (B, g*g, D)
        tokens.append(self.action_queries.expand(B, -1, -1))  # (B, K, D)
        x = torch.cat(tokens, dim=1)  # (B, T, D)
        for block in self.blocks:
            x = block(x)  # (B, T, D)
        return x

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Behaviour-cloning loss on a batch with ``action`` (B, K, A) and ``action_is_pad`` (B, K).

        L1, as in ACT: it tracks precise targets better than MSE (whose gradient vanishes near the target) and
        is robust to the noisy, partly bang-bang expert labels (gripper commands are +/-1). The head is linear
        and the loss is taken before the clamp of ``predict_chunk``, so targets at exactly +/-1 keep a gradient
        (a tanh head would saturate there). Padded steps (past the episode end) are masked out.
        """
        self._check_batch(batch, training=True)
        return chunk_l1_loss(self.action_head(self._query_tokens(batch)), batch)  # (B, K, A) before the clamp

