"""LoRA on ``nn.MultiheadAttention``: q, k, v and out_proj as LoRA targets (docs/design.md §7, docs/policy.md).

``nn.MultiheadAttention`` does not call its projections as layers: its forward (and the fused eval-mode fast path,
``torch._native_multi_head_attention``) reads the packed ``in_proj_weight`` (q, k, v are its row blocks
[0, E), [E, 2E), [2E, 3E)), or ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim``, and
``out_proj.weight``. So LoRA works on those weights, not on the inputs:

- ``LoRAMultiheadAttention`` wraps (does not subclass) the module and holds four ``LoRAProjection`` children,
  ``q``, ``k``, ``v`` and ``out_proj``; each is a ``LoRALayer`` over its block of rows, so adapters, merge and
  bit-exact unmerge work exactly as for ``LoRALinear``. Target names follow the module path:
  ``encoder.layers.0.self_attn.q`` ... ``encoder.layers.0.self_attn.out_proj``.
- With no adapter active (nothing, or everything merged) the forward is the wrapped module's own forward on its
  own weights: the same code path (fast path included) and the same numbers as the plain module.
- With active unmerged adapters the forward binds W0 + sum_i w_i s_i B_i A_i for the adapted weights during the
  call (computed differentiably, so training reaches A and B) and restores W0's Parameter afterwards. The fused
  fast path reads the bound weights too, so it is never bypassed. LoRA dropout acts on a layer's input, which
  the module does not expose per projection, so projections refuse ``dropout > 0``.

``state_dict()`` always stores W0 (the pristine rows) under the wrapped module's names, like ``LoRALinear``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from robolora.config import LoRAConfig
from robolora.lora import LoRALayer

PROJECTIONS = ("q", "k", "v", "out_proj")


class LoRAProjection(LoRALayer):
    """One of q/k/v/out_proj of a wrapped ``nn.MultiheadAttention``: adapters on a block of rows of one weight.

    It is not called as a layer (``LoRAMultiheadAttention.forward`` reads the weights); ``weight_owner`` is the
    attention module (or its ``out_proj``), held outside the module tree so it is not registered twice.
    """

    def __init__(self, owner: nn.Module, weight_name: str, rows: slice | None) -> None:
        weight = owner._parameters[weight_name]
        super().__init__(weight if rows is None else weight[rows])
        self.weight_name = weight_name
        self.weight_rows = rows
        self.__dict__["_owner"] = owner

    @property
    def weight_owner(self) -> nn.Module:
        return self.__dict__["_owner"]

    def forward(self, *_: Any) -> torch.Tensor:
        raise RuntimeError("a LoRAProjection is not called as a layer; call the LoRAMultiheadAttention holding it")

    def _check_config(self, config: LoRAConfig) -> None:
        if config.dropout > 0:
            raise ValueError(f"LoRA dropout={config.dropout} acts on a layer's input, which nn.MultiheadAttention "
                             "does not expose per projection; use dropout=0 for attention targets")


def projection_slots(mha: nn.MultiheadAttention) -> dict[str, tuple[nn.Module, str, slice | None]]:
    """Where q, k, v and out_proj live: (owner module, parameter name, rows) for each."""
    if not isinstance(mha.out_proj, nn.Linear):
        raise ValueError(f"{type(mha).__name__}.out_proj is a {type(mha.out_proj).__name__}, not an nn.Linear; "
                         "LoRA cannot reach it")
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        slots = {p: (mha, "in_proj_weight", slice(i * e, (i + 1) * e)) for i, p in enumerate(("q", "k", "v"))}
    else:
        slots = {p: (mha, f"{p}_proj_weight", None) for p in ("q", "k", "v")}
    slots["out_proj"] = (mha.out_proj, "weight", None)
    return slots


class LoRAMultiheadAttention(nn.Module):
    """Wraps a frozen ``nn.MultiheadAttention``; its projections ``q``, ``k``, ``v``, ``out_proj`` take adapters."""

    def __init__(self, base_layer: nn.MultiheadAttention) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.MultiheadAttention):
            raise TypeError(f"LoRAMultiheadAttention wraps an nn.MultiheadAttention, got {type(base_layer).__name__}")
        slots = projection_slots(base_layer)
        self.base_layer = base_layer
        self.base_requires_grad = {n: p.requires_grad for n, p in base_layer.named_parameters()}
        base_layer.requires_grad_(False)
        for name, (owner, weight_name, rows) in slots.items():
            self.add_module(name, LoRAProjection(owner, weight_name, rows))
        self.register_state_dict_post_hook(_save_pristine_as_base)
        self.register_load_state_dict_pre_hook(_load_base_into_pristine)

    @property
    def projections(self) -> dict[str, LoRAProjection]:
        return {p: getattr(self, p) for p in PROJECTIONS}

    @property
    def adapters(self) -> list[str]:
        return list(dict.fromkeys(a for proj in self.projections.values() for a in proj.adapters))

    def weight_groups(self) -> dict[tuple[int, str], list[LoRAProjection]]:
        """Projections grouped by the parameter they share ((id(owner), name) -> projections in row order)."""
        groups: dict[tuple[int, str], list[LoRAProjection]] = {}
        for proj in self.projections.values():
            groups.setdefault((id(proj.weight_owner), proj.weight_name), []).append(proj)
        return groups

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        bindings = effective_weights(self.weight_groups().values(), lambda proj: proj.active_deltas())
        return call_with_weights(self.base_layer, bindings, query, key, value, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"adapters={self.adapters}"


def effective_weights(groups: Any, delta_of: Any) -> list[tuple[dict[str, Any], str, torch.Tensor]]:
    """For each group of projections sharing a parameter that gets a delta: (parameters dict, name, W + delta),
    assembled row block by row block from the currently bound weight (differentiable in the deltas)."""
    out = []
    for projections in groups:
        deltas = [delta_of(proj) for proj in projections]
        if all(d is None for d in deltas):
            continue
        first = projections[0]
        params = first.weight_owner._parameters
        bound = params[first.weight_name]
        if first.weight_rows is None:
            weight = bound + deltas[0].to(bound.dtype)
        else:
            blocks = [bound[p.weight_rows] if d is None else bound[p.weight_rows] + d.to(bound.dtype)
                      for p, d in zip(projections, deltas)]
            weight = torch.cat(blocks)  # (3E, E)
        out.append((params, first.weight_name, weight))
    return out


def call_with_weights(module: nn.Module, bindings: list[tuple[dict[str, Any], str, torch.Tensor]], *args: Any,
                      **kwargs: Any) -> Any:
    """``module(*args, **kwargs)`` with the given tensors bound in place of its parameters for this call only."""
    saved = [(params, name, params[name]) for params, name, _ in bindings]
    try:
        for params, name, weight in bindings:
            params[name] = weight
        return module(*args, **kwargs)
    finally:
        for params, name, weight in saved:
            params[name] = weight


def _save_pristine_as_base(module: LoRAMultiheadAttention, state_dict: dict[str, Any], prefix: str,
                           _meta: Any) -> None:
    for projections in module.weight_groups().values():
        first = projections[0]
        owner_prefix = "base_layer.out_proj." if first.weight_owner is module.base_layer.out_proj else "base_layer."
        pristine = torch.cat([p.pristine_weight for p in projections]) if first.weight_rows is not None \
            else first.pristine_weight
        state_dict[prefix + owner_prefix + first.weight_name] = pristine.detach()


def _load_base_into_pristine(module: LoRAMultiheadAttention, state_dict: Mapping[str, Any], prefix: str,
                             *_: Any) -> None:
    for proj in module.projections.values():
        owner_prefix = "base_layer.out_proj." if proj.weight_owner is module.base_layer.out_proj else "base_layer."
        value = state_dict.get(prefix + owner_prefix + proj.weight_name)
        if value is None:
            continue
        value = value if proj.weight_rows is None else value[proj.weight_rows]
        if value.shape != proj.pristine_weight.shape:
            continue  # reported by the wrapped module's own load
        if proj.merged is not None:
            raise RuntimeError(f"{prefix.rstrip('.') or 'layer'}: call unmerge() before loading base weights into a "
                               "merged LoRA attention layer")
        with torch.no_grad():
            proj.pristine_weight.copy_(value)
