"""Module-tree surgery for LoRA (DESIGN.md §4): find target ``nn.Linear`` layers by name, wrap them in
``LoRALinear``, freeze everything else, and act on every wrapped layer at once (activate, merge, unmerge, remove,
strip back to plain ``nn.Linear``).

Target patterns are described in ``robolora.config`` (exact name, dotted suffix such as ``attn.q``, or
``re:<regex>`` matched with ``re.fullmatch``). Names are the model's qualified module names; a layer that is
already wrapped keeps its original name (``blocks.0.attn.q``, not ``blocks.0.attn.q.base_layer``).

Every function that changes the model either succeeds or leaves the model as it was.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from robolora.config import REGEX_PREFIX, LoRAConfig
from robolora.lora import AdapterSpec, LoRALinear, adapter_weights

logger = logging.getLogger(__name__)

_FUSED_ATTENTION = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def target_matches(name: str, pattern: str) -> bool:
    """True if the qualified module name matches one target pattern (exact, dotted suffix or ``re:<regex>``)."""
    if pattern.startswith(REGEX_PREFIX):
        return re.fullmatch(pattern[len(REGEX_PREFIX):], name) is not None
    return name == pattern or name.endswith("." + pattern)


def inject_lora(
    model: nn.Module, config: LoRAConfig, adapter_name: str = "default", *, generator: torch.Generator | None = None
) -> list[str]:
    """Add adapter ``adapter_name`` to every ``nn.Linear`` matching ``config.targets``; returns the names wrapped.

    Unwrapped layers are wrapped in ``LoRALinear`` (their weights frozen); wrapped layers get one more adapter.
    Raises ValueError, leaving the model unchanged, when a pattern matches nothing, when the adapter name is
    taken, or when the model holds fused attention modules that would bypass the wrapped projections.
    """
    _refuse_fused_attention(model)
    layers = _linear_layers(model)
    missing = [p for p in config.targets if not any(target_matches(n, p) for n in layers)]
    if missing:
        raise ValueError(
            f"target pattern(s) {missing} match no nn.Linear layer; layers: {sorted(layers)} "
            f"(patterns: exact name, dotted suffix like 'attn.q', or '{REGEX_PREFIX}<regex>')"
        )
    targets = [n for n in layers if any(target_matches(n, p) for p in config.targets)]
    taken = [n for n in targets if isinstance(layers[n], LoRALinear) and adapter_name in layers[n].adapters]
    if taken:
        raise ValueError(f"adapter {adapter_name!r} already exists in {taken}; remove it or pick another name")
    wrapped: list[tuple[str, LoRALinear]] = []
    extended: list[LoRALinear] = []
    try:
        for name in targets:
            layer = layers[name]
            if not isinstance(layer, LoRALinear):
                layer = LoRALinear(layer)
                wrapped.append((name, layer))
                _set_submodule(model, name, layer)
            layer.add_adapter(adapter_name, config, generator=generator)
            extended.append(layer)
    except Exception:
        for layer in extended:
            layer.remove_adapter(adapter_name)
        for name, layer in reversed(wrapped):
            for param_name, param in layer.base_layer.named_parameters():
                param.requires_grad_(layer.base_requires_grad[param_name])
            _set_submodule(model, name, layer.base_layer)
        raise
    logger.info("LoRA adapter %r (rank %d) added to %d layers", adapter_name, config.rank, len(targets))
    return targets


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every ``LoRALinear`` in the model by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def mark_only_lora_trainable(model: nn.Module, extra: Iterable[nn.Parameter] = ()) -> None:
    """Freeze every parameter except the LoRA A/B matrices and ``extra`` (e.g. a skill token)."""
    extra = list(extra)
    keep = {id(p) for layer in _require_lora(model).values() for p in (*layer.lora_A.values(), *layer.lora_B.values())}
    keep |= {id(p) for p in extra}
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)
    for param in extra:
        param.requires_grad_(True)


def count_parameters(model: nn.Module) -> dict[str, Any]:
    """Trainable and total parameter counts per layer and overall, plus the trainable percentage.

    Returns ``{"trainable": int, "total": int, "percent": float, "layers": {name: {"trainable", "total"}}}``;
    a LoRA layer counts its base weights and all its adapters under its own name.
    """
    wrappers = lora_layers(model)
    layers: dict[str, dict[str, int]] = {}
    for param_name, param in model.named_parameters():
        owner = param_name.rpartition(".")[0]
        owner = next((w for w in wrappers if owner == w or owner.startswith(w + ".")), owner)
        counts = layers.setdefault(owner, {"trainable": 0, "total": 0})
        counts["total"] += param.numel()
        counts["trainable"] += param.numel() if param.requires_grad else 0
    trainable = sum(c["trainable"] for c in layers.values())
    total = sum(c["total"] for c in layers.values())
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1), "layers": layers}


def set_active_adapter(model: nn.Module, spec: AdapterSpec | None) -> None:
    """Activate None, one adapter, or a weighted set in every LoRA layer (layers lacking one skip it)."""
    layers = _require_lora(model)
    weights = None if spec is None else _model_weights(layers, spec)
    for layer in layers.values():
        layer.set_active(None if weights is None else _layer_subset(layer, weights))


def merge_adapter(model: nn.Module, spec: AdapterSpec) -> None:
    """Merge one adapter or a weighted set into every LoRA layer; layers lacking them hold W0.

    On any error (e.g. a NaN delta) every layer already written is put back to its previous state.
    """
    layers = _require_lora(model)
    weights = _model_weights(layers, spec)
    done: list[tuple[LoRALinear, dict[str, float] | None]] = []
    try:
        for layer in layers.values():
            previous = layer.merged
            subset = _layer_subset(layer, weights)
            _merge_or_unmerge(layer, subset)
            done.append((layer, previous))
    except Exception:
        for layer, previous in reversed(done):
            _merge_or_unmerge(layer, previous)
        raise


def unmerge(model: nn.Module) -> None:
    """Restore W0 bit-exactly in every LoRA layer."""
    for layer in _require_lora(model).values():
        layer.unmerge()


def remove_adapter(model: nn.Module, name: str) -> None:
    """Detach an adapter from every layer holding it; it must not be merged anywhere. Wrappers stay."""
    layers = _require_lora(model)
    _model_weights(layers, name)
    merged = [n for n, layer in layers.items() if name in (layer.merged or {})]
    if merged:
        raise RuntimeError(f"adapter {name!r} is merged in {merged}; call unmerge(model) before removing it")
    for layer in layers.values():
        if name in layer.adapters:
            layer.remove_adapter(name)


def strip_lora(model: nn.Module, merge: AdapterSpec | None = None) -> list[str]:
    """Replace every ``LoRALinear`` with a plain ``nn.Linear`` holding W0 (``merge=None``) or W0 + the merged deltas.

    The new layers get new Parameters with the original layers' ``requires_grad``; returns the names replaced.
    All merged weights are computed (and checked finite) before the model is touched.
    """
    layers = _require_lora(model)
    weights = None if merge is None else _model_weights(layers, merge)
    plain: dict[str, nn.Linear] = {}
    for name, layer in layers.items():
        subset = None if weights is None else _layer_subset(layer, weights)
        weight = layer.merged_weight(subset) if subset else layer.pristine_weight.clone()
        plain[name] = _plain_linear(layer, weight)
    for name, linear in plain.items():
        _set_submodule(model, name, linear)
    logger.info("stripped LoRA from %d layers (merged: %s)", len(plain), weights)
    return list(plain)


def _merge_or_unmerge(layer: LoRALinear, weights: dict[str, float] | None) -> None:
    if weights:
        layer.merge(weights)
    else:
        layer.unmerge()


def _plain_linear(layer: LoRALinear, weight: torch.Tensor) -> nn.Linear:
    base = layer.base_layer
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=layer.base_requires_grad["weight"])
    if base.bias is not None:
        linear.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=layer.base_requires_grad["bias"])
    return linear.train(base.training)


def _linear_layers(model: nn.Module) -> dict[str, nn.Linear | LoRALinear]:
    """Candidate layers: every LoRALinear and every nn.Linear not already inside one, by qualified name."""
    layers: dict[str, nn.Linear | LoRALinear] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) or (isinstance(module, nn.Linear) and name.rpartition(".")[0] not in layers):
            layers[name] = module
    if "" in layers:
        raise ValueError("the model itself is a single layer; wrap it directly with LoRALinear(layer)")
    return layers


def _refuse_fused_attention(model: nn.Module) -> None:
    fused = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if isinstance(m, _FUSED_ATTENTION)]
    if fused:
        raise ValueError(
            f"the model contains fused attention modules {fused}: their fast path (eval mode, F.multi_head_attention"
            "_forward) reads the packed in_proj weight directly, so wrapped q/k/v/o projections would be silently "
            "bypassed. Write attention with separate q, k, v, o nn.Linear layers and "
            "F.scaled_dot_product_attention (as robolora.policies does), then inject LoRA."
        )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def _require_lora(model: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; call inject_lora(model, config) first")
    return layers


def _model_weights(layers: dict[str, LoRALinear], spec: AdapterSpec) -> dict[str, float]:
    """Validate a name or {name: weight} against the adapters attached anywhere in the model."""
    return adapter_weights(spec, sorted({a for layer in layers.values() for a in layer.adapters}))


def _layer_subset(layer: LoRALinear, weights: Mapping[str, float]) -> dict[str, float] | None:
    subset = {name: w for name, w in weights.items() if name in layer.adapters}
    return subset or None
