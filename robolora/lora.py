"""LoRALinear: several named low-rank adapters beside one frozen ``nn.Linear`` (docs/design.md §4; Hu et al. 2021);
LoRAConv2d does the same for an ``nn.Conv2d``, its kernel read as a matrix.

For the frozen base layer (W0: d_out x d_in, bias b) and each adapter i (A_i: r x d_in ~ N(0, std^2), B_i: d_out x r
= 0, s_i = alpha / r or alpha / sqrt(r)) the layer computes, for the active set {i: w_i},

    h = W0 x + b + sum_i w_i * s_i * B_i A_i dropout_i(x)            (dropout only in training mode)

``merge(spec)`` writes W0 + sum_i w_i s_i B_i A_i into the base weight (computed in fp32, cast once) and
``unmerge()`` copies W0 back from a pristine copy taken at wrap time, so the base weight is bit-identical to W0
after any number of merges: never W - delta. Merging and activation are explicit calls; ``train()``/``eval()``
only switch dropout. An active adapter that is currently merged is skipped in the LoRA path (it is already
inside the weight); other active adapters still run beside the merged weight.

The pristine copy is a non-persistent buffer (it follows ``.to(device/dtype)``, is not a parameter and is not
saved on its own); ``state_dict()`` always stores W0 under ``base_layer.weight``, whatever is merged, and loading
a ``base_layer.weight`` refreshes the pristine copy. The base weight tensor must never alias ``pristine_weight``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robolora.config import LoRAConfig

AdapterSpec = str | Mapping[str, float]


class LoRALayer(nn.Module):
    """Named adapters ``lora_A[name]``/``lora_B[name]`` on one frozen weight matrix W0 (d_out x d_in).

    W0 is the rows ``weight_rows`` (all rows for None) of the parameter ``weight_name`` of ``weight_owner``: an
    ``nn.Linear``'s ``weight`` (``LoRALinear``), or q/k/v's block of an ``nn.MultiheadAttention``'s packed
    ``in_proj_weight`` (``robolora.lora_mha``). ``pristine_weight`` is a copy of W0 taken at wrap time; merging
    writes W0 + deltas into those rows and unmerging copies the pristine rows back.
    """

    pristine_weight: torch.Tensor
    weight_name: str = "weight"
    weight_rows: slice | None = None

    def __init__(self, pristine: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("pristine_weight", pristine.detach().clone(), persistent=False)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.configs: dict[str, LoRAConfig] = {}
        self._active: dict[str, float] = {}
        self._merged: dict[str, float] | None = None

    @property
    def weight_owner(self) -> nn.Module:
        """The module whose parameter ``weight_name`` holds W0."""
        raise NotImplementedError

    def bound_weight(self) -> torch.Tensor:
        """The weight the forward uses now (W0 plus whatever is merged), as a writable view of W0's rows."""
        weight = self.weight_owner._parameters[self.weight_name]
        return weight if self.weight_rows is None else weight[self.weight_rows]

    @property
    def in_features(self) -> int:
        """d_in of W0 as a matrix: a Linear's inputs, or a convolution's in_channels x kernel positions."""
        return self.pristine_weight[0].numel()

    @property
    def out_features(self) -> int:
        return self.pristine_weight.shape[0]

    @property
    def adapters(self) -> list[str]:
        """Names of the attached adapters, in attach order."""
        return list(self.configs)

    @property
    def active(self) -> dict[str, float]:
        """Adapters the forward adds, with their weights ({} for none)."""
        return dict(self._active)

    @property
    def merged(self) -> dict[str, float] | None:
        """Adapters currently merged into the base weight, or None."""
        return None if self._merged is None else dict(self._merged)

    def add_adapter(
        self, name: str, config: LoRAConfig | None = None, *, generator: torch.Generator | None = None, **fields: Any
    ) -> None:
        """Attach a fresh adapter (B = 0, so outputs are unchanged). ``fields`` override ``config``'s (rank=4...)."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name {name!r} is invalid; use a non-empty string without '.'")
        if name in self.configs:
            raise ValueError(f"adapter {name!r} already exists in this layer; remove_adapter({name!r}) first")
        if hasattr(self.lora_A, name):
            raise ValueError(f"adapter name {name!r} clashes with a torch.nn.ParameterDict attribute; pick another")
        config = LoRAConfig(**{**(config or LoRAConfig()).to_dict(), **fields})
        self._check_config(config)
        weight = self.pristine_weight
        gen_device = generator.device if generator is not None else "cpu"
        a = torch.randn(config.rank, self.in_features, generator=generator, device=gen_device) * config.std
        self.lora_A[name] = nn.Parameter(a.to(device=weight.device, dtype=weight.dtype))
        self.lora_B[name] = nn.Parameter(weight.new_zeros(self.out_features, config.rank))
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.configs[name] = config

    def remove_adapter(self, name: str) -> None:
        """Detach an adapter; it must not be merged. It also leaves the active set."""
        self._check_names([name])
        if self._merged is not None and name in self._merged:
            raise RuntimeError(f"adapter {name!r} is merged into the base weight; call unmerge() before removing it")
        for container in (self.lora_A, self.lora_B, self.lora_dropout):
            del container[name]
        del self.configs[name]
        self._active.pop(name, None)

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B @ A for one adapter, computed in fp32 and returned in the base weight's dtype."""
        self._check_names([name])
        delta = self.lora_B[name].detach().float() @ self.lora_A[name].detach().float()
        return (delta * self.configs[name].scaling).to(self.pristine_weight.dtype).view(self.pristine_weight.shape)

    def merged_weight(self, spec: AdapterSpec) -> torch.Tensor:
        """W0 + sum_i w_i * delta_i as a new tensor (fp32 sum, one cast); raises if it is not finite."""
        weights = self._as_weights(spec)
        total = self.pristine_weight.float().reshape(self.out_features, self.in_features)
        for name, w in weights.items():
            b, a = self.lora_B[name].detach().float(), self.lora_A[name].detach().float()
            total = torch.addmm(total, b, a, alpha=w * self.configs[name].scaling)
        merged = total.to(self.pristine_weight.dtype).view(self.pristine_weight.shape)
        if not torch.isfinite(merged.float().sum()):  # NaN/Inf poison the sum; ~15x faster than isfinite(x).all()
            raise ValueError(f"merging {weights} gives NaN/Inf weights (adapter values diverged?); nothing written")
        return merged

    def set_active(self, spec: AdapterSpec | None) -> None:
        """Choose the adapters the forward adds: None (none), a name (weight 1) or {name: weight}."""
        self._active = {} if spec is None else self._as_weights(spec)

    @torch.no_grad()
    def merge(self, spec: AdapterSpec) -> None:
        """Write W0 + the weighted deltas into the base weight in place (restarting from W0 if already merged)."""
        weights = self._as_weights(spec)
        self.bound_weight().copy_(self.merged_weight(weights))
        self._merged = weights

    @torch.no_grad()
    def unmerge(self) -> None:
        """Copy the pristine W0 back into the base weight (bit-exact); harmless when nothing is merged."""
        self.bound_weight().copy_(self.pristine_weight)
        self._merged = None

    def active_deltas(self) -> torch.Tensor | None:
        """sum_i w_i s_i B_i A_i over the active adapters not merged, differentiable (the weight-space form of the
        LoRA path, for modules that read their weights instead of calling a layer); None when there are none."""
        delta = None
        for name, w in self._active.items():
            if self._merged is not None and name in self._merged:
                continue
            term = (self.lora_B[name] @ self.lora_A[name]) * (w * self.configs[name].scaling)  # (d_out, d_in)
            delta = term if delta is None else delta + term
        return delta

    def extra_repr(self) -> str:
        return f"adapters={self.adapters}, active={self._active}, merged={self._merged}"

    def _check_config(self, config: LoRAConfig) -> None:
        """Refuse configs this kind of layer cannot honour (all are fine for a Linear)."""

    def _as_weights(self, spec: AdapterSpec) -> dict[str, float]:
        return adapter_weights(spec, self.adapters)

    def _check_names(self, names: Any) -> None:
        adapter_weights(dict.fromkeys(names, 1.0), self.adapters)


class LoRALinear(LoRALayer):
    """Wraps (does not subclass) a frozen ``nn.Linear`` and holds named adapters ``lora_A[name]``/``lora_B[name]``."""

    base_type: type[nn.Module] = nn.Linear

    def __init__(self, base_layer: nn.Module) -> None:
        if not isinstance(base_layer, self.base_type):
            raise TypeError(f"{type(self).__name__} wraps an nn.{self.base_type.__name__}, "
                            f"got {type(base_layer).__name__}")
        self._check_base(base_layer)
        super().__init__(base_layer.weight)
        self.base_layer = base_layer
        self.base_requires_grad = {n: p.requires_grad for n, p in base_layer.named_parameters()}
        base_layer.requires_grad_(False)
        self.register_state_dict_post_hook(_save_pristine_as_base)
        self.register_load_state_dict_pre_hook(_load_base_into_pristine)

    @property
    def weight_owner(self) -> nn.Module:
        return self.base_layer

    def _check_base(self, base_layer: nn.Module) -> None:
        """Refuse base layers this wrapper cannot adapt exactly (every nn.Linear is fine)."""

    def lora_path(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """B A x for one adapter (A: r x d_in, B: d_out x r), in the base layer's output layout."""
        return F.linear(F.linear(x, a), b)  # (..., r) -> (..., d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # includes any merged deltas
        for name, w in self._active.items():
            if self._merged is not None and name in self._merged:
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            h = self.lora_path(self.lora_dropout[name](x).to(a.dtype), a, b)
            out = out + (h * (w * self.configs[name].scaling)).to(out.dtype)
        return out


class LoRAConv2d(LoRALinear):
    """LoRA on a frozen ``nn.Conv2d`` (as PEFT's Conv2d LoRA): the kernel W0 (C_out, C_in, kh, kw) is read as the
    matrix C_out x (C_in·kh·kw), so A is r x (C_in·kh·kw) and B is C_out x r. The LoRA path is a convolution with A
    as r kernels (the base's stride, padding and dilation) followed by a 1x1 convolution with B, and the merged
    kernel is W0 + s·(B A) reshaped: ``merge``, ``unmerge``, bank switching and export work as for a Linear.
    Grouped convolutions and non-zero padding modes are refused (their kernel is not one matrix on the input).
    """

    base_type = nn.Conv2d

    def _check_base(self, base_layer: nn.Module) -> None:
        assert isinstance(base_layer, nn.Conv2d)
        if base_layer.groups != 1:
            raise ValueError(f"LoRA on a grouped nn.Conv2d (groups={base_layer.groups}) is not supported: its "
                             "kernel is not one matrix on the input; target the ungrouped convolutions only")
        if base_layer.padding_mode != "zeros":
            raise ValueError(f"LoRA on an nn.Conv2d with padding_mode={base_layer.padding_mode!r} is not supported "
                             "(only 'zeros'); target other layers")

    def lora_path(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        conv = self.base_layer
        kernel = a.view(a.shape[0], *self.pristine_weight.shape[1:])  # (r, C_in, kh, kw)
        h = F.conv2d(x, kernel, None, conv.stride, conv.padding, conv.dilation)  # (N, r, H', W')
        return F.conv2d(h, b.view(*b.shape, 1, 1))  # (N, C_out, H', W')


def adapter_weights(spec: AdapterSpec, attached: Iterable[str]) -> dict[str, float]:
    """Validate a name or {name: weight} against the attached adapter names; returns {name: weight}."""
    weights = {spec: 1.0} if isinstance(spec, str) else {str(k): float(v) for k, v in spec.items()}
    if not weights:
        raise ValueError("empty adapter set; pass a name or {name: weight} (None, where allowed, means no adapter)")
    attached = list(attached)
    unknown = [n for n in weights if n not in attached]
    if unknown:
        raise KeyError(f"unknown adapter(s) {unknown}; attached: {attached}")
    bad = {k: v for k, v in weights.items() if not math.isfinite(v)}
    if bad:
        raise ValueError(f"adapter weights must be finite, got {bad}")
    return weights


def _save_pristine_as_base(module: LoRALinear, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
    state_dict[prefix + "base_layer.weight"] = module.pristine_weight.detach()


def _load_base_into_pristine(module: LoRALinear, state_dict: Mapping[str, Any], prefix: str, *_: Any) -> None:
    value = state_dict.get(prefix + "base_layer.weight")
    if value is None or value.shape != module.pristine_weight.shape:
        return  # nothing to refresh; a shape mismatch is reported by the base layer's own load
    if module._merged is not None:
        where = prefix.rstrip(".") or "layer"
        raise RuntimeError(f"{where}: call unmerge() before loading base weights into a merged LoRA layer")
    with torch.no_grad():
        module.pristine_weight.copy_(value)
