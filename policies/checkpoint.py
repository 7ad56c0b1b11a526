"""Policy checkpoints as a folder of ``model.safetensors`` + ``config.json``, and the base-weight fingerprint
(docs/design.md §3 "normalisation statistics travel inside the checkpoint", §4 "base fingerprint").

Weights are only ever read with safetensors (never unpickled). A checkpoint folder is written into a temporary
sibling folder and moved into place, so a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from robolora.atomic import replace_dir

from .act import ACTConfig, ACTPolicy
from .config import PolicyConfig
from .transformer import VisuomotorPolicy

logger = logging.getLogger(__name__)

FORMAT = "robolora.policy"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SKILL_TOKEN = "skill_token"
SHIPPED_DIR = Path(__file__).resolve().parent / "pretrained"  # inside the installed robolora.policies package
# config.json's "policy": kind -> (config class, policy class). A checkpoint without the key predates it: visuomotor.
POLICY_KINDS: dict[str, tuple[type[PolicyConfig | ACTConfig], type[VisuomotorPolicy | ACTPolicy]]] = {
    "visuomotor": (PolicyConfig, VisuomotorPolicy),
    "act": (ACTConfig, ACTPolicy),
}
DEFAULT_KIND = "visuomotor"


def policy_class(path: str | os.PathLike[str]) -> type[VisuomotorPolicy | ACTPolicy]:
    """The class a checkpoint folder (or shipped name) loads as, from its ``config.json`` alone."""
    kind = read_policy_header(path).get("policy", DEFAULT_KIND)
    if kind not in POLICY_KINDS:
        raise ValueError(f"{path}: unknown policy kind {kind!r}; known: {sorted(POLICY_KINDS)}")
    return POLICY_KINDS[kind][1]


def policy_kind(policy: nn.Module) -> str:
    """The ``POLICY_KINDS`` name of a policy's class, recorded as ``"policy"`` in config.json."""
    for kind, (_, cls) in POLICY_KINDS.items():
        if type(policy) is cls:
            return kind
    raise TypeError(f"save_policy saves {[cls.__name__ for _, cls in POLICY_KINDS.values()]}, got "
                    f"{type(policy).__name__}; add the class to policies.checkpoint.POLICY_KINDS")


def _is_lora_name(name: str) -> bool:
    return "lora_" in name or name == SKILL_TOKEN or name.endswith("." + SKILL_TOKEN)


def base_fingerprint(policy: nn.Module) -> str:
    """sha256 over the base weights and buffers: sorted names, dtype, shape and raw bytes.

    LoRA parameters (names containing ``lora_``) and the skill token are ignored, and ``.base_layer`` is dropped
    from names, so a LoRA-wrapped policy fingerprints the same as the plain one as long as its base weights are
    unchanged (unmerged). Device does not matter; dtype does.
    """
    entries: dict[str, torch.Tensor] = {}
    for name, tensor in policy.state_dict().items():
        if _is_lora_name(name):
            continue
        entries[name.replace(".base_layer", "")] = tensor
    digest = hashlib.sha256()
    for name in sorted(entries):
        t = entries[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def resolve_shipped(path: str | os.PathLike[str], shipped_dir: Path, marker: str, what: str, hint: str) -> Path:
    """``path`` when it exists, else the shipped ``shipped_dir/<path>`` when ``path`` is the bare name of one.

    A shipped folder is one holding ``marker``. An existing path always wins, so a folder of the user's named like a
    shipped one is the one used. A path that is neither is a FileNotFoundError naming the shipped names and ``hint``.
    """
    path = Path(path)
    if path.exists():
        return path
    is_name = str(path) == path.name and path.name not in ("", ".", "..")
    if is_name and (shipped_dir / path.name / marker).is_file():
        return shipped_dir / path.name
    shipped = sorted(p.parent.name for p in shipped_dir.glob(f"*/{marker}"))
    raise FileNotFoundError(f"no {what} at {str(path)!r} (from {Path.cwd()}) and no shipped one of that name "
                            f"(shipped: {shipped}); {hint}")


def resolve_policy(path: str | os.PathLike[str]) -> Path:
    """A checkpoint folder: ``path`` when it exists, else the shipped checkpoint of that name (``"base"``)."""
    return resolve_shipped(path, SHIPPED_DIR, CONFIG_FILE, "policy checkpoint folder",
                           f"expected a folder with {WEIGHTS_FILE} and {CONFIG_FILE} written by save_policy")


def save_policy(policy: VisuomotorPolicy | ACTPolicy, path: str | os.PathLike[str],
                metadata: dict[str, Any] | None = None) -> Path:
    """Write ``path/model.safetensors`` and ``path/config.json`` (policy kind, config, format version, fingerprint,
    metadata).

    ``metadata`` must be JSON-serialisable (training data, metrics, git commit...). An existing checkpoint folder
    at ``path`` is replaced; any other existing file or folder there is an error. A LoRA-wrapped policy is
    refused: save its adapter with robolora.adapters, or merge and strip LoRA first.
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    lora = [k for k in state if "lora_" in k or ".base_layer" in k]
    if lora:
        raise ValueError(f"save_policy got a LoRA-wrapped policy (e.g. {lora[0]!r}); save the adapter with "
                         f"robolora.adapters, or merge and strip LoRA before saving a plain policy")
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"save_policy: {path} exists and is not a folder; choose another path")
        foreign = sorted(p.name for p in path.iterdir() if p.name not in (WEIGHTS_FILE, CONFIG_FILE))
        if foreign:
            raise ValueError(f"save_policy: {path} holds files other than a checkpoint ({foreign[:5]}); "
                             f"refusing to replace it, choose an empty or new folder")
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "policy": policy_kind(policy),
        "config": policy.config.to_dict(),
        "base_fingerprint": base_fingerprint(policy),
        "metadata": metadata or {},
    }
    text = json.dumps(header, indent=2, sort_keys=True)  # fails here, before anything is written, if not JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "robolora": FORMAT})
        (tmp / CONFIG_FILE).write_text(text + "\n")
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info("saved policy (%d tensors) to %s", len(state), path)
    return path


def read_policy_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder or shipped checkpoint, checked for format and version."""
    path = resolve_policy(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is a file, not a policy checkpoint folder; expected a folder with "
                                f"{WEIGHTS_FILE} and {CONFIG_FILE} written by save_policy")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing; {path} is not a complete policy checkpoint")
    try:
        header = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON ({e}); re-save the checkpoint") from e
    if not isinstance(header, dict):
        raise ValueError(f"{config_file} must hold a JSON object, not {type(header).__name__}; the checkpoint is "
                         f"corrupt or hand-edited, re-save it with save_policy")
    if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_file} has format {header.get('format')!r} version "
                         f"{header.get('format_version')!r}; this robolora reads {FORMAT!r} "
                         f"version {FORMAT_VERSION}")
    return header


def load_policy(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> VisuomotorPolicy | ACTPolicy:
    """Rebuild a policy saved by ``save_policy``, strictly: every tensor must be present with its exact shape.
    The class is config.json's ``"policy"`` kind (``POLICY_KINDS``; absent in older checkpoints: visuomotor).
    ``path`` is a checkpoint folder or the name of a shipped one: ``load_policy("base")`` works from any folder."""
    path = resolve_policy(path)
    header = read_policy_header(path)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file} is missing; {path} is not a complete policy checkpoint")
    kind = header.get("policy", DEFAULT_KIND)
    if kind not in POLICY_KINDS:
        raise ValueError(f"{path / CONFIG_FILE} names policy kind {kind!r}; this robolora builds "
                         f"{sorted(POLICY_KINDS)}: load it with the robolora version that saved it")
    config_cls, policy_cls = POLICY_KINDS[kind]
    policy = policy_cls(config_cls.from_dict(header["config"]))
    state = load_file(str(weights_file))
    if SKILL_TOKEN in state:
        policy.set_skill_token(nn.Parameter(torch.zeros_like(state[SKILL_TOKEN], dtype=torch.float32)))
    expected = policy.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{weights_file} lacks tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                         f"it was written by a different model version or is truncated: re-save it with "
                         f"save_policy from a policy built with {CONFIG_FILE}'s config")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"{weights_file} has unexpected tensor(s) {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}; LoRA weights belong in an adapter file, "
                         f"and {CONFIG_FILE} must describe the saved model")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{weights_file}: tensor {name!r} has shape {tuple(tensor.shape)} but the config in "
                             f"{CONFIG_FILE} builds {tuple(expected[name].shape)}; the config and weights do not "
                             f"match, re-save with save_policy")
        if tensor.dtype != expected[name].dtype:
            raise ValueError(f"{weights_file}: tensor {name!r} is {tensor.dtype}, expected {expected[name].dtype}; "
                             f"save a float32 policy (policy.float()) so loading is bit-exact")
    policy.load_state_dict(state, strict=True)
    policy.to(device)
    stored = header.get("base_fingerprint")
    if stored is not None and stored != base_fingerprint(policy):
        raise ValueError(f"{weights_file} does not match the base_fingerprint in {CONFIG_FILE}; the files are "
                         f"corrupt or from different saves, re-save the checkpoint")
    policy.eval()
    logger.info("loaded policy from %s onto %s", path, device)
    return policy
