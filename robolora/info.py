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
    "multi-skill bundle": ("skills.json", "skills"),  # robolora.controller's INDEX_FILE and SKILLS_DIR
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
        for head in ("residual", "completion"):  # the optional heads' own files (robolora.residual, .completion)
            if (path / f"{head}.safetensors").is_file():
                info[f"{head}_weights"] = tensor_summary(path / f"{head}.safetensors")
    elif kind == "PEFT adapter":
        info["adapter_config"] = json.loads((path / "adapter_config.json").read_text())
        info["weights"] = tensor_summary(path / "adapter_model.safetensors")
    elif kind == "controller bundle":
        info["spec"] = json.loads((path / "policy.json").read_text())
        info["files"] = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    elif kind == "multi-skill bundle":
        index = json.loads((path / "skills.json").read_text())
        info["index"] = {k: v for k, v in index.items() if k != "files"}
        info["skills"] = {name: _skill_of_bundle(path / "skills" / name) for name in index.get("skills", [])}
        info["bytes"] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    else:
        manifest = json.loads((path / "manifest.json").read_text())
        info["manifest"] = {k: v for k, v in manifest.items() if k not in ("episodes", "stats")}
        info["episodes"] = len(manifest.get("episodes", []))
        info["samples"] = sum(e["length"] for e in manifest.get("episodes", []))
    return info


def _skill_of_bundle(folder: Path) -> dict[str, Any]:
    """One skill of a multi-skill bundle, from its policy.json: execution, outputs, completion head, parity."""
    spec = json.loads((folder / "policy.json").read_text())
    parity, completion = spec.get("parity", {}), spec.get("completion")
    outputs = [o["name"] for o in spec["outputs"]] if "outputs" in spec else \
        [spec.get("output", {}).get("name", "actions")] + ([completion.get("output", "done")] if completion else [])
    return {"execution": dict(spec.get("chunking", {})), "outputs": outputs, "completion": completion,
            "parity_max_abs_diff": parity.get("max_abs_diff"),
            "bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file())}


def _head_line(completion: dict[str, Any] | None) -> str:
    if not completion:
        return "no completion head (cannot switch on --switch learned)"
    val = completion.get("validation", {})
    pr = (f", validation precision {val['precision']:.3f} recall {val['recall']:.3f}"
          if {"precision", "recall"} <= set(val) else "")
    image = completion.get("image")
    return (f"output '{completion.get('output', 'done')}' ({completion.get('parameters', '?')} parameters"
            + (f", image branch on {image['key']}" if image else "") + f"): threshold {completion['threshold']}, "
            f"k {completion['k']}, timeout {completion['timeout_ticks']} ticks{pr}")


def _eval_line(ev: dict[str, Any]) -> str:
    return (f"{ev['eval/success_rate']:.2f} [{ev['eval/ci_low']:.2f}, {ev['eval/ci_high']:.2f}] over "
            f"{ev.get('eval/episodes', '?')} held-out episodes")


def _shapes_line(weights: dict[str, Any]) -> str:
    shown = [f"{k} {tuple(v)}" for k, v in list(weights["shapes"].items())[:4] if k != "..."]
    more = weights["tensors"] - len(shown)
    return ", ".join(shown) + (f", ... ({more} more)" if more > 0 else "")


def summary(info: dict[str, Any]) -> str:
    """The human-readable form of :func:`describe`'s result: one aligned line per fact that matters."""
    rows: list[tuple[str, Any]] = [("path", info["path"]), ("kind", info["kind"])]
    kind = info["kind"]
    if kind == "policy checkpoint":
        cfg, meta, w = info["config"]["config"], info["config"].get("metadata", {}), info["weights"]
        rows += [("architecture", f"{cfg['n_layers']} layers, d={cfg['d_model']}, {cfg['n_heads']} heads, "
                                  f"cameras {cfg['cameras']} at {cfg['image_size']} px, chunk {cfg['chunk_size']}, "
                                  f"executes {cfg['n_action_steps']} actions per chunk"),
                 ("parameters", f"{w['parameters']:,} in {w['tensors']} tensors, {w['bytes'] / 1e6:.1f} MB"),
                 ("base fingerprint", info["base_fingerprint"])]
        if meta.get("kind"):
            rows.append(("trained as", meta["kind"] + (f" on {sorted(meta['tasks'])}" if meta.get("tasks") else "")))
        if meta.get("skill"):
            rows.append(("skill", f"{meta['skill']} ({meta.get('method')}, {meta.get('demos')} demos)"))
        if meta.get("eval"):
            rows.append(("success", _eval_line(meta["eval"])))
    elif kind == "skill adapter":
        a, w = info["adapter"], info["weights"]
        lora = a.get("lora", {})
        rows += [("skill", a.get("skill")),
                 ("LoRA", f"rank {lora.get('rank')}, alpha {lora.get('alpha')} on {', '.join(lora.get('targets', []))}"
                          + (" + a skill token" if a.get("skill_token") else "")),
                 ("parameters", f"{w['parameters']:,} in {w['tensors']} tensors"
                                + (f" ({a['trainable_percent_of_base']:.2f}% of the base)"
                                   if "trainable_percent_of_base" in a else "") + f", {w['bytes'] / 1e3:.0f} KB"),
                 ("base fingerprint", a.get("base_fingerprint"))]
        if a.get("demos"):
            train = a.get("train_config", {})
            rows.append(("trained on", f"{a['demos']} demos ({a.get('data', '?')}), {train.get('steps', '?')} steps "
                                       f"on {train.get('device', '?')}"))
        if a.get("execution"):
            rows.append(("execution", a["execution"]))
        r = a.get("residual")
        if isinstance(r, dict):
            n = info.get("residual_weights", {}).get("parameters", r.get("parameters"))
            size = f"{n:,} parameters" if isinstance(n, int) else "parameters unknown"
            rows.append(("residual head", f"{size} (hidden {r.get('hidden')} on {r.get('feature_dim')} features + the "
                                          f"{r.get('chunk_size')}x{r.get('action_dim')} chunk; added to every "
                                          "predicted chunk)"))
        heads = [info[k]["parameters"] for k in ("residual_weights", "completion_weights") if k in info]
        if heads:
            rows.append(("skill total", f"{w['parameters'] + sum(heads):,} parameters (LoRA + token + heads)"))
        if a.get("eval"):
            rows.append(("success", _eval_line(a["eval"])))
    elif kind == "PEFT adapter":
        c, w = info["adapter_config"], info["weights"]
        rows += [("LoRA", f"r {c.get('r')}, lora_alpha {c.get('lora_alpha')} on {len(c.get('target_modules', []))} "
                          "modules"), ("parameters", f"{w['parameters']:,} in {w['tensors']} tensors")]
    elif kind == "controller bundle":
        spec = info["spec"]
        rows += [(key, spec[key]) for key in ("skill", "skills", "base_fingerprint", "inputs", "outputs")
                 if key in spec]
        if isinstance(spec.get("residual"), dict):
            rows.append(("residual head", f"{spec['residual'].get('parameters')} parameters, inside the graph"))
        rows.append(("files", ", ".join(f"{name} ({size / 1e6:.1f} MB)" for name, size in info["files"].items())))
    elif kind == "multi-skill bundle":
        index = info["index"]
        rows += [("skills", ", ".join(info["skills"])),
                 ("sequence", " -> ".join(index["sequence"]) if index.get("sequence") else "none (any order)"),
                 ("transitions", index.get("transitions")),
                 ("representation", index.get("representation")),
                 ("base fingerprint", index.get("base_fingerprint")),
                 ("control rate", f"{index.get('control_hz')} Hz")]
        for name, skill in info["skills"].items():
            chunking = skill["execution"]
            ensemble = chunking.get("temporal_ensemble")
            execution = (f"temporal ensemble {ensemble} over chunks of {chunking.get('chunk_size')}" if ensemble else
                         f"executes {chunking.get('n_action_steps')} of {chunking.get('chunk_size')} actions per chunk")
            parity = skill["parity_max_abs_diff"]
            rows += [(name, f"outputs {skill['outputs']}, {execution}"
                            + ("" if parity is None else f", parity max abs diff {parity:.1e}")),
                     (f"{name} head", _head_line(skill["completion"]))]
        rows.append(("size", f"{info['bytes'] / 1e6:.1f} MB"))
    else:
        m = info["manifest"]
        rows += [("task", m.get("task")), ("episodes", f"{info['episodes']} ({info['samples']:,} steps)"),
                 ("expert", f"{m.get('expert')}, noise {m.get('noise')}, success rate {m.get('success_rate', 0):.3f}"),
                 ("observations", f"cameras {m.get('cameras')} at {m.get('image_size')} px"),
                 ("first seed", m.get("seed"))]
    if "weights" in info:
        rows.append(("tensors", _shapes_line(info["weights"])))
    return "\n".join(f"{key:18s} {value}" for key, value in rows)


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
