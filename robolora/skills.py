"""SkillManager: attach, switch, blend and step LoRA skills at runtime on one frozen base policy (docs/design.md §4).

The policy is any module following robolora's policy protocol (``robolora.policy``, docs/policy.md). LoRA targets
are ``nn.Linear`` and ``nn.Conv2d`` layers and ``nn.MultiheadAttention`` projections; the manager drives *weights*:
a Linear's or a convolution's ``weight``, or an attention module's ``in_proj_weight`` (q/k/v's row blocks together), ``q/k/v_proj_weight`` and
``out_proj.weight``.

Three modes, chosen per use (``SkillManager(policy, mode=...)``):

- ``bank``: on attach, each skill's merged weights W0 + s B A are computed once for every weight it targets (one
  copy of the targeted weights per skill). A switch rebinds each driven weight to the skill's tensor:
  O(layers) dictionary writes, no arithmetic. The original ``nn.Parameter`` (W0) is never written; the plain base
  rebinds it. Rebinding moves the weight's data pointer, so CUDA graphs must use ``inplace``.
- ``inplace``: one set of weights; a switch copies W0 + ΔW into them (computed from the pristine W0 in the
  requesting thread, so exact and never W - ΔW), and the plain base copies W0 back. Memory-light and
  pointer-stable: compiled graphs and CUDA graphs stay valid. ``cache_merged=True`` keeps every skill's merged
  weights (bank-sized memory) so a switch is only the copy.
- ``unmerged``: W0 stays bound and the active skill's low-rank path runs beside it; a switch rebinds one
  (A, w s B) pair per layer. A blend stacks the skills' A's and weighted B's into one pair, so it costs one rank-sum
  matmul pair per layer.

While a manager drives a policy, each wrapper's forward is replaced by its base module's own forward (bank,
inplace), so a step runs exactly the plain base's code, or by ``_unmerged_forward`` (one fused extra GEMM pair per
Linear; W0 + the skill's delta bound for the call for an attention module). The LoRA layers' active set and merge
bookkeeping stay empty: drive skills through the manager only, and do not call ``merge``/``unmerge``/
``set_active_adapter`` on a managed policy (with a bank tensor bound they would write into it). ``close()`` hands
the policy back as it was. Move the policy to its device before creating the manager.

Skill conditioning and chunk execution are the manager's own state: one skill-token Parameter it owns (installed
through the policy's ``set_skill_token`` hook and written in place on a switch) and one ``ChunkExecutor`` per
skill (the adapter's "execution", else the policy's ``spec.execution``); the manager never writes the policy's
attributes. A skill's residual action head (``robolora.residual``, adapter.json "residual") is part of its switch:
a frozen copy made on attach is installed through the policy's ``set_action_residual`` hook when the applied skill's
head differs from the installed one (None for a skill without one, the plain base and blends; a blend of skills
carrying heads is refused, a head has no weighted sum). Like the token, no tensor is made on a switch. A compiled
policy recompiles for each installed head (its graph reads the head), so compile with the heads installed in turn.

Threading: ``activate``/``blend`` may be called from any thread. They build the new state in the caller's thread
and leave it as the pending request (the last one wins); every step applies the pending request at its start while
holding the step lock for the whole step. A switch therefore takes effect at the next tick boundary, the skill token
switches together with the weights, and no step sees half a switch. ``attach``/``detach``/``close`` wait for the
running step. Applying a switch resets the new skill's executor and calls ``policy.reset()``: the old skill's
queued actions are dropped and the new skill is queried at the next ``select_action``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robolora.adapters import SkillAdapter, execution_of, load_adapter
from robolora.adapters import attach as attach_adapter
from robolora.adapters import detach as detach_adapter
from robolora.inject import lora_wrappers
from robolora.lora import LoRAConv2d, LoRALayer, LoRALinear
from robolora.lora_mha import call_with_weights
from robolora.policy import ChunkExecutor, Execution, Policy, act, check_policy, policy_device

logger = logging.getLogger(__name__)

Mode = Literal["bank", "inplace", "unmerged"]
MODES: tuple[str, ...] = ("bank", "inplace", "unmerged")
LIVE_TOLERANCE = 1e-6  # an adapter changing no probe action by more than this is reported as dead


@dataclass(frozen=True)
class LiveCheck:
    """The "adapter is live" probe run on attach.

    Attributes:
        skill: the skill's name in the manager.
        delta_norm: sqrt of the sum over layers of ||s B A||_F^2; 0 means the adapter changes no weight.
        output_change: max |skill action - plain base action| on ``policy.spec.probe(4)``.
    """

    skill: str
    delta_norm: float
    output_change: float

    @property
    def live(self) -> bool:
        return self.delta_norm > 0.0 and self.output_change > LIVE_TOLERANCE


@dataclass(eq=False)
class _Layer:
    """One driven weight: a Linear's ``weight``, or an attention weight shared by its projections (row blocks)."""

    units: list[LoRALayer]  # the LoRA layers writing this weight, in row order (one for a Linear)
    params: dict[str, Any]  # the owner module's _parameters, held here to skip nn.Module.__getattr__ on a switch
    key: str  # the parameter's name in ``params``
    original: nn.Parameter  # the owner's own weight (W0); the plain base binds it in bank mode
    # unmerged mode, per unit: (A (r, d_in), (w s B)^T (1, r, d_out)), or None
    terms: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    # unmerged mode, attention weights: W0 + the terms' delta, built at the first step after a switch and reused
    # until the next one (the module reads whole weights, so the LoRA path cannot run beside them per token)
    effective: torch.Tensor | None = None

    @property
    def term(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.terms[0]

    def configs(self) -> set[str]:
        return {name for unit in self.units for name in unit.configs}

    def pristine(self) -> torch.Tensor:
        if len(self.units) == 1:
            return self.units[0].pristine_weight
        return torch.cat([unit.pristine_weight for unit in self.units])

    def merged(self, spec: Mapping[str, float]) -> torch.Tensor:
        """W0 + the weighted deltas of the skills in ``spec`` (each unit's rows in fp32, one cast)."""
        blocks = []
        for unit in self.units:
            subset = {s: w for s, w in spec.items() if s in unit.configs}
            blocks.append(unit.merged_weight(subset) if subset else unit.pristine_weight)
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


@dataclass(frozen=True, eq=False)
class _Switch:
    spec: dict[str, float] | None  # None: the plain base
    bindings: Mapping[str, Any] = field(default_factory=dict)  # layer -> merged weight, or (A, Bt) term (unmerged)
    token: nn.Parameter | None = None
    # bank mode: (layer's _parameters dict, weight) for every layer, built for layer-set version ``layout``; a flat
    # tuple rebinds in ~60% of the time of a loop over the layers when the caches are cold (after a policy step)
    pairs: tuple[tuple[dict[str, Any], nn.Parameter], ...] = ()
    layout: int = -1
    executor: ChunkExecutor | None = None  # the skill's own chunk execution (adapter.json "execution"); None: base's
    residual: nn.Module | None = None  # the skill's residual action head (a frozen copy on the policy's device)


_PLAIN = _Switch(None)


@dataclass(eq=False)
class _Skill:
    switch: _Switch  # prebuilt; its bindings are dropped in inplace mode unless cache_merged
    check: LiveCheck


def _unmerged_attention(layers: list[_Layer], module: nn.MultiheadAttention, *args: Any, **kwargs: Any) -> Any:
    """An attention module's forward with W0 + (w s B) A bound for the call, per weight that has a LoRA term.

    The sum is built once per switch (``_Layer.effective``, cleared when a switch is applied), so a step costs what
    a bank step does and a switch stays as cheap as rebinding the terms."""
    bindings = []
    for layer in layers:
        if all(t is None for t in layer.terms):
            continue
        if layer.effective is None:
            blocks = []
            for unit, term in zip(layer.units, layer.terms):
                rows = layer.original if unit.weight_rows is None else layer.original[unit.weight_rows]
                blocks.append(rows if term is None else torch.addmm(rows, term[1][0].t(), term[0]))  # (d_out, d_in)
            layer.effective = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
        bindings.append((layer.params, layer.key, layer.effective))
    return call_with_weights(module, bindings, *args, **kwargs)


def _unmerged_forward(layer: _Layer, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    out = F.linear(x, layer.original, bias)  # (..., d_out)
    if layer.term is None:
        return out
    a, bt = layer.term
    h = F.linear(x, a)  # (..., r)
    if out.dim() == 3:  # out + h @ (w s B)^T as one fused op: a few microseconds less per layer than matmul + add
        return torch.baddbmm(out, h, bt if out.shape[0] == 1 else bt.expand(out.shape[0], -1, -1))  # (B, T, d_out)
    return out + h @ bt[0]


def _unmerged_conv_forward(layer: _Layer, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    out = conv._conv_forward(x, layer.original, conv.bias)  # (N, C_out, H', W')
    if layer.term is None:
        return out
    a, bt = layer.term
    h = F.conv2d(x, a.view(a.shape[0], *layer.original.shape[1:]), None, conv.stride, conv.padding, conv.dilation)
    return out + F.conv2d(h, bt[0].t().reshape(bt.shape[2], bt.shape[1], 1, 1))  # (w s B) as a 1x1 convolution


def _lora_term(lora: LoRALayer, weights: Mapping[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, (w s B)^T) with the skills' A's stacked, so one pair of matmuls adds the whole weighted sum."""
    parts = [lora.lora_A[n].detach() for n in weights]
    a = parts[0] if len(parts) == 1 else torch.cat(parts)  # (sum r, d_in)
    bt = torch.cat([(lora.lora_B[n].detach().float() * (w * lora.configs[n].scaling)).t() for n, w in weights.items()])
    bt = bt.to(a.dtype).unsqueeze(0).contiguous()  # (1, sum r, d_out)
    if not (torch.isfinite(a.float().sum()) and torch.isfinite(bt.float().sum())):
        raise ValueError(f"adapters {weights} give NaN/Inf LoRA terms (adapter values diverged?)")
    return a, bt


class SkillManager:
    """Holds several skill adapters on one policy and switches between them between control ticks.

    ``mode``: ``"bank"`` (fastest switch, one weight copy per skill), ``"inplace"`` (pointer-stable, memory-light)
    or ``"unmerged"`` (LoRA beside W0); see the module docstring. ``cache_merged`` (inplace only) keeps each skill's
    merged weights so a switch is a copy only. The manager steps the policy like the policy itself
    (``reset``/``select_action``/``predict_chunk``), so it drops into ``robolora.evaluate.evaluate``. ``policy`` is
    any module following robolora's policy protocol (``robolora.policy``).
    """

    def __init__(self, policy: Policy, mode: Mode = "bank", *, cache_merged: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is invalid; use one of {list(MODES)}")
        if cache_merged and mode != "inplace":
            raise ValueError(f"cache_merged=True only applies to mode='inplace' (got mode={mode!r}); "
                             "bank mode always keeps merged weights, unmerged mode needs none")
        self.spec = check_policy(policy)
        if getattr(policy, "skill_token", None) is not None:
            raise ValueError("the policy already has a skill token; the manager installs skill tokens itself, "
                             "call policy.set_skill_token(None) first")
        self.policy = policy
        self.mode: Mode = mode
        self.cache_merged = cache_merged
        self._layers: dict[str, _Layer] = {}
        self._skills: dict[str, _Skill] = {}
        self._token: nn.Parameter | None = None  # the manager's token Parameter, written in place on every switch
        self._token_installed = False
        self._residual: nn.Module | None = None  # the residual head installed through set_action_residual
        self._pending: _Switch | None = None
        self._applied: _Switch = _PLAIN
        self._plain: _Switch = _PLAIN
        self._layout = 0  # version of the set of driven layers
        self._base_executor = ChunkExecutor.for_spec(self.spec)  # the plain base's chunk execution
        self._executor = self._base_executor  # the applied switch's
        self._device = policy_device(policy)
        self._step_lock = threading.RLock()  # held for a whole step, and by attach/detach/close
        self._request_lock = threading.Lock()  # guards the pending request and the skill table
        self._adopt_layers()

    # ---- skills ---------------------------------------------------------------------------------------------

    @property
    def skills(self) -> list[str]:
        """Attached skill names, in attach order."""
        return list(self._skills)

    @property
    def active(self) -> str | dict[str, float] | None:
        """What the next step runs: a skill name, a blend {name: weight}, or None for the plain base."""
        with self._request_lock:
            spec = (self._pending or self._applied).spec
        if spec is None:
            return None
        if len(spec) == 1 and next(iter(spec.values())) == 1.0:
            return next(iter(spec))
        return dict(spec)

    @property
    def execution(self) -> Execution:
        """How the applied skill (or the plain base) executes its chunks."""
        return self._executor.execution

    def load(self, path: str | Path, name: str | None = None) -> LiveCheck:
        """Load an adapter folder (``robolora.adapters.load_adapter``) and attach it as ``name`` (default: its
        skill name); returns the live check."""
        adapter = load_adapter(path)
        return self.attach(name or adapter.skill, adapter)

    def attach(self, name: str, adapter: SkillAdapter) -> LiveCheck:
        """Attach ``adapter`` as skill ``name`` (inactive) and probe that it is live; all or nothing.

        The adapter is validated first (base fingerprint, layer names, shapes, token shape: see
        ``robolora.adapters.attach``); in bank mode its merged weights are computed here. An adapter whose delta is
        zero, or which does not change the probe batch's actions, is logged as a warning; the probe result is
        returned and kept (``live_check(name)``). Any failure leaves the policy's outputs and the manager unchanged.
        Waits for a running step.
        """
        with self._step_lock:
            if name in self._skills:
                raise ValueError(f"skill {name!r} is already attached; detach({name!r}) first or pick another name")
            base = self.spec.execution
            execution = execution_of(adapter, base)  # validated before anything changes
            if execution:
                execution = Execution(**{**base.to_dict(), **execution}).check(self.spec.chunk_size)
            executor = ChunkExecutor.for_spec(self.spec, execution) if execution else None
            if adapter.skill_token is not None:
                check_policy(self.policy, skill_token=True)
            attach_adapter(self.policy, adapter, name)
            new_layers: list[str] = []
            try:
                new_layers = self._adopt_layers()
                switch = dataclasses.replace(self._build_switch(name, adapter), executor=executor)
                skill = _Skill(switch if self._cached else _Switch(switch.spec, {}, switch.token,
                                                                    executor=switch.executor,
                                                                    residual=switch.residual),
                               self._probe(name, switch))
            except BaseException:
                self._forget(name, new_layers)
                raise
            with self._request_lock:
                self._skills[name] = skill
        if not skill.check.live:
            logger.warning("skill %r looks dead: its LoRA delta has norm %.3g and it changes the probe actions by "
                           "at most %.3g (tolerance %g); is it the untrained initialisation (B = 0) or a wrong file?",
                           name, skill.check.delta_norm, skill.check.output_change, LIVE_TOLERANCE)
        logger.info("skill %r attached (%s mode, %d layers)", name, self.mode, len(adapter.lora))
        return skill.check

    def detach(self, name: str) -> None:
        """Remove skill ``name``; if it is active (or pending) the policy falls back to the plain base."""
        with self._step_lock:
            self._check_names([name])
            with self._request_lock:
                if self._pending is not None and name in (self._pending.spec or {}):
                    self._pending = _PLAIN
                if name in (self._applied.spec or {}):
                    self._apply(_PLAIN)
                del self._skills[name]
            self._forget(name, [n for n, layer in self._layers.items() if layer.configs() == {name}])

    def close(self) -> None:
        """Detach every skill and hand the policy back: plain base, original forwards, no wrapper it added."""
        with self._step_lock:
            for name in self.skills:
                self.detach(name)
            self._pending = None
            self._apply(_PLAIN)
            for module in {id(m): m for layer in self._layers.values() for m in self._modules_of(layer)}.values():
                del module.forward
            self._layers.clear()

    def live_check(self, name: str) -> LiveCheck:
        """The live probe of skill ``name`` taken when it was attached."""
        self._check_names([name])
        return self._skills[name].check

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held per skill: its LoRA A/B, its token, its residual head, and the mode's copies (merged weights, scaled B's)."""
        out = {}
        for name, skill in list(self._skills.items()):
            tensors = [t for layer in self._layers.values() for unit in layer.units if name in unit.configs
                       for t in (unit.lora_A[name], unit.lora_B[name])]
            tensors += [] if skill.switch.token is None else [skill.switch.token]
            tensors += [] if skill.switch.residual is None else list(skill.switch.residual.parameters())
            for value in skill.switch.bindings.values():  # a merged weight, or per unit an (A, Bt) term or None
                tensors += [t for term in value if term is not None for t in term] if isinstance(value, list) \
                    else [value]
            out[name] = sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors}.values())
        return out

    # ---- switching ------------------------------------------------------------------------------------------

    def activate(self, name: str | None) -> None:
        """Switch to skill ``name``, or to the plain base with None, at the next step (from any thread)."""
        if name is not None and not isinstance(name, str):
            raise TypeError(f"activate() takes a skill name or None, got {type(name).__name__}; "
                            "use blend({name: weight}) for weighted sets")
        skill = None if name is None else self._skills.get(name)
        if skill is not None and skill.switch.layout == self._layout:  # prebuilt for these layers: no work at all
            with self._request_lock:
                if name not in self._skills:
                    self._check_names([name])
                self._pending = skill.switch
        else:
            self._request(None if name is None else {name: 1.0})

    def blend(self, weights: Mapping[str, float]) -> None:
        """Run the exact weighted sum of skills' deltas, W0 + sum_i w_i s_i B_i A_i, with the token sum_i w_i t_i,
        from the next step. Naive LoRA blends often fail on robot skills: measure success before relying on one."""
        spec = {str(k): float(v) for k, v in weights.items()}
        if not spec:
            raise ValueError(f"blend() needs at least one skill; attached: {self.skills}")
        bad = {k: v for k, v in spec.items() if not math.isfinite(v)}
        if bad:
            raise ValueError(f"blend weights must be finite, got {bad}")
        self._request(spec)

    def apply_pending(self) -> None:
        """Apply a requested switch now instead of at the next step (waits for a running step)."""
        with self._step_lock:
            self._take_pending()

    # ---- stepping (the policy's acting interface) -----------------------------------------------------------

    def reset(self, indices: Sequence[int] | None = None) -> None:
        """Forget queued actions (all, or those of the given batch elements) and reset the policy."""
        with self._step_lock:
            self._executor.reset(indices)
            self.policy.reset(indices)

    @torch.no_grad()
    def select_action(self, obs: Mapping[str, Any]) -> np.ndarray:
        """Apply any pending switch, then the active skill's next action for ``obs`` ((A,) or (B, A)), executed
        as that skill executes its chunks, holding the step lock throughout."""
        with self._step_lock:
            self._take_pending()
            return act(self._executor, self.policy.predict_chunk, self.spec, obs, self._device)

    @torch.no_grad()
    def predict_chunk(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Apply any pending switch, then ``policy.predict_chunk(batch)`` without gradients, under the step lock."""
        with self._step_lock:
            self._take_pending()
            return self.policy.predict_chunk(batch)

    # ---- internals ------------------------------------------------------------------------------------------

    @property
    def _cached(self) -> bool:
        """Whether each skill keeps its prebuilt bindings (all modes but inplace without cache_merged)."""
        return self.mode != "inplace" or self.cache_merged

    def _check_names(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self._skills]
        if unknown:
            raise KeyError(f"unknown skill(s) {unknown}; attached: {self.skills}")

    def _request(self, spec: dict[str, float] | None) -> None:
        switch = self._make_switch(spec)  # built here, in the caller's thread, not in the control loop
        with self._request_lock:
            if spec is not None and not all(n in self._skills for n in spec):
                self._check_names(list(spec))  # a concurrent detach removed one meanwhile
            self._pending = switch

    def _make_switch(self, spec: dict[str, float] | None) -> _Switch:
        if spec is None:
            self._plain = self._current(self._plain)
            return self._plain
        skills = [self._skills.get(n) for n in spec]
        if None in skills:
            self._check_names(list(spec))
        if len(skills) == 1 and next(iter(spec.values())) == 1.0:
            if not self._cached:
                return _Switch(skills[0].switch.spec, self._bindings(spec), skills[0].switch.token,
                               executor=skills[0].switch.executor, residual=skills[0].switch.residual)
            skills[0].switch = self._current(skills[0].switch)
            return skills[0].switch
        with_head = [n for n, skill in zip(spec, skills) if skill.switch.residual is not None]
        if with_head:
            raise ValueError(f"cannot blend {spec}: {with_head} carry a residual action head, which has no weighted "
                             "sum (it is nonlinear in the features); activate one skill at a time")
        tokens = [skill.switch.token for skill in skills]
        if any(t is None for t in tokens) and any(t is not None for t in tokens):
            with_token = [n for n, t in zip(spec, tokens) if t is not None]
            raise ValueError(f"cannot blend {list(spec)}: {with_token} carry a skill token and the others do not")
        token = None if tokens[0] is None else sum(w * t for w, t in zip(spec.values(), tokens))
        token = None if token is None else nn.Parameter(token, requires_grad=False)
        configs = {None if sk.switch.executor is None else sk.switch.executor.execution for sk in skills}
        executor = skills[0].switch.executor if len(configs) == 1 else None  # mixed executions: the base's
        return self._current(_Switch(dict(spec), self._bindings(spec), token, executor=executor))

    def _current(self, switch: _Switch) -> _Switch:
        """The switch stamped with the current layer set (in bank mode with its flat rebinding list for it)."""
        if switch.layout == self._layout:
            return switch
        pairs = () if self.mode != "bank" else tuple(
            (layer.params, layer.key, switch.bindings.get(name, layer.original)) for name, layer in self._layers.items())
        return dataclasses.replace(switch, pairs=pairs, layout=self._layout)

    def _bindings(self, spec: Mapping[str, float]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, layer in list(self._layers.items()):
            configs = layer.configs()
            if not any(s in configs for s in spec):
                continue
            if self.mode == "unmerged":
                out[name] = [_lora_term(unit, subset) if (subset := {s: w for s, w in spec.items()
                                                                      if s in unit.configs}) else None
                             for unit in layer.units]
            else:
                merged = layer.merged(spec)  # fp32 sum from the pristine W0, one cast; refuses NaN
                assert all(merged.data_ptr() != unit.pristine_weight.data_ptr() for unit in layer.units)
                out[name] = nn.Parameter(merged, requires_grad=False) if self.mode == "bank" else merged
        return out

    def _take_pending(self) -> None:
        with self._request_lock:
            switch, self._pending = self._pending, None
        if switch is not None and switch.spec != self._applied.spec:
            self._apply(switch)

    def _apply(self, switch: _Switch, reset_queue: bool = True) -> None:
        """Bind a switch's weights and token; caller holds the step lock. Never fails halfway."""
        if self.mode == "bank":
            switch = self._current(switch)
            for parameters, key, weight in switch.pairs:
                parameters[key] = weight  # what nn.Module.__setattr__ ends in, minus ~2 us of checks per layer
        elif self.mode == "unmerged":
            for name, layer in self._layers.items():
                terms = switch.bindings.get(name)
                layer.terms[:] = terms if terms is not None else [None] * len(layer.units)
                layer.effective = None
        else:
            with torch.no_grad():
                for name, layer in self._layers.items():
                    source = switch.bindings.get(name)
                    if source is not None:
                        layer.original.copy_(source)
                    elif name in self._applied.bindings:
                        layer.original.copy_(layer.pristine())
        self._install_token(switch.token)
        if switch.residual is not self._residual:  # the prebuilt head: no tensor is made here
            self.policy.set_action_residual(switch.residual)
            self._residual = switch.residual
        if reset_queue:
            self._executor = switch.executor or self._base_executor
            self._executor.reset()
            self.policy.reset()
        # inplace without a cache keeps only which layers it wrote, not a second copy of the merged weights
        self._applied = switch if self._cached else _Switch(switch.spec, dict.fromkeys(switch.bindings), switch.token,
                                                            executor=switch.executor, residual=switch.residual)

    def _install_token(self, token: nn.Parameter | None) -> None:
        """Bind the skill token through the policy's hook: the manager's one Parameter, written in place (so it is
        pointer-stable in every mode); the hook is called only when the token appears or disappears."""
        if token is None:
            if self._token_installed:
                self.policy.set_skill_token(None)
                self._token_installed = False
            return
        if self._token is None or self._token.shape != token.shape:
            self._token = nn.Parameter(torch.empty_like(token), requires_grad=False)
            self._token_installed = False
        with torch.no_grad():
            self._token.copy_(token)
        if not self._token_installed:
            self.policy.set_skill_token(self._token)
            self._token_installed = True

    @staticmethod
    def _modules_of(layer: _Layer) -> list[nn.Module]:
        """The wrapper modules whose forward the manager replaced for this weight."""
        return [unit if isinstance(unit, LoRALinear) else unit.__dict__["_wrapper"] for unit in layer.units]

    def _adopt_layers(self) -> list[str]:
        """Take over every wrapper not yet driven: install the mode's forward; returns the new weights' names."""
        driven = {id(m) for layer in self._layers.values() for m in self._modules_of(layer)}
        new = {n: m for n, m in lora_wrappers(self.policy).items() if id(m) not in driven}
        for name, wrapper in new.items():
            if "forward" in vars(wrapper):
                raise ValueError(f"{name} is already driven by another SkillManager; close() that one first")
            units = [wrapper] if isinstance(wrapper, LoRALinear) else list(wrapper.projections.values())
            for unit in units:
                if unit.merged is not None or unit.active:
                    raise ValueError(f"{name} has adapters merged or active (merged={unit.merged}, "
                                     f"active={unit.active}); call robolora.unmerge(policy) and "
                                     "set_active_adapter(policy, None) first")
        added = []
        for name, wrapper in new.items():
            if isinstance(wrapper, LoRALinear):
                layer = _Layer([wrapper], wrapper.base_layer._parameters, "weight", wrapper.base_layer.weight, [None])
                if self.mode != "unmerged":
                    wrapper.forward = wrapper.base_layer.forward
                elif isinstance(wrapper, LoRAConv2d):
                    wrapper.forward = functools.partial(_unmerged_conv_forward, layer, wrapper.base_layer)
                else:
                    wrapper.forward = functools.partial(_unmerged_forward, layer, wrapper.base_layer.bias)
                self._layers[name] = layer
                added.append(name)
                continue
            layers = []
            for units in wrapper.weight_groups().values():
                for unit in units:
                    unit.__dict__["_wrapper"] = wrapper
                first = units[0]
                params = first.weight_owner._parameters
                layer = _Layer(units, params, first.weight_name, params[first.weight_name], [None] * len(units))
                key = f"{name}.{first.weight_name}" if first.weight_owner is wrapper.base_layer \
                    else f"{name}.out_proj.weight"
                self._layers[key] = layer
                layers.append(layer)
                added.append(key)
            wrapper.forward = (functools.partial(_unmerged_attention, layers, wrapper.base_layer)
                               if self.mode == "unmerged" else wrapper.base_layer.forward)
        self._layout += bool(new)
        return added

    def _build_switch(self, name: str, adapter: SkillAdapter) -> _Switch:
        token = None
        if adapter.skill_token is not None:
            like = next(iter(self._layers.values())).original if self._layers else next(self.policy.parameters())
            token = nn.Parameter(adapter.skill_token.detach().to(device=like.device, dtype=like.dtype).clone(), False)
            if not torch.isfinite(token).all():
                raise ValueError(f"skill {name!r}: the skill token holds NaN/Inf; this adapter is unusable")
        residual = None
        if adapter.residual is not None:  # validated by attach_adapter (hook, sizes, finite)
            residual = copy.deepcopy(adapter.residual).to(self._device).eval().requires_grad_(False)
        return _Switch({name: 1.0}, self._bindings({name: 1.0}), token, residual=residual)

    @torch.no_grad()
    def _probe(self, name: str, switch: _Switch) -> LiveCheck:
        """Plain-base vs skill actions on a fixed batch; restores the applied state (and keeps the action queue)."""
        delta = math.sqrt(sum(float(unit.delta_weight(name).float().square().sum())
                              for layer in self._layers.values() for unit in layer.units if name in unit.configs))
        batch = {k: v.to(self._device) for k, v in self.spec.probe(4).items()}
        previous, training = self._applied.spec, self.policy.training
        if training:
            self.policy.eval()
        try:
            self._apply(_PLAIN, reset_queue=False)
            plain = self.policy.predict_chunk(batch)
            self._apply(switch, reset_queue=False)
            out = self.policy.predict_chunk(batch)
            if not torch.isfinite(out).all():
                raise ValueError(f"skill {name!r} gives NaN/Inf actions on the probe batch (A, B or the token "
                                 "overflow); this adapter is unusable")
            change = float((out - plain).abs().max())
        finally:
            self._apply(_PLAIN, reset_queue=False)
            if previous is not None:
                self._apply(self._make_switch(previous), reset_queue=False)
            if training:
                self.policy.train()
        return LiveCheck(name, delta, change)

    def _forget(self, name: str, unwrap: list[str]) -> None:
        """Remove adapter ``name`` from the policy and unwrap the wrappers of the given weights that no longer
        hold any adapter."""
        if any(name in layer.configs() for layer in self._layers.values()):
            detach_adapter(self.policy, name)
        wrappers = {id(w): (n, w) for n, w in lora_wrappers(self.policy).items()}
        candidates = {id(m) for layer_name in unwrap if layer_name in self._layers
                      for m in self._modules_of(self._layers[layer_name])}
        for key in candidates:
            wrapper_name, wrapper = wrappers[key]
            if wrapper.adapters:
                continue
            for layer_name, layer in list(self._layers.items()):
                if any(m is wrapper for m in self._modules_of(layer)):
                    layer.params[layer.key] = layer.original
                    del self._layers[layer_name]
            self._layout += 1
            del wrapper.forward
            for param_name, param in wrapper.base_layer.named_parameters():
                param.requires_grad_(wrapper.base_requires_grad[param_name])
            parent, _, attr = wrapper_name.rpartition(".")
            setattr(self.policy.get_submodule(parent) if parent else self.policy, attr, wrapper.base_layer)
