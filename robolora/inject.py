"""Module-tree surgery for LoRA (docs/design.md §4): find target layers by name, wrap them, freeze everything
else, and act on every wrapped layer at once (activate, merge, unmerge, remove, strip back to the plain modules).

Targets are ``nn.Linear`` layers (wrapped in ``LoRALinear``), ``nn.Conv2d`` layers (``LoRAConv2d``, the kernel read
as a C_out x C_in·kh·kw matrix) and the projections of ``nn.MultiheadAttention`` modules, named ``<module path>.q``, ``.k``, ``.v`` and ``.out_proj`` (the module is wrapped in
``robolora.lora_mha.LoRAMultiheadAttention``). Target patterns are described in ``robolora.config`` (exact name,
dotted suffix such as ``attn.q`` or ``self_attn.q``, or ``re:<regex>`` matched with ``re.fullmatch``). Names are
the model's qualified module names; a layer that is already wrapped keeps its original name (``blocks.0.attn.q``,
not ``blocks.0.attn.q.base_layer``).

Every function that changes the model either succeeds or leaves the model as it was.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from robolora.config import REGEX_PREFIX, LoRAConfig
from robolora.lora import AdapterSpec, LoRAConv2d, LoRALayer, LoRALinear, adapter_weights
from robolora.lora_mha import PROJECTIONS, LoRAMultiheadAttention, projection_slots

logger = logging.getLogger(__name__)

_FUSED_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
Wrapper = LoRALinear | LoRAMultiheadAttention


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
    _refuse_fused_layers(model)
    layers = _candidates(model)
    missing = [p for p in config.targets if not any(target_matches(n, p) for n in layers)]
    if missing:
        raise ValueError(
            f"target pattern(s) {missing} match no nn.Linear, nn.Conv2d or attention projection; layers: {sorted(layers)} "
            f"(patterns: exact name, dotted suffix like 'attn.q', or '{REGEX_PREFIX}<regex>')"
        )
    targets = [n for n in layers if any(target_matches(n, p) for p in config.targets)]
    taken = [n for n in targets if isinstance(layers[n], LoRALayer) and adapter_name in layers[n].adapters]
    if taken:
        raise ValueError(f"adapter {adapter_name!r} already exists in {taken}; remove it or pick another name")
    if config.dropout > 0 and any(not isinstance(layers[n], (nn.Linear, nn.Conv2d, LoRALinear)) for n in targets):
        raise ValueError(f"LoRA dropout={config.dropout} acts on a layer's input, which nn.MultiheadAttention does not "
                         "expose per projection; use dropout=0 with attention projection targets")
    wrapped: list[tuple[str, Wrapper]] = []
    extended: list[LoRALayer] = []
    try:
        for name in targets:
            layer = layers[name]
            if not isinstance(layer, LoRALayer):
                layer = _wrap(model, name, layer, wrapped)
            layer.add_adapter(adapter_name, config, generator=generator)
            extended.append(layer)
    except Exception:
        for layer in extended:
            layer.remove_adapter(adapter_name)
        for name, wrapper in reversed(wrapped):
            _unwrap(model, name, wrapper)
        raise
    logger.info("LoRA adapter %r (rank %d) added to %d layers", adapter_name, config.rank, len(targets))
    return targets


def _wrap(model: nn.Module, name: str, layer: nn.Module, wrapped: list[tuple[str, Wrapper]]) -> LoRALayer:
    """Wrap the module behind target ``name`` (a Linear, or the attention module of a projection); returns the
    target's LoRA layer."""
    if isinstance(layer, (nn.Linear, nn.Conv2d)):
        wrapper = LoRALinear(layer) if isinstance(layer, nn.Linear) else LoRAConv2d(layer)
        wrapped.append((name, wrapper))
        _set_submodule(model, name, wrapper)
        return wrapper
    parent, _, projection = name.rpartition(".")
    mha = model.get_submodule(parent)
    if not isinstance(mha, LoRAMultiheadAttention):
        mha = LoRAMultiheadAttention(mha)
        wrapped.append((parent, mha))
        _set_submodule(model, parent, mha)
    return mha.projections[projection]


def _unwrap(model: nn.Module, name: str, wrapper: Wrapper) -> None:
    """Put the wrapped module back (its base weights bound, their requires_grad restored)."""
    for param_name, param in wrapper.base_layer.named_parameters():
        param.requires_grad_(wrapper.base_requires_grad[param_name])
    _set_submodule(model, name, wrapper.base_layer)


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA layer (``LoRALinear`` or attention projection) in the model by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def lora_wrappers(model: nn.Module) -> dict[str, Wrapper]:
    """Every wrapped module (``LoRALinear`` or ``LoRAMultiheadAttention``) by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAMultiheadAttention))}


def target_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every LoRA target of the model, wrapped or not, by qualified name."""
    out = {}
    for name, layer in _candidates(model).items():
        if isinstance(layer, (nn.Linear, LoRALayer)):
            out[name] = (layer.out_features, layer.in_features)
        elif isinstance(layer, nn.Conv2d):  # the kernel as a matrix, as LoRAConv2d reads it
            out[name] = (layer.out_channels, layer.weight[0].numel())
        else:  # a projection of a plain nn.MultiheadAttention
            weight = _projection_weight(layer, name.rpartition(".")[2])
            out[name] = (weight.shape[0], weight.shape[1])
    return out


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
    wrappers = lora_wrappers(model)
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
    """Replace every wrapper with its plain module (``nn.Linear``, ``nn.Conv2d``, ``nn.MultiheadAttention``) holding W0
    (``merge=None``) or W0 + the merged deltas.

    The new layers get new Parameters with the original layers' ``requires_grad``; returns the names replaced.
    All merged weights are computed (and checked finite) before the model is touched.
    """
    layers = _require_lora(model)
    weights = None if merge is None else _model_weights(layers, merge)
    plain: dict[str, nn.Module] = {}
    for name, wrapper in lora_wrappers(model).items():
        units = [wrapper] if isinstance(wrapper, LoRALinear) else list(wrapper.projections.values())
        merged = []
        for unit in units:
            subset = None if weights is None else _layer_subset(unit, weights)
            merged.append(unit.merged_weight(subset) if subset else unit.pristine_weight.clone())
        plain[name] = _plain_module(wrapper, units, merged)
    for name, module in plain.items():
        _set_submodule(model, name, module)
    logger.info("stripped LoRA from %d modules (merged: %s)", len(plain), weights)
    return list(plain)


def _merge_or_unmerge(layer: LoRALayer, weights: dict[str, float] | None) -> None:
    if weights:
        layer.merge(weights)
    else:
        layer.unmerge()


def _plain_module(wrapper: Wrapper, units: list[LoRALayer], weights: list[torch.Tensor]) -> nn.Module:
    """The wrapped module with fresh Parameters holding ``weights`` (one per LoRA layer, W0 or merged)."""
    base = wrapper.base_layer
    if isinstance(wrapper, LoRAConv2d):
        conv = nn.Conv2d(base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding,
                         base.dilation, base.groups, base.bias is not None, base.padding_mode, device="meta")
        conv.weight = nn.Parameter(weights[0], requires_grad=wrapper.base_requires_grad["weight"])
        if base.bias is not None:
            conv.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=wrapper.base_requires_grad["bias"])
        return conv.train(base.training)
    if isinstance(wrapper, LoRALinear):
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        linear.weight = nn.Parameter(weights[0], requires_grad=wrapper.base_requires_grad["weight"])
        if base.bias is not None:
            linear.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=wrapper.base_requires_grad["bias"])
        return linear.train(base.training)
    plain = copy.deepcopy(base)  # the attention module's config and its other weights (biases, bias_k, ...)
    named = dict(base.named_parameters())
    for group in wrapper.weight_groups().values():
        first = group[0]
        owner = plain.out_proj if first.weight_owner is base.out_proj else plain
        full = torch.cat([weights[units.index(p)] for p in group]) if first.weight_rows is not None \
            else weights[units.index(first)]
        setattr(owner, first.weight_name, nn.Parameter(full.detach().clone()))
    for param_name, param in plain.named_parameters():
        param.requires_grad_(wrapper.base_requires_grad[param_name])
    assert set(dict(plain.named_parameters())) == set(named)
    return plain


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Possible targets by qualified name: every LoRA layer, every nn.Linear and nn.Conv2d not inside a wrapper or an
    attention module, and the q/k/v/out_proj projections (as the attention module) of every plain
    nn.MultiheadAttention."""
    layers: dict[str, nn.Module] = {}
    owned: list[str] = []  # modules whose children are not targets of their own
    for name, module in model.named_modules():
        if any(name.startswith(o + ".") for o in owned):
            if isinstance(module, LoRALayer):
                layers[name] = module
            continue
        if isinstance(module, LoRALinear):
            layers[name] = module
            owned.append(name)
        elif isinstance(module, LoRAMultiheadAttention):
            owned.append(name)
        elif isinstance(module, nn.MultiheadAttention):
            for projection in PROJECTIONS:
                layers[f"{name}.{projection}"] = module
            owned.append(name)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            layers[name] = module
            owned.append(name)
    if "" in layers:
        raise ValueError("the model itself is a single layer; wrap it directly with LoRALinear(layer)")
    return layers


def _projection_weight(mha: nn.MultiheadAttention, projection: str) -> torch.Tensor:
    owner, weight_name, rows = projection_slots(mha)[projection]
    weight = getattr(owner, weight_name)
    return weight if rows is None else weight[rows]


def _refuse_fused_layers(model: nn.Module) -> None:
    fused = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if isinstance(m, _FUSED_LAYERS)]
    if fused:
        raise ValueError(
            f"the model contains fused transformer layers {fused}: their eval-mode fast path "
            "(torch._transformer_encoder_layer_fwd) reads the attention's packed weights through the layer itself, "
            "so LoRA on their projections would be bypassed or break it. Write the block yourself from "
            "nn.MultiheadAttention and nn.Linear layers (as robolora.policies.ACTPolicy does); LoRA reaches "
            "nn.MultiheadAttention's q/k/v/out_proj and every nn.Linear."
        )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def _require_lora(model: nn.Module) -> dict[str, LoRALayer]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; call inject_lora(model, config) first")
    return layers


def _model_weights(layers: dict[str, LoRALayer], spec: AdapterSpec) -> dict[str, float]:
    """Validate a name or {name: weight} against the adapters attached anywhere in the model."""
    return adapter_weights(spec, sorted({a for layer in layers.values() for a in layer.adapters}))


def _layer_subset(layer: LoRALayer, weights: Mapping[str, float]) -> dict[str, float] | None:
    subset = {name: w for name, w in weights.items() if name in layer.adapters}
    return subset or None
