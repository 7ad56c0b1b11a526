"""``robolora info``: say what a file or folder is (checkpoint, adapter, bundle, dataset) and what it holds.

Reads JSON and safetensors headers only (shapes and dtypes come from the header, no tensor is loaded), except
for a policy checkpoint's base fingerprint, which hashes its weights.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from safetensors import safe_open

KINDS = {
    "policy checkpoint": ("config.json", "model.safetensors"),
    "skill adapter": ("adapter.json", "adapter.safetensors"),
    "PEFT adapter": ("adapter_config.json", "adapter_model.safetensors"),
    "controller bundle": ("policy.json", "policy.onnx"),
    "demo dataset": ("manifest.json",),
}


def tensor_summary(path: Path) -> dict[str, Any]:
    """Count, parameters and the first shapes of a safetensors file, from its header."""
    shapes: dict[str, list[int]] = {}
    with safe_open(str(path), framework="numpy") as f:
        for key in f.keys():
            shapes[key] = list(f.get_slice(key).get_shape())
    n = 0
    for shape in shapes.values():
        size = 1
        for d in shape:
            size *= d
        n += size
    return {"tensors": len(shapes), "parameters": n, "bytes": path.stat().st_size,
            "shapes": dict(list(shapes.items())[:12]) | ({"...": f"{len(shapes) - 12} more"} if len(shapes) > 12
                                                         else {})}


def kind_of(path: Path) -> str:
    for kind, files in KINDS.items():
        if all((path / f).exists() for f in files):
            return kind
    raise ValueError(f"{path} is not a robolora checkpoint, adapter, bundle or dataset folder (expected one of: "
                     + "; ".join(" + ".join(files) for files in KINDS.values()) + ")")


def describe(path: str | Path) -> dict[str, Any]:
    """What ``path`` is and what it holds."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir() and (path / "policy" / "config.json").exists() and not (path / "config.json").exists():
        path = path / "policy"  # a pretraining run folder: describe the policy it produced
    kind = kind_of(path)
    info: dict[str, Any] = {"path": str(path), "kind": kind}
    if kind == "policy checkpoint":
        from robolora.policies import base_fingerprint, load_policy

        info["config"] = json.loads((path / "config.json").read_text())
        info["weights"] = tensor_summary(path / "model.safetensors")
        info["base_fingerprint"] = base_fingerprint(load_policy(path))
    elif kind == "skill adapter":
        info["adapter"] = json.loads((path / "adapter.json").read_text())
        info["weights"] = tensor_summary(path / "adapter.safetensors")
    elif kind == "PEFT adapter":
        info["adapter_config"] = json.loads((path / "adapter_config.json").read_text())
        info["weights"] = tensor_summary(path / "adapter_model.safetensors")
    elif kind == "controller bundle":
        info["spec"] = json.loads((path / "policy.json").read_text())
        info["files"] = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    else:
        manifest = json.loads((path / "manifest.json").read_text())
        info["manifest"] = {k: v for k, v in manifest.items() if k not in ("episodes", "stats")}
        info["episodes"] = len(manifest.get("episodes", []))
        info["samples"] = sum(e["length"] for e in manifest.get("episodes", []))
    return info


def environment() -> dict[str, Any]:
    """Versions, devices, registered tasks and shipped checkpoints."""
    import gymnasium
    import mujoco
    import torch

    import robolora
    from robolora.envs import TASKS
    from robolora.recipes import shipped_base

    shipped = shipped_base().parent
    return {
        "robolora": robolora.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available",
        "mujoco": mujoco.__version__,
        "gymnasium": gymnasium.__version__,
        "tasks": dict(TASKS),
        "shipped": sorted(str(p.relative_to(shipped)) for p in shipped.glob("**/*.json")),
    }
