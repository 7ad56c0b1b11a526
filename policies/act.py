"""ACT-style encoder-decoder policy on ``nn.MultiheadAttention``: images + proprio + task -> a chunk of K actions.

ACT (Zhao et al., 2023, "Learning Fine-Grained Bimanual Manipulation with Low-Cost Hardware") without its CVAE, as
LeRobot's ACT with ``use_vae=False``: the CVAE latent token becomes the task token. A transformer encoder reads

    [task token | proprio token | image tokens (grid x grid per camera)]

and a transformer decoder turns K learned action queries into K actions by cross-attending to the encoder output.
Unlike ACT (post-norm, DETR-style positions added to queries and keys in every layer) the blocks are pre-norm and
positions are added once to the input tokens, so self-attention is ``self_attn(h, h, h)`` and takes PyTorch's fused
fast path in eval mode under ``torch.no_grad``.

Attention is ``nn.MultiheadAttention`` (packed ``in_proj_weight``, ``out_proj``) on purpose: this is robolora's
second policy, different in kind from ``VisuomotorPolicy`` (separate q/k/v/o ``nn.Linear``), reached only through
the protocol (``robolora.policy``). LoRA targets its attention through the module's weights
(``robolora.lora_mha``: ``encoder.layers.0.self_attn.q`` ... ``.out_proj``) and ``linear1``/``linear2`` as layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from robolora.policy import ChunkedActing, Execution, chunk_l1_loss

from .common import CameraProprioPolicy
from .config import check_shared_fields

Batch = Mapping[str, Any]

_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=32, n_heads=2, n_encoder_layers=2, n_decoder_layers=1, stem_width=8, dropout=0.0),
    "base": dict(d_model=128, n_heads=4, n_encoder_layers=4, n_decoder_layers=2, stem_width=32, dropout=0.1),
}


@dataclass(frozen=True)
class ACTConfig:
    """Sizes and behaviour of ``ACTPolicy``. Two presets:

    - ``tiny``: d=32, 2 encoder + 1 decoder layers, 2 heads (~60 k parameters), for tests.
    - ``base``: d=128, 4 encoder + 2 decoder layers, 4 heads (~1.6 M parameters), CPU-trainable.

    Attributes:
        image_size: side of the square uint8 camera images in pixels (the env's ``image_size``).
        cameras: camera names read from observations as ``rgb_<camera>``; each has its own conv stem.
        proprio_dim: length of the proprioception vector.
        action_dim: action size; actions live in [-1, 1].
        num_tasks: rows of the task-id embedding (the multi-task base's tasks).
        d_model: transformer width.
        n_heads: attention heads; must divide ``d_model`` (an even count lets self-attention use the fast path).
        n_encoder_layers, n_decoder_layers: pre-norm blocks of the encoder and the decoder.
        mlp_ratio: hidden width of each block's feed-forward layer as a multiple of ``d_model``.
        chunk_size: K, actions predicted per query (one learned decoder query each).
        n_action_steps: actions of each chunk executed before re-querying (1..K).
        temporal_ensemble: ACT temporal-ensembling coefficient m, or None; requires ``n_action_steps == 1``.
        patch_grid: side of the image-token grid per camera; the stem halves the image per conv down to it.
        stem_width: channels of the first stem conv; doubles per conv up to ``d_model``.
        dropout: dropout in attention weights and residual branches (ACT uses 0.1).
    """

    image_size: int = 64
    cameras: tuple[str, ...] = ("front",)
    proprio_dim: int = 10
    action_dim: int = 4
    num_tasks: int = 5
    d_model: int = 128
    n_heads: int = 4
    n_encoder_layers: int = 4
    n_decoder_layers: int = 2
    mlp_ratio: float = 4.0
    chunk_size: int = 8
    n_action_steps: int = 4
    temporal_ensemble: float | None = None
    patch_grid: int = 4
    stem_width: int = 32
    dropout: float = 0.1

    def __post_init__(self) -> None:
        check_shared_fields(self, (("image_size", 8), ("proprio_dim", 1), ("action_dim", 1), ("num_tasks", 1),
                                   ("d_model", 8), ("n_heads", 1), ("n_encoder_layers", 1), ("n_decoder_layers", 1),
                                   ("chunk_size", 1), ("n_action_steps", 1), ("patch_grid", 1), ("stem_width", 1)))
        try:
            self.execution.check(self.chunk_size)
        except ValueError as err:
            raise ValueError(f"ACTConfig: {err}") from None

    # ---- derived values ------------------------------------------------------------------------------------

    @property
    def execution(self) -> Execution:
        """The default chunk execution (``n_action_steps``, ``temporal_ensemble``)."""
        return Execution(self.n_action_steps, self.temporal_ensemble)

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.mlp_ratio * self.d_model))

    @property
    def image_keys(self) -> tuple[str, ...]:
        """Observation / batch keys holding the camera images, e.g. ``("rgb_front",)``."""
        return tuple(f"rgb_{c}" for c in self.cameras)

    @property
    def stem_channels(self) -> tuple[int, ...]:
        """Output channels of each stride-2 stem conv (a 1x1 projection to ``d_model`` follows, as in ACT)."""
        n_down = int(math.log2(self.image_size // self.patch_grid))
        return tuple(min(self.stem_width * 2**i, self.d_model) for i in range(n_down))

    # ---- construction and serialisation --------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ACTConfig:
        """A named preset (``tiny``, ``base``) with optional field overrides."""
        if name not in _PRESETS:
            raise ValueError(f"unknown ACT preset {name!r}; available: {sorted(_PRESETS)}")
        return cls.from_dict({**_PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields (tuples become lists)."""
        return {**dataclasses.asdict(self), "cameras": list(self.cameras)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ACTConfig:
        """Inverse of ``to_dict``; missing fields take their defaults, unknown fields are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ACTConfig field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**d)


class ConvStem(nn.Module):
    """Stride-2 3x3 ReLU convs from (B, 3, S, S) to a grid x grid feature map, then ACT's 1x1 input projection to
    ``d_model`` (ACT: ResNet-18 features -> ``encoder_img_feat_input_proj``). No BatchNorm: it couples samples and
    misbehaves under a frozen base."""

    def __init__(self, config: ACTConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in config.stem_channels:
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1), nn.ReLU(inplace=True)]
            c_in = c_out
        self.convs = nn.Sequential(*layers)
        self.input_proj = nn.Conv2d(c_in, config.d_model, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(self.convs(x))  # (B, D, g, g)
        return x.flatten(2).transpose(1, 2)  # (B, g*g, D)


class EncoderLayer(nn.Module):
    """Pre-norm self-attention + feed-forward. ``linear1``/``linear2`` sit on the layer itself (module paths
    ``encoder.layers.i.linear1``), as in ``nn.TransformerEncoderLayer``."""

    def __init__(self, config: ACTConfig) -> None:
        super().__init__()
        d = config.d_model
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, config.n_heads, dropout=config.dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.linear1 = nn.Linear(d, config.mlp_hidden)
        self.linear2 = nn.Linear(config.mlp_hidden, d)
        self.dropout = nn.Dropout(config.dropout)

    def self_attention(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)  # (B, T, D); one tensor as query, key and value: the eval fast path applies
        return x + self.dropout(self.self_attn(h, h, h, need_weights=False)[0])  # (B, T, D)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(F.relu(self.linear1(self.norm2(x))))  # (B, T, H)
        return x + self.dropout(self.linear2(h))  # (B, T, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.self_attention(x))  # (B, T, D)


class DecoderLayer(EncoderLayer):
    """Pre-norm self-attention over the action queries, cross-attention to the encoder output, feed-forward."""

    def __init__(self, config: ACTConfig) -> None:
        super().__init__(config)
        self.norm_cross = nn.LayerNorm(config.d_model)
        self.cross_attn = nn.MultiheadAttention(config.d_model, config.n_heads, dropout=config.dropout,
                                                batch_first=True)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = self.self_attention(x)  # (B, K, D)
        h = self.norm_cross(x)  # (B, K, D)
        x = x + self.dropout(self.cross_attn(h, memory, memory, need_weights=False)[0])  # (B, K, D), memory (B, T, D)
        return self.feed_forward(x)  # (B, K, D)


class LayerStack(nn.Module):
    """The encoder or the decoder: its layers, then a final LayerNorm (pre-norm layers leave the sum un-normed)."""

    def __init__(self, layers: list[EncoderLayer], d_model: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, *memory: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, *memory)  # (B, T, D)
        return self.norm(x)  # (B, T, D)


class ACTPolicy(CameraProprioPolicy, ChunkedActing, nn.Module):
    """The policy. Training: ``forward(batch) -> (loss, metrics)``; acting: ``reset()`` + ``select_action(obs)``.

    Batches are dicts as produced by ``robolora.data.BCDataset`` (batched): ``rgb_<camera>`` uint8 (B, H, W, 3),
    ``proprio`` float (B, P), ``task_id`` int64 (B,), and for training ``action`` (B, K, A) in [-1, 1] and
    ``action_is_pad`` bool (B, K).
    """

    # train-skill's default LoRA targets: every attention projection (robolora.lora_mha); --mlp adds linear1/2
    lora_targets: tuple[str, ...] = tuple(f"{attn}.{p}" for attn in ("self_attn", "cross_attn")
                                          for p in ("q", "k", "v", "out_proj"))
    lora_mlp_targets: tuple[str, ...] = ("linear1", "linear2")
    lora_conv_targets: tuple[str, ...] = (r"re:stems\..+",)  # the camera stems' convolutions (train-skill --conv)

    def __init__(self, config: ACTConfig) -> None:
        super().__init__()
        self.config = config
        d, g = config.d_model, config.patch_grid
        self.stems = nn.ModuleDict({cam: ConvStem(config) for cam in config.cameras})
        # 2D learned positions (DETR's PositionEmbeddingLearned, summed rather than concatenated) plus a camera id
        self.image_row_embed = nn.Parameter(torch.zeros(g, 1, d))
        self.image_col_embed = nn.Parameter(torch.zeros(1, g, d))
        self.camera_embed = nn.Parameter(torch.zeros(len(config.cameras), 1, d))
        self.proprio_proj = nn.Linear(config.proprio_dim, d)
        self.task_embed = nn.Embedding(config.num_tasks, d)
        self.token_pos_embed = nn.Parameter(torch.zeros(2, d))  # task and proprio tokens (ACT's 1d feature pos)
        self.encoder = LayerStack([EncoderLayer(config) for _ in range(config.n_encoder_layers)], d)
        self.query_embed = nn.Parameter(torch.zeros(config.chunk_size, d))
        self.decoder = LayerStack([DecoderLayer(config) for _ in range(config.n_decoder_layers)], d)
        self.action_head = nn.Linear(d, config.action_dim)
        self.register_buffer("proprio_mean", torch.zeros(config.proprio_dim))
        self.register_buffer("proprio_std", torch.ones(config.proprio_dim))
        self.register_parameter("skill_token", None)
        self._init_weights()

    def _init_weights(self) -> None:
        # DETR / ACT: Xavier-uniform for every matrix of the encoder and decoder (in_proj included, as MHA does)
        for module in (self.encoder, self.decoder):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for m in self.stems.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for p in (self.image_row_embed, self.image_col_embed, self.camera_embed, self.token_pos_embed,
                  self.query_embed, self.task_embed.weight):
            nn.init.normal_(p, std=0.02)

    # ---- the network ---------------------------------------------------------------------------------------

    def _encode(self, batch: Batch) -> torch.Tensor:
        """The encoder output over [task | proprio | image tokens], (B, T, D)."""
        cfg = self.config
        proprio = batch["proprio"]
        B = proprio.shape[0]
        if self.skill_token is not None:
            task = self.skill_token.expand(B, -1)  # (B, D)
        else:
            task = self.task_embed(batch["task_id"].long().reshape(B))  # (B, D)
        proprio = self.proprio_proj((proprio.float() - self.proprio_mean) / self.proprio_std)  # (B, D)
        tokens = [torch.stack([task, proprio], dim=1) + self.token_pos_embed]  # (B, 2, D)
        image_pos = (self.image_row_embed + self.image_col_embed).flatten(0, 1)  # (g*g, D), row-major like flatten
        for i, (cam, key) in enumerate(zip(cfg.cameras, cfg.image_keys)):
            x = (batch[key].permute(0, 3, 1, 2).float() - 127.5) / 64.0  # (B, 3, S, S) about zero mean, unit std
            tokens.append(self.stems[cam](x) + image_pos + self.camera_embed[i])  # (B, g*g, D)
        return self.encoder(torch.cat(tokens, dim=1))  # (B, T, D)

    def _query_tokens(self, batch: Batch) -> torch.Tensor:
        """The decoder output for the K action queries (B, K, D), final-normed: what the action head reads and
        ``features`` pools."""
        memory = self._encode(batch)  # (B, T, D)
        queries = self.query_embed.expand(memory.shape[0], -1, -1)  # (B, K, D)
        return self.decoder(queries, memory)  # (B, K, D)

    def _raw_chunk(self, batch: Batch) -> torch.Tensor:
        """Unclamped action chunk (B, K, A)."""
        return self.action_head(self._query_tokens(batch))  # (B, K, A)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Masked L1 behaviour-cloning loss (ACT's) on a batch with ``action`` (B, K, A) and ``action_is_pad``
        (B, K), taken before the clamp of ``predict_chunk`` so targets at exactly +/-1 keep a gradient."""
        self._check_batch(batch, training=True)
        return chunk_l1_loss(self._raw_chunk(batch), batch)

