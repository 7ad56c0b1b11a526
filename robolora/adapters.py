"""Skill adapter files: save, load, validate, attach, and convert to and from the PEFT layout (docs/design.md §4).

An adapter folder holds ``adapter.safetensors`` (``<layer>.lora_A`` (r, d_in) and ``<layer>.lora_B`` (d_out, r)
per adapted layer, plus the skill's ``skill_token`` (d_model,)) and ``adapter.json`` (skill name, LoRA config,
layers, the base fingerprint it was trained on, training data and metrics). Loading validates everything before
anything touches a policy: a truncated or corrupt file, a missing or extra tensor, a wrong shape, NaN/Inf values
or another base's fingerprint are each an error naming the problem; a refused attach leaves the policy as it was.

PEFT layout (peft >= 0.13): ``adapter_model.safetensors`` with ``base_model.model.<layer>.lora_A.weight`` /
``.lora_B.weight`` and ``adapter_config.json`` (``LoraConfig`` fields). PEFT has no place for a skill token, so it
travels beside them as ``robolora_skill.safetensors`` + ``robolora_skill.json``; PEFT ignores both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from robolora.atomic import atomic_dir
from robolora.config import LoRAConfig
from robolora.inject import inject_lora, lora_layers, remove_adapter, target_shapes
from robolora.policies import base_fingerprint
from robolora.policies.checkpoint import SHIPPED_DIR, resolve_shipped

logger = logging.getLogger(__name__)

FORMAT = "robolora-adapter"
FORMAT_VERSION = 1
WEIGHTS, META = "adapter.safetensors", "adapter.json"
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."
SKILL_TOKEN = "skill_token"
_RESERVED = ("format", "format_version", "skill", "lora", "layers", "skill_token", "base_fingerprint", "parameters")


@dataclass
class SkillAdapter:
    """One skill in memory: LoRA A/B per layer, the skill token and the metadata of ``adapter.json``."""

    skill: str
    config: LoRAConfig
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer name -> (A (r, d_in), B (d_out, r))
    skill_token: torch.Tensor | None
    base_fingerprint: str | None
    metadata: dict[str, Any] = field(default_factory=dict)

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


def save_adapter(adapter: SkillAdapter, path: str | Path) -> Path:
    """Write ``adapter.safetensors`` + ``adapter.json`` atomically (a folder appears complete or not at all)."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter.tensors().items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "skill": adapter.skill,
            "lora": adapter.config.to_dict(), "layers": sorted(adapter.lora), "skill_token": SKILL_TOKEN in tensors,
            "base_fingerprint": adapter.base_fingerprint, "parameters": adapter.num_parameters, **adapter.metadata}
    text = json.dumps(meta, indent=1, default=str)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS))
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
    adapter = SkillAdapter(skill, config, lora, token, fingerprint, extra)
    _check_finite(adapter, path)
    return adapter


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
            raise ValueError(f"adapter {adapter.skill!r} targets {layer!r}, which is not an nn.Linear or attention "
                             "projection of this policy")
        d_out, d_in = shapes[layer]
        if a.shape[1] != d_in or b.shape[0] != d_out:
            raise ValueError(f"adapter {adapter.skill!r}: {layer} expects ({d_out}, {d_in}) "
                             f"but lora_B @ lora_A is ({b.shape[0]}, {a.shape[1]}); wrong base architecture")
    d_model = getattr(getattr(policy, "config", None), "d_model", None)
    if adapter.skill_token is not None and d_model is not None and adapter.skill_token.shape != (d_model,):
        raise ValueError(f"adapter {adapter.skill!r}: skill token has shape {tuple(adapter.skill_token.shape)}, "
                         f"the policy needs ({d_model},)")
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
    """Remove adapter ``name`` from every layer (it must not be merged)."""
    remove_adapter(policy, name)


EXECUTION_FIELDS = ("n_action_steps", "temporal_ensemble")


def validate_execution(execution: Mapping[str, Any] | None, config: Any) -> dict[str, Any] | None:
    """Check a skill's chunk-execution settings (``adapter.json`` "execution") against a policy config.

    Returns them as a plain dict (None when absent); raises ValueError naming the bad field or value.
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
    """The adapter's validated execution settings for a policy with ``config`` (None: the policy's own)."""
    try:
        return validate_execution(adapter.metadata.get("execution"), config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"adapter {adapter.skill!r}: invalid \"execution\" in adapter.json ({e})") from e


def attach_active(policy: nn.Module, adapter: SkillAdapter) -> str:
    """Attach ``adapter`` and make it the active skill: its LoRA weights, its skill token and its chunk execution
    (``adapter.json`` "execution", validated before anything changes). Returns the adapter's name."""
    from robolora.inject import set_active_adapter

    execution = execution_of(adapter, policy.config)
    name = attach(policy, adapter)
    if execution:
        policy.set_execution(**execution)
    set_active_adapter(policy, name)
    if adapter.skill_token is not None:
        device = next(policy.parameters()).device
        token = adapter.skill_token.detach().to(device=device, dtype=torch.float32).clone()
        policy.set_skill_token(nn.Parameter(token, requires_grad=False))
    return name


def attach_for_eval(policy: nn.Module, path: str | Path) -> str:
    """Load an adapter folder and make it the active skill (for ``robolora eval --skill``): see attach_active."""
    return attach_active(policy, load_adapter(path))


# ------------------------------------------------------------------------------------------------------ PEFT
def to_peft(adapter: SkillAdapter, path: str | Path) -> Path:
    """Write the adapter in PEFT's layout (loadable with ``PeftModel.from_pretrained`` on the policy module)."""
    tensors = {}
    for layer, (a, b) in adapter.lora.items():
        tensors[f"{PEFT_PREFIX}{layer}.lora_A.weight"] = a.detach().float().contiguous()
        tensors[f"{PEFT_PREFIX}{layer}.lora_B.weight"] = b.detach().float().contiguous()
    c = adapter.config
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "r": c.rank,
        "lora_alpha": c.alpha, "lora_dropout": c.dropout, "use_rslora": c.rslora, "bias": "none",
        "target_modules": sorted(adapter.lora), "init_lora_weights": "gaussian" if c.init_std is None else True,
        "fan_in_fan_out": False, "modules_to_save": None, "inference_mode": True, "use_dora": False,
        "revision": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {},
    }
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS))
        (tmp / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=1))
        if adapter.skill_token is not None:
            token = adapter.skill_token.detach().float().contiguous()
            save_file({SKILL_TOKEN: token}, str(tmp / "robolora_skill.safetensors"))
        (tmp / "robolora_skill.json").write_text(json.dumps({"skill": adapter.skill, "base_fingerprint":
                                                            adapter.base_fingerprint, "init_std": c.init_std}, indent=1))
    return Path(path)


def from_peft(path: str | Path, skill: str | None = None) -> SkillAdapter:
    """Read a PEFT LoRA adapter folder (and robolora's skill-token side files when present)."""
    path = Path(path)
    cfg = _read_json(path / PEFT_CONFIG)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path / PEFT_CONFIG}: peft_type {cfg.get('peft_type')!r}; only LORA adapters convert")
    unsupported = {k: cfg[k] for k in ("rank_pattern", "alpha_pattern") if cfg.get(k)}
    if unsupported or cfg.get("use_dora") or cfg.get("bias", "none") != "none":
        raise ValueError(f"{path}: PEFT options {unsupported or 'dora/bias'} have no robolora equivalent")
    tensors = {}
    for key, value in _read_tensors(path / PEFT_WEIGHTS).items():
        if not key.startswith(PEFT_PREFIX) or not key.endswith(".weight"):
            raise ValueError(f"{path / PEFT_WEIGHTS}: unexpected tensor {key!r} (expected {PEFT_PREFIX}<layer>."
                             "lora_A.weight / lora_B.weight)")
        tensors[key[len(PEFT_PREFIX):-len(".weight")]] = value
    layers = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    side_file = path / "robolora_skill.json"
    side = _read_json(side_file) if side_file.exists() else {}
    fingerprint = _fingerprint(side.get("base_fingerprint"), side_file)
    try:
        config = LoRAConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), targets=tuple(layers),
                            dropout=float(cfg.get("lora_dropout", 0.0)), rslora=bool(cfg.get("use_rslora", False)),
                            init_std=side.get("init_std"))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path / PEFT_CONFIG} lacks or has an invalid field ({e}); the adapter file is "
                         "corrupt") from e
    lora = _pair_tensors(tensors, layers, config.rank, path / PEFT_WEIGHTS)
    token = None
    if (path / "robolora_skill.safetensors").exists():
        token = _read_tensors(path / "robolora_skill.safetensors").get(SKILL_TOKEN)
    adapter = SkillAdapter(skill or side.get("skill") or path.name, config, lora, token, fingerprint,
                           {"source": "peft"})
    _check_finite(adapter, path)
    return adapter
