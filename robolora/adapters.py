"""Skill adapter files: save, load, validate, attach, and convert to and from the PEFT layout (docs/design.md §4).

An adapter folder holds ``adapter.safetensors`` (``<layer>.lora_A`` (r, d_in) and ``<layer>.lora_B`` (d_out, r)
per adapted layer, plus the skill's ``skill_token`` (d_model,)) and ``adapter.json`` (skill name, LoRA config,
layers, the base fingerprint it was trained on, training data and metrics). Loading validates everything before
anything touches a policy: a truncated or corrupt file, a missing or extra tensor, a wrong shape, NaN/Inf values
or another base's fingerprint are each an error naming the problem; a refused attach leaves the policy as it was.
A folder may also hold the skill's completion head (``completion.safetensors`` + adapter.json's "completion",
``robolora.completion``), loaded and validated with the adapter, and its residual action head
(``residual.safetensors`` + adapter.json's "residual", ``robolora.residual``), installed through the policy's
``set_action_residual`` hook whenever the skill is made active (:func:`attach_active`) and removed by :func:`detach`
and :func:`deactivate`.

PEFT layout (peft >= 0.13): ``adapter_model.safetensors`` with ``base_model.model.<layer>.lora_A.weight`` /
``.lora_B.weight`` and ``adapter_config.json`` (``LoraConfig`` fields). PEFT has no place for a skill token, so it
travels beside them as ``robolora_skill.safetensors`` + ``robolora_skill.json``; PEFT ignores both. PEFT adapts an
``nn.MultiheadAttention`` at P as one module (``P.lora_A/B`` for the packed in_proj, ``P.base_layer.out_proj.lora_A/B``
with the same rank): :func:`to_peft` packs robolora's ``P.q``/``P.k``/``P.v``/``P.out_proj`` into it and
:func:`from_peft` splits it back.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import re
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from robolora.atomic import atomic_dir
from robolora.completion import FILE as COMPLETION_FILE
from robolora.completion import Completion
from robolora.config import LoRAConfig
from robolora.inject import inject_lora, lora_layers, remove_adapter, target_shapes
from robolora.lora import LoRAConv2d
from robolora.lora_mha import PROJECTIONS, LoRAMultiheadAttention
from robolora.policies import base_fingerprint
from robolora.policies.checkpoint import SHIPPED_DIR, resolve_shipped
from robolora.residual import FILE as RESIDUAL_FILE
from robolora.residual import ResidualHead
from robolora.policy import Execution, PolicySpec, check_policy

logger = logging.getLogger(__name__)

FORMAT = "robolora-adapter"
FORMAT_VERSION = 1
WEIGHTS, META = "adapter.safetensors", "adapter.json"
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."
SKILL_TOKEN = "skill_token"
_RESERVED = ("format", "format_version", "skill", "lora", "layers", "skill_token", "base_fingerprint", "parameters",
             "completion", "residual")


@dataclass
class SkillAdapter:
    """One skill in memory: LoRA A/B per layer, the skill token, the metadata of ``adapter.json``, the optional
    completion head and the optional residual action head (``robolora.residual``, trained by RL). The heads'
    parameters are not in ``num_parameters`` (they are not LoRA weights); ``skill_parameters`` counts everything the
    skill adds to the base, which the 2% budget bounds (``robolora.completion.BUDGET_PERCENT``)."""

    skill: str
    config: LoRAConfig
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer name -> (A (r, d_in), B (d_out, r))
    skill_token: torch.Tensor | None
    base_fingerprint: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    completion: Completion | None = None
    residual: ResidualHead | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for layer, (a, b) in self.lora.items():
            out[f"{layer}.lora_A"], out[f"{layer}.lora_B"] = a, b
        if self.skill_token is not None:
            out[SKILL_TOKEN] = self.skill_token
        return out

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    @property
    def residual_parameters(self) -> int:
        return 0 if self.residual is None else self.residual.num_parameters()

    @property
    def skill_parameters(self) -> int:
        """LoRA weights + skill token + residual head + completion head: what the skill adds to the base."""
        head = 0 if self.completion is None else self.completion.head.num_parameters
        return self.num_parameters + self.residual_parameters + head


def save_adapter(adapter: SkillAdapter, path: str | Path) -> Path:
    """Write ``adapter.safetensors`` + ``adapter.json`` (+ ``completion.safetensors`` and ``residual.safetensors``
    for the heads it carries) atomically (a folder appears complete or not at all)."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter.tensors().items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "skill": adapter.skill,
            "lora": adapter.config.to_dict(), "layers": sorted(adapter.lora), "skill_token": SKILL_TOKEN in tensors,
            "base_fingerprint": adapter.base_fingerprint, "parameters": adapter.num_parameters, **adapter.metadata}
    if adapter.completion is not None:
        meta["completion"] = adapter.completion.to_dict()
    if adapter.residual is not None:
        meta["residual"] = adapter.residual.to_dict()
    text = json.dumps(meta, indent=1, default=str)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS))
        if adapter.completion is not None:
            save_file(adapter.completion.tensors(), str(tmp / COMPLETION_FILE))
        if adapter.residual is not None:
            save_file(adapter.residual.tensors(), str(tmp / RESIDUAL_FILE))
        (tmp / META).write_text(text)
    return Path(path)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: an adapter folder holds {WEIGHTS} and {META}")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the adapter file is corrupt, re-export it") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(value).__name__}; the adapter file is corrupt "
                         "or hand-edited, re-export it")
    return value


def _fingerprint(value: Any, where: Path) -> str | None:
    """A stored ``base_fingerprint``: the base's sha256 hex digest, or None for an adapter not tied to a base."""
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: base_fingerprint must be a string (the sha256 hex digest of the base it was "
                         f"trained on) or null, got {value!r}; the adapter file is corrupt or hand-edited")
    return value


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: an adapter folder holds {WEIGHTS} and {META}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is truncated or corrupt ({e}); re-train or re-copy the adapter") from e


def shipped_skills_dir() -> Path:
    """Where the shipped skill adapters live: ``policies/pretrained/skills/<name>/`` in the installed package."""
    return SHIPPED_DIR / "skills"


def resolve_adapter(path: str | Path) -> Path:
    """An adapter folder: ``path`` when it exists, else the shipped skill of that name (``"wipe"``)."""
    return resolve_shipped(path, shipped_skills_dir(), META, "adapter folder",
                           "pass the folder robolora train-skill wrote (RUN/adapter)")


def load_adapter(path: str | Path) -> SkillAdapter:
    """Read and validate an adapter folder (robolora layout, or PEFT layout via :func:`from_peft`).

    ``path`` is a folder or the name of a shipped skill: ``load_adapter("wipe")`` works from any folder.
    """
    path = resolve_adapter(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is a file, not an adapter folder; pass the folder holding {META}")
    if not (path / META).exists() and (path / PEFT_CONFIG).exists():
        return from_peft(path)
    meta = _read_json(path / META)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / META} is not a robolora adapter (format {meta.get('format')!r})")
    try:
        config = LoRAConfig.from_dict(meta["lora"])
        layers, skill = list(meta["layers"]), str(meta["skill"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path / META} lacks or has an invalid field ({e}); the adapter file is corrupt") from e
    tensors = _read_tensors(path / WEIGHTS)
    token = tensors.pop(SKILL_TOKEN, None)
    if meta.get("skill_token") and token is None:
        raise ValueError(f"{path / WEIGHTS} lacks the tensor {SKILL_TOKEN!r} that {META} announces")
    lora = _pair_tensors(tensors, layers, config.rank, path / WEIGHTS)
    extra = {k: v for k, v in meta.items() if k not in _RESERVED}
    fingerprint = _fingerprint(meta.get("base_fingerprint"), path / META)
    adapter = SkillAdapter(skill, config, lora, token, fingerprint, extra, _read_completion(path, meta),
                           _read_residual(path, meta))
    _check_finite(adapter, path)
    return adapter


def _read_head_entry(path: Path, meta: dict[str, Any], entry: str, file: str,
                     fix: str) -> tuple[Mapping[str, Any], dict[str, torch.Tensor]] | None:
    """A skill head's ``adapter.json`` entry and its tensors file, which come together; None when the folder has
    neither. ``fix`` says how to repair a folder holding one without the other."""
    if entry not in meta and not (path / file).exists():
        return None
    if entry not in meta or not (path / file).is_file():
        named = f"a \"{entry}\" entry in {META}"
        have, lacks = (named, file) if entry in meta else (file, named)
        raise ValueError(f"{path} holds {have} but not {lacks}; re-copy the adapter folder or {fix}")
    if not isinstance(meta[entry], Mapping):
        raise ValueError(f"{path / META}: \"{entry}\" must be an object, got {meta[entry]!r}; the adapter file is "
                         "corrupt or hand-edited")
    return meta[entry], _read_tensors(path / file)


def _read_completion(path: Path, meta: dict[str, Any]) -> Completion | None:
    """The folder's completion head, validated; None when it has none."""
    head = _read_head_entry(path, meta, "completion", COMPLETION_FILE, "retrain the head (robolora train-completion)")
    return None if head is None else Completion.from_files(*head, path)


def _read_residual(path: Path, meta: dict[str, Any]) -> ResidualHead | None:
    """The folder's residual action head, validated; None when it has none."""
    head = _read_head_entry(path, meta, "residual", RESIDUAL_FILE, "rewrite it with robolora finetune-rl")
    return None if head is None else ResidualHead.from_files(*head, path)


def _pair_tensors(tensors: dict[str, torch.Tensor], layers: list[str], rank: int,
                  where: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    expected = {f"{layer}.lora_{m}" for layer in layers for m in "AB"}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise ValueError(f"{where}: missing tensors {missing[:6]}, unexpected tensors {extra[:6]}; "
                         "the file does not match its adapter.json (corrupt or hand-edited)")
    lora = {}
    for layer in layers:
        a, b = tensors[f"{layer}.lora_A"], tensors[f"{layer}.lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"{where}: {layer} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, expected "
                             f"({rank}, d_in) and (d_out, {rank}) for rank {rank}")
        lora[layer] = (a, b)
    return lora


def _check_finite(adapter: SkillAdapter, where: Path) -> None:
    bad = [name for name, t in adapter.tensors().items() if not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{where}: tensors {bad[:6]} hold NaN or Inf (training diverged?); this adapter is unusable")


def adapter_from_policy(policy: nn.Module, name: str, skill: str | None = None,
                        metadata: dict[str, Any] | None = None) -> SkillAdapter:
    """Collect adapter ``name`` (A/B of every layer holding it, and the policy's skill token) from a policy."""
    layers = {n: m for n, m in lora_layers(policy).items() if name in m.adapters}
    if not layers:
        raise KeyError(f"no layer holds adapter {name!r}; attached: "
                       f"{sorted({a for m in lora_layers(policy).values() for a in m.adapters})}")
    configs = {m.configs[name] for m in layers.values()}
    if len(configs) != 1:
        raise ValueError(f"adapter {name!r} has different configs in different layers: {configs}")
    config = configs.pop()
    config = LoRAConfig(**{**config.to_dict(), "targets": tuple(config.targets)})
    lora = {n: (m.lora_A[name].detach().clone(), m.lora_B[name].detach().clone()) for n, m in layers.items()}
    token = getattr(policy, "skill_token", None)
    return SkillAdapter(skill or name, config, lora, None if token is None else token.detach().clone(),
                        base_fingerprint(policy), dict(metadata or {}))


def attach(policy: nn.Module, adapter: SkillAdapter, name: str | None = None,
           check_fingerprint: bool = True) -> str:
    """Add ``adapter`` to ``policy`` under ``name`` (default: its skill name); validated first, all or nothing.

    Returns the name. The skill token is not installed here (that is activation's job): see
    :meth:`SkillAdapter.skill_token` and ``robolora.skills.SkillManager``.
    """
    name = name or adapter.skill
    if check_fingerprint and adapter.base_fingerprint is not None:
        actual = base_fingerprint(policy)
        if actual != adapter.base_fingerprint:
            trained = str(adapter.base_fingerprint)  # str(): an adapter built in code may hold a non-string
            raise ValueError(f"adapter {adapter.skill!r} was trained on base {trained[:16]}... "
                             f"but this policy is base {actual[:16]}...; load the base it was trained on "
                             f"(full fingerprints: adapter {adapter.base_fingerprint}, policy {actual})")
    shapes = target_shapes(policy)
    for layer, (a, b) in adapter.lora.items():
        if layer not in shapes:
            raise ValueError(f"adapter {adapter.skill!r} targets {layer!r}, which is not an nn.Linear, nn.Conv2d or "
                             "attention projection of this policy")
        d_out, d_in = shapes[layer]
        if a.shape[1] != d_in or b.shape[0] != d_out:
            raise ValueError(f"adapter {adapter.skill!r}: {layer} expects ({d_out}, {d_in}) "
                             f"but lora_B @ lora_A is ({b.shape[0]}, {a.shape[1]}); wrong base architecture")
    spec = getattr(policy, "spec", None) if hasattr(type(policy), "spec") else None
    token_dim = spec.skill_token_dim if isinstance(spec, PolicySpec) else None
    if adapter.skill_token is not None and token_dim is not None and adapter.skill_token.shape != (token_dim,):
        raise ValueError(f"adapter {adapter.skill!r}: skill token has shape {tuple(adapter.skill_token.shape)}, "
                         f"the policy needs ({token_dim},)")
    check_residual(policy, adapter)
    config = LoRAConfig(**{**adapter.config.to_dict(), "targets": tuple(adapter.lora)})
    inject_lora(policy, config, name)
    layers = lora_layers(policy)
    with torch.no_grad():
        for layer, (a, b) in adapter.lora.items():
            target = layers[layer]
            target.lora_A[name].copy_(a)
            target.lora_B[name].copy_(b)
    return name


def detach(policy: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer (it must not be merged), and its residual head if
    :func:`attach_active` installed it."""
    remove_adapter(policy, name)
    _remove_residual(policy, name)


def deactivate(policy: nn.Module) -> None:
    """Undo :func:`attach_active`'s activation: no active adapter, no skill token, no residual head. The adapters
    stay attached and the chunk execution stays as the skill set it."""
    from robolora.inject import set_active_adapter

    set_active_adapter(policy, None)
    if getattr(policy, "skill_token", None) is not None:
        policy.set_skill_token(None)
    _remove_residual(policy)


def check_residual(policy: nn.Module, adapter: SkillAdapter) -> None:
    """Refuse, naming the problem and the fix, a residual head ``policy`` cannot run: no ``set_action_residual``
    hook (TypeError), or a head made for other feature/chunk/action sizes or holding NaN/Inf (ValueError). Nothing
    to check for an adapter without one."""
    head = adapter.residual
    if head is None:
        return
    try:
        spec = check_policy(policy, residual=True)
    except TypeError as e:
        raise TypeError(f"adapter {adapter.skill!r} carries a residual action head, but {e}") from None
    try:
        head.check_fits(spec.feature_dim, spec.chunk_size, spec.action_dim, f"this {type(policy).__name__}")
    except ValueError as e:
        raise ValueError(f"adapter {adapter.skill!r}: {e}; attach it to the base it was trained on") from None
    if not all(torch.isfinite(t).all() for t in head.state_dict().values()):
        raise ValueError(f"adapter {adapter.skill!r}: its residual head holds NaN or Inf (RL diverged?); this adapter "
                         "is unusable")


def check_skill_budget(adapter: SkillAdapter, base_parameters: int,
                       budget_percent: float | None = None) -> dict[str, float]:
    """Raise ValueError unless everything the skill adds to the base (``SkillAdapter.skill_parameters``: LoRA weights,
    skill token, residual and completion heads) is within ``budget_percent`` (default
    ``robolora.completion.BUDGET_PERCENT``, 2%) of the base's ``base_parameters``; returns the counts."""
    from robolora.completion import BUDGET_PERCENT

    percent = BUDGET_PERCENT if budget_percent is None else budget_percent
    head = 0 if adapter.completion is None else adapter.completion.head.num_parameters
    counts = {"adapter_parameters": adapter.num_parameters, "residual_parameters": adapter.residual_parameters,
              "completion_parameters": head, "total_parameters": adapter.skill_parameters,
              "percent_of_base": 100 * adapter.skill_parameters / base_parameters}
    if adapter.skill_parameters > base_parameters * percent / 100:
        raise ValueError(f"skill {adapter.skill!r} adds {adapter.skill_parameters} parameters (LoRA + token "
                         f"{adapter.num_parameters}, residual head {adapter.residual_parameters}, completion head "
                         f"{head}), {counts['percent_of_base']:.3f}% of the base's {base_parameters}: over the "
                         f"{percent:g}% budget ({math.floor(base_parameters * percent / 100)}); use a smaller LoRA "
                         "rank or narrower heads (hidden)")
    return counts


# policy -> the skill whose residual head attach_active installed on it (detach/deactivate remove only that one)
_RESIDUAL_OWNER: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def _install_residual(policy: nn.Module, adapter: SkillAdapter, name: str) -> None:
    """Make the active skill's residual head the policy's (a frozen copy: the adapter's own head is never moved),
    or remove the head a previous attach_active installed when this skill has none."""
    if adapter.residual is None:
        _remove_residual(policy)
        return
    policy.set_action_residual(copy.deepcopy(adapter.residual).eval().requires_grad_(False))
    _RESIDUAL_OWNER[policy] = name


def _remove_residual(policy: nn.Module, name: str | None = None) -> None:
    owner = _RESIDUAL_OWNER.get(policy)
    if owner is not None and (name is None or owner == name):
        policy.set_action_residual(None)
        del _RESIDUAL_OWNER[policy]


EXECUTION_FIELDS = ("n_action_steps", "temporal_ensemble")


def validate_execution(execution: Mapping[str, Any] | None, config: Any) -> dict[str, Any] | None:
    """Check a skill's chunk-execution settings (``adapter.json`` "execution") against a policy's default
    ``Execution`` (``policy.spec.execution``) or any dataclass with the same fields (a policy config).

    Returns them as a plain dict (None when absent); raises ValueError naming the bad field or value. The range of
    ``n_action_steps`` against the chunk size is checked by :func:`skill_execution`.
    """
    if not execution:
        return None
    if not isinstance(execution, Mapping):
        raise ValueError(f"execution must be a mapping like {{'n_action_steps': 8}}, got {execution!r}")
    unknown = sorted(set(execution) - set(EXECUTION_FIELDS))
    if unknown:
        raise ValueError(f"execution has unknown field(s) {unknown}; allowed: {list(EXECUTION_FIELDS)}")
    out = dict(execution)
    if out.get("temporal_ensemble") is not None and "n_action_steps" not in out:
        out["n_action_steps"] = 1
    dataclasses.replace(config, **out)  # the config's own validation: range of n_action_steps, ensembling needs 1
    return out


def execution_of(adapter: SkillAdapter, config: Any) -> dict[str, Any] | None:
    """The adapter's validated execution settings for a policy whose default execution is ``config`` (an
    ``Execution``, or a config with its fields); None: the policy's own."""
    try:
        return validate_execution(adapter.metadata.get("execution"), config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"adapter {adapter.skill!r}: invalid \"execution\" in adapter.json ({e})") from e


def skill_execution(adapter: SkillAdapter, spec: PolicySpec) -> Execution | None:
    """The chunk execution the adapter asks for (``adapter.json`` "execution") on a policy with ``spec``: its
    settings over ``spec.execution``, checked against ``spec.chunk_size``; None when the adapter keeps the policy's."""
    execution = execution_of(adapter, spec.execution)
    if not execution:
        return None
    try:
        return Execution(**{**spec.execution.to_dict(), **execution}).check(spec.chunk_size)
    except ValueError as e:
        raise ValueError(f"adapter {adapter.skill!r}: invalid \"execution\" in adapter.json ({e})") from e


def attach_active(policy: nn.Module, adapter: SkillAdapter) -> str:
    """Attach ``adapter`` and make it the active skill: its LoRA weights, its skill token and its chunk execution
    (``adapter.json`` "execution") and its residual action head (``set_action_residual``; a previous skill's head
    installed here is removed when this one has none). Works on any protocol policy (``robolora.policy``): the execution is checked
    against ``policy.spec`` and applied through ``set_execution``, the token through ``set_skill_token``; everything
    is validated before anything changes. Returns the adapter's name."""
    from robolora.inject import set_active_adapter

    spec = check_policy(policy, skill_token=adapter.skill_token is not None)
    execution = skill_execution(adapter, spec)
    if execution is not None and not callable(getattr(policy, "set_execution", None)):
        raise TypeError(f"adapter {adapter.skill!r} carries its own chunk execution ({execution}) but "
                        f"{type(policy).__name__} has no set_execution(); give the policy robolora.policy."
                        "ChunkedActing or drop \"execution\" from the adapter")
    name = attach(policy, adapter)
    if execution is not None:
        policy.set_execution(**execution.to_dict())
    set_active_adapter(policy, name)
    if adapter.skill_token is not None:
        device = next(policy.parameters()).device
        token = adapter.skill_token.detach().to(device=device, dtype=torch.float32).clone()
        policy.set_skill_token(nn.Parameter(token, requires_grad=False))
    _install_residual(policy, adapter, name)
    return name


def attach_for_eval(policy: nn.Module, path: str | Path) -> str:
    """Load an adapter folder and make it the active skill (for ``robolora eval --skill``): see attach_active."""
    return attach_active(policy, load_adapter(path))


# ------------------------------------------------------------------------------------------------------ PEFT
SIDE_WEIGHTS, SIDE_META = "robolora_skill.safetensors", "robolora_skill.json"
PEFT_OUT_PROJ = ".base_layer.out_proj"  # PEFT's module for the out_proj of an nn.MultiheadAttention it wraps
QKV = ("q", "k", "v")
Delta = tuple[torch.Tensor, torch.Tensor, float]  # (A, B, scaling): the layer's delta is scaling * B @ A


def to_peft(adapter: SkillAdapter, path: str | Path, policy: nn.Module | None = None) -> Path:
    """Write the adapter in PEFT's layout (loadable with ``PeftModel.from_pretrained`` on the policy module).

    ``nn.Linear`` layers keep their A and B; an ``nn.Conv2d``'s A (r, C_in·kh·kw) and B (C_out, r) are written as
    PEFT's Conv2d LoRA holds them, (r, C_in, kh, kw) and (C_out, r, 1, 1). PEFT adapts an ``nn.MultiheadAttention`` at path P as one module: one
    A (r', E) and B (3E, r') for the packed ``in_proj_weight`` and a LoRA of the same rank r' on ``out_proj``. So
    robolora's ``P.q``/``P.k``/``P.v`` become in_proj A = their A stacked and B block-diagonal (each B in its
    projection's rows and its own columns), ``P.out_proj`` is padded with zeros to r', and r' with an alpha that
    keeps the adapter's scaling go to ``rank_pattern``/``alpha_pattern`` under the anchored key ``^P``. The blocks'
    columns are recorded in ``robolora_skill.json`` so :func:`from_peft` splits them back exactly. peft <= 0.21.2
    applies an attention out_proj's delta twice (:func:`peft_out_proj_applications`), so out_proj's B is written
    divided by the count the installed peft measures (recorded beside it) and that peft reproduces our outputs.

    A name alone cannot tell an attention projection from an ``nn.Linear`` called ``q`` or ``out_proj``, nor a
    convolution's kernel shape: pass the ``policy`` (plain or with LoRA attached) when the adapter targets
    ``nn.MultiheadAttention`` or ``nn.Conv2d``; without it every layer is written as an ``nn.Linear``. Raises ValueError, writing nothing, for attention PEFT cannot hold
    (kdim or vdim different from embed_dim).
    """
    c = adapter.config
    heads = [h for h, v in (("completion", adapter.completion), ("residual", adapter.residual)) if v is not None]
    if heads:
        logger.warning("to_peft: PEFT's layout has no place for the %s head(s) of adapter %r; they are not written "
                       "(keep robolora's layout, save_adapter, to carry them)", " and ".join(heads), adapter.skill)
    attention = _attention_modules(adapter, policy)
    projections = {f"{name}.{p}" for name in attention for p in PROJECTIONS}
    pairs = {layer: ab for layer, ab in adapter.lora.items() if layer not in projections}
    rank_pattern, alpha_pattern, columns = {}, {}, {}
    out_projs = [f"{name}.out_proj" for name in attention if f"{name}.out_proj" in adapter.lora]
    applications = peft_out_proj_applications() if out_projs else 1
    for name, mha in attention.items():
        rank, alpha, modules, columns[name] = _peft_attention(adapter, name, mha.embed_dim, applications)
        rank_pattern["^" + re.escape(name)], alpha_pattern["^" + re.escape(name)] = rank, alpha
        pairs.update(modules)
    kernels = _conv_kernels(adapter, policy)
    tensors = {}
    for module, (a, b) in pairs.items():
        if module in kernels:  # PEFT's Conv2d LoRA: A as r kernels (r, C_in, kh, kw), B as a 1x1 conv (C_out, r, 1, 1)
            a, b = a.reshape(a.shape[0], *kernels[module]), b.reshape(*b.shape, 1, 1)
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.detach().float().contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.detach().float().contiguous()
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "r": c.rank,
        "lora_alpha": c.alpha, "lora_dropout": c.dropout, "use_rslora": c.rslora, "bias": "none",
        "target_modules": sorted(set(adapter.lora) - projections | set(attention)),
        "init_lora_weights": "gaussian" if c.init_std is None else True, "fan_in_fan_out": False,
        "modules_to_save": None, "inference_mode": True, "use_dora": False, "revision": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }
    side = {"skill": adapter.skill, "base_fingerprint": adapter.base_fingerprint, "init_std": c.init_std}
    if columns:
        side["attention_columns"], side["peft_out_proj_applications"] = columns, applications
    if applications != 1:
        logger.warning("the installed peft applies an nn.MultiheadAttention's out_proj LoRA %d times "
                       "(huggingface/peft#3774): out_proj B is written divided by %d so it reproduces robolora's "
                       "outputs; a peft without that bug applies only 1/%d of the out_proj delta from this folder",
                       applications, applications, applications)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS))
        (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=1))
        if adapter.skill_token is not None:
            save_file({SKILL_TOKEN: adapter.skill_token.detach().float().contiguous()}, str(tmp / SIDE_WEIGHTS))
        (tmp / SIDE_META).write_text(json.dumps(side, indent=1))
    return Path(path)


def _conv_kernels(adapter: SkillAdapter, policy: nn.Module | None) -> dict[str, tuple[int, int, int]]:
    """(C_in, kh, kw) of every ``nn.Conv2d`` of ``policy`` the adapter targets (robolora keeps their A flattened)."""
    if policy is None:
        return {}
    modules = dict(policy.named_modules())
    out = {}
    for layer in adapter.lora:
        module = modules.get(layer)
        module = module.base_layer if isinstance(module, LoRAConv2d) else module
        if isinstance(module, nn.Conv2d):
            out[layer] = tuple(module.weight.shape[1:])
    return out


def _attention_modules(adapter: SkillAdapter, policy: nn.Module | None) -> dict[str, nn.MultiheadAttention]:
    """The ``nn.MultiheadAttention`` modules of ``policy`` (by path) whose projections the adapter targets; refuses
    those PEFT cannot hold."""
    if policy is None:
        return {}
    modules = dict(policy.named_modules())
    found = {}
    for layer in adapter.lora:
        name, _, projection = layer.rpartition(".")
        module = modules.get(name)
        module = module.base_layer if isinstance(module, LoRAMultiheadAttention) else module
        if projection in PROJECTIONS and isinstance(module, nn.MultiheadAttention):
            found[name] = module
    for name, mha in found.items():
        if not mha._qkv_same_embed_dim:
            raise ValueError(
                f"adapter {adapter.skill!r} targets the nn.MultiheadAttention {name!r}, whose kdim={mha.kdim} and "
                f"vdim={mha.vdim} differ from embed_dim={mha.embed_dim}: PEFT's LoRA for attention holds only a "
                "packed in_proj_weight (kdim == vdim == embed_dim), so it cannot hold this adapter; keep it in "
                "robolora's layout (save_adapter), or drop that module's projections from the adapter's targets")
    return found


def _peft_attention(adapter: SkillAdapter, name: str, embed_dim: int, out_proj_applications: int) -> tuple[
        int, float, dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, list[int]]]:
    """PEFT's LoRA for the attention module ``name``: its rank r', alpha', (A, B) of its in_proj and out_proj by PEFT
    module name, and the columns [lo, hi) of r' each of the adapter's projections occupies. out_proj's B is divided
    by the number of times PEFT applies it."""
    c, e = adapter.config, embed_dim
    targeted = [p for p in QKV if f"{name}.{p}" in adapter.lora]
    rank = max(len(targeted), 1) * c.rank
    alpha = c.scaling * (math.sqrt(rank) if c.rslora else rank)
    fold = c.scaling / _scaling(alpha, rank, c.rslora)  # 1.0 unless alpha' / r' rounds away from the scaling
    in_proj = torch.zeros(rank, e), torch.zeros(3 * e, rank)  # (A (r', E), B (3E, r'))
    out_proj = torch.zeros(rank, e), torch.zeros(e, rank)
    columns = {}
    for p in PROJECTIONS:
        if f"{name}.{p}" not in adapter.lora:
            continue
        a, b = adapter.lora[f"{name}.{p}"]
        if a.shape != (c.rank, e) or b.shape != (e, c.rank):
            raise ValueError(f"adapter {adapter.skill!r}: {name}.{p} has lora_A {tuple(a.shape)} and lora_B "
                             f"{tuple(b.shape)}, but that attention module has embed_dim {e} (expected ({c.rank}, "
                             f"{e}) and ({e}, {c.rank})); wrong base architecture")
        (dest_a, dest_b), row, lo = (out_proj, 0, 0) if p == "out_proj" else \
            (in_proj, QKV.index(p) * e, targeted.index(p) * c.rank)
        dest_a[lo:lo + c.rank] = a.detach()
        dest_b[row:row + e, lo:lo + c.rank] = b.detach() * (fold / out_proj_applications if p == "out_proj" else fold)
        columns[p] = [lo, lo + c.rank]
    return rank, alpha, {name: in_proj, name + PEFT_OUT_PROJ: out_proj}, columns


@functools.cache
def peft_out_proj_applications() -> int:
    """How many times the installed peft adds the LoRA delta of an ``nn.MultiheadAttention``'s out_proj: 2 while its
    ``MultiheadAttention.merge`` (used by every forward) adds it twice (peft <= 0.21.2 at least, huggingface/peft#3774),
    1 once fixed or when peft is not installed. Measured on a tiny module, leaving the global RNG as it was."""
    try:
        import peft
    except ImportError:
        return 1
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        probe = nn.Module()
        probe.attn = nn.MultiheadAttention(2, 1)
        w0 = probe.attn.out_proj.weight.clone()
        model = peft.get_peft_model(probe, peft.LoraConfig(r=1, lora_alpha=1, target_modules=["attn"]))
        out_proj = model.base_model.model.attn.base_layer.out_proj
        out_proj.lora_A["default"].weight.fill_(1.0)
        out_proj.lora_B["default"].weight.fill_(1.0)
        delta = out_proj.get_delta_weight("default").flatten()  # (4,), all 1
        applied = (model.merge_and_unload().attn.out_proj.weight - w0).flatten()
        return round(float(applied @ delta / (delta @ delta)))


def _scaling(alpha: float, rank: int, rslora: bool) -> float:
    """A LoRA module's scaling, computed as PEFT and LoRAConfig do."""
    return alpha / (math.sqrt(rank) if rslora else rank)


def from_peft(path: str | Path, skill: str | None = None) -> SkillAdapter:
    """Read a PEFT LoRA adapter folder (and robolora's skill-token side files when present).

    PEFT's LoRA on an ``nn.MultiheadAttention`` at P (modules ``P`` and ``P.base_layer.out_proj``) becomes
    robolora's ``P.q``, ``P.k``, ``P.v`` and ``P.out_proj``: split back into :func:`to_peft`'s blocks when
    ``robolora_skill.json`` records them and B is zero outside them; otherwise every projection gets the whole rank
    r' (A_p = A, B_p = B's rows of p: the same delta). Per-module ranks and alphas (``rank_pattern``,
    ``alpha_pattern``) become one robolora config: A and B are padded with zeros to the largest rank, and a module
    scaling that differs from the config's is multiplied into its B. An out_proj delta counts as many times as the
    peft that wrote the folder applies it (see :func:`peft_out_proj_applications`): as recorded by to_peft, else as
    the installed peft does.
    """
    path = Path(path)
    cfg = _read_json(path / PEFT_CONFIG)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path / PEFT_CONFIG}: peft_type {cfg.get('peft_type')!r}; only LORA adapters convert")
    if cfg.get("use_dora") or cfg.get("bias", "none") != "none":
        raise ValueError(f"{path}: PEFT options dora/bias have no robolora equivalent")
    pairs = _peft_pairs(path / PEFT_WEIGHTS)
    side_file = path / SIDE_META
    side = _read_json(side_file) if side_file.exists() else {}
    fingerprint = _fingerprint(side.get("base_fingerprint"), side_file)
    try:
        peft = LoRAConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), targets=tuple(sorted(pairs)),
                          dropout=float(cfg.get("lora_dropout", 0.0)), rslora=bool(cfg.get("use_rslora", False)),
                          init_std=side.get("init_std"))
        patterns = {k: [(re.compile(rf"(.*\.)?({key})$"), kind(value)) for key, value in (cfg.get(k) or {}).items()]
                    for k, kind in (("rank_pattern", int), ("alpha_pattern", float))}
    except (KeyError, TypeError, ValueError, AttributeError, re.error) as e:
        raise ValueError(f"{path / PEFT_CONFIG} lacks or has an invalid field ({e}); the adapter file is "
                         "corrupt") from e
    applications = side.get("peft_out_proj_applications")
    if applications is not None and applications not in (1, 2):
        raise ValueError(f"{side_file}: peft_out_proj_applications must be 1 or 2, got {applications!r}; the file is "
                         "corrupt or hand-edited")
    if applications is None and any(m + PEFT_OUT_PROJ in pairs for m in pairs):
        applications = peft_out_proj_applications()  # a folder PEFT wrote: convert what the installed peft runs
    deltas: dict[str, Delta] = {}
    for module, (a, b) in pairs.items():
        if module.endswith(PEFT_OUT_PROJ) and module[:-len(PEFT_OUT_PROJ)] in pairs:
            continue  # split with its attention module below
        rank = next((v for p, v in patterns["rank_pattern"] if p.match(module)), peft.rank)
        alpha = next((v for p, v in patterns["alpha_pattern"] if p.match(module)), peft.alpha)
        if a.shape[0] != rank:
            raise ValueError(f"{path / PEFT_WEIGHTS}: {module} has rank {a.shape[0]} but {PEFT_CONFIG} gives it rank "
                             f"{rank}; the files do not belong together")
        scaling = _scaling(alpha, rank, peft.rslora)
        out_proj = pairs.get(module + PEFT_OUT_PROJ)
        if out_proj is None:
            deltas[module] = (a, b, scaling)
        else:
            columns = (side.get("attention_columns") or {}).get(module)
            deltas.update(_split_attention(module, (a, b), out_proj, (scaling, scaling * applications), columns,
                                           path / PEFT_WEIGHTS))
            if peft.dropout > 0:
                logger.warning("%s: LoRA dropout %.3g dropped; robolora applies none to attention projections",
                               path, peft.dropout)
                peft = dataclasses.replace(peft, dropout=0.0)
    config, lora = _one_config(peft, deltas)
    token = None
    if (path / SIDE_WEIGHTS).exists():
        token = _read_tensors(path / SIDE_WEIGHTS).get(SKILL_TOKEN)
    adapter = SkillAdapter(skill or side.get("skill") or path.name, config, lora, token, fingerprint,
                           {"source": "peft"})
    _check_finite(adapter, path)
    return adapter


def _peft_pairs(where: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(lora_A, lora_B) of every PEFT module in ``adapter_model.safetensors``, by module name."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in _read_tensors(where).items():
        module, _, kind = key[len(PEFT_PREFIX):-len(".weight")].rpartition(".lora_")
        if not key.startswith(PEFT_PREFIX) or not key.endswith(".weight") or not module or kind not in ("A", "B"):
            raise ValueError(f"{where}: unexpected tensor {key!r} (expected {PEFT_PREFIX}<layer>.lora_A.weight / "
                             "lora_B.weight)")
        halves.setdefault(module, {})[kind] = value
    if not halves:
        raise ValueError(f"{where} holds no LoRA tensors; re-export the adapter")
    pairs = {}
    for module, half in halves.items():
        if set(half) != {"A", "B"}:
            raise ValueError(f"{where}: {module} has lora_{''.join(half)} but not its partner; the file is corrupt")
        a, b = half["A"], half["B"]
        if a.ndim == 4 and b.ndim == 4 and tuple(b.shape[2:]) == (1, 1):  # PEFT's Conv2d LoRA: the kernel as a matrix
            a, b = a.flatten(1), b.flatten(1)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{where}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, expected "
                             "(r, d_in) and (d_out, r), or PEFT's Conv2d pair (r, C_in, kh, kw) and (C_out, r, 1, 1)")
        pairs[module] = (a, b)
    return pairs


def _split_attention(name: str, in_proj: tuple[torch.Tensor, torch.Tensor],
                     out_proj: tuple[torch.Tensor, torch.Tensor], scalings: tuple[float, float], columns: Any,
                     where: Path) -> dict[str, Delta]:
    """robolora's P.q/P.k/P.v/P.out_proj from PEFT's LoRA on the attention module P (in_proj and out_proj, with
    their effective scalings)."""
    (a_in, b_in), (a_out, b_out) = in_proj, out_proj
    rank, e = a_in.shape
    if b_in.shape != (3 * e, rank) or a_out.shape != (rank, e) or b_out.shape != (e, rank):
        raise ValueError(f"{where}: {name} is not PEFT's LoRA on an nn.MultiheadAttention with a packed in_proj "
                         f"(in_proj A {tuple(a_in.shape)}, B {tuple(b_in.shape)}; out_proj A {tuple(a_out.shape)}, "
                         f"B {tuple(b_out.shape)})")
    whole = {p: (a_in, b_in[i * e:(i + 1) * e]) for i, p in enumerate(QKV)}  # rows of p: B_p (E, r')
    whole["out_proj"] = (a_out, b_out)
    blocks = _column_blocks(whole, columns)
    if blocks is None:
        logger.info("%s: PEFT attention LoRA of rank %d converted whole to each of q, k, v, out_proj", name, rank)
        blocks = whole
    return {f"{name}.{p}": (a, b, scalings[p == "out_proj"]) for p, (a, b) in blocks.items()}


def _column_blocks(whole: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   columns: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """Each projection's own columns [lo, hi) as recorded by to_peft (absent: none), or None when the record is
    missing or malformed, or some B is non-zero outside its columns (the delta would change)."""
    if not isinstance(columns, Mapping) or not set(columns) <= set(PROJECTIONS):
        return None
    blocks = {}
    for p, (a, b) in whole.items():
        span = columns.get(p, [0, 0])
        if not (isinstance(span, list) and len(span) == 2 and all(type(i) is int for i in span)
                and 0 <= span[0] <= span[1] <= a.shape[0]):
            return None
        lo, hi = span
        if b[:, :lo].any() or b[:, hi:].any():
            return None
        if hi > lo:
            blocks[p] = (a[lo:hi], b[:, lo:hi])
    return blocks


def _one_config(peft: LoRAConfig,
                deltas: dict[str, Delta]) -> tuple[LoRAConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """One robolora config for layers of different ranks and scalings: A and B padded with zeros to the largest
    rank, and each layer's scaling relative to the config's multiplied into its B (no change when they agree)."""
    rank = max(a.shape[0] for a, _, _ in deltas.values())
    alpha = peft.alpha if rank == peft.rank else peft.scaling * (math.sqrt(rank) if peft.rslora else rank)
    config = dataclasses.replace(peft, rank=rank, alpha=alpha, targets=tuple(sorted(deltas)))
    lora = {}
    for layer, (a, b, scaling) in deltas.items():
        fold = scaling / config.scaling
        pad = rank - a.shape[0]
        b = b if fold == 1.0 else b * fold
        lora[layer] = (nn.functional.pad(a, (0, 0, 0, pad)), nn.functional.pad(b, (0, pad)))
    return config, lora
