"""Export a base policy, optionally with one skill merged in, as a controller bundle (docs/design.md §6).

``export_bundle(base, skill, out_dir)`` attaches the skill adapter, merges it, strips every LoRA module (the
exported graph holds the plain modules, ``nn.Linear`` and ``nn.MultiheadAttention``, with W0 + s·BA) and writes,
atomically (a temporary sibling folder renamed into place):

- ``policy.onnx``: ``predict_chunk`` on the raw observation tensors, as the policy's ``spec`` describes them (for
  robolora's policies ``rgb_<camera>`` uint8 (B, S, S, 3), ``proprio`` float32 (B, P), and for a base policy
  without a skill ``task_id`` int64 (B,)) -> ``actions`` (B, K, A); the batch dimension is dynamic. A skill whose
  adapter carries a completion head (``robolora.completion``) has a second output ``done`` (B,): the head's
  probability on ``policy.features``, sigmoid inside the graph; policy.json then records ``"outputs"`` and
  ``"completion"`` (threshold, k, timeout_ticks, output name) for the controller's sequencer. A skill whose adapter
  carries a residual action head (``robolora.residual``) is exported with it installed: ``predict_chunk`` adds it
  before the clamp, so it is part of the graph and the controller needs nothing more.
  Normalisation is inside the graph. Any policy following robolora's policy protocol exports (``robolora.policy``);
  saved checkpoints record their policy kind, so ``load_merged_policy`` rebuilds the right class.
- ``policy.pt2``: the same program through ``torch.export`` (``torch.export.load`` reads it back).
- ``model.safetensors``: the merged, stripped state dict (``load_merged_policy`` rebuilds the torch model).
- ``residual.safetensors``: only for a skill with a residual head (policy.json "residual"), which
  ``load_merged_policy`` installs again; the head is not a LoRA weight and cannot be merged into the base's.
- ``policy.json``: observation and action spec, safe-hold action, chunking, control rate, skill, base fingerprint,
  sha256 of every other file and the parity report; ``robolora.controller`` reads it.

Task identity: a skill's token becomes a constant of the graph (no task input). A base bundle takes ``task_id`` as
an input (one bundle serves every base task; the controller supplies the id) unless ``task_id=`` bakes one in.

``export_skills(base, skills, out_dir)`` exports several skills of one base as one multi-skill bundle: each skill's
single-skill bundle under ``skills/<name>/`` (a bank of merged graphs) and an index ``skills.json`` with the skill
order, the allowed transitions and every file's sha256 (docs/controller.md).

Parity: on fixed probe observations (batch 1 and 5) the ONNX graph (through the controller's onnxruntime session),
the ``.pt2`` program and the reloaded ``model.safetensors`` are compared with the merged torch model, and the merged
model with the unmerged one (base + active adapter), for every output; any max abs difference above ``tolerance``
(5e-5 per link, fp32) fails the export with ``ExportParityError`` and nothing is written. The shipped dish_rack
adapter (rank 2 on every Linear) measures up to 2.4e-5 per link on the random probe observations: fp32 rounding,
merged or unmerged, onnxruntime's kernels or torch's. 5e-5 action units is 1 micrometre of hand motion per step;
a real export fault (a wrong op, a lost skill token) shows up as 1e-2 or more.

ONNX uses torch's TorchScript exporter (``dynamo=False``): the dynamo exporter needs ``onnxscript``, which the
``export`` extra does not install.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import robolora
from robolora.adapters import SkillAdapter, attach_active, load_adapter, resolve_adapter
from robolora.atomic import replace_dir
from robolora.completion import CompletionHead
from robolora.controller import (BUNDLE_FILES, FORMAT, FORMAT_VERSION, ONNX_FILE, OUTPUT_NAME, PT2_FILE, SPEC_FILE,
                                 TASK_INPUT, WEIGHTS_FILE, load_bundle, sha256_file)
from robolora.controller import INDEX_FILE, SKILLS_DIR, SKILLS_FORMAT, SKILLS_FORMAT_VERSION
from robolora.inject import lora_layers, strip_lora
from robolora.policies import base_fingerprint, load_policy
from robolora.policies.checkpoint import POLICY_KINDS, policy_kind
from robolora.policy import PolicySpec, check_policy, probe_batch
from robolora.residual import FILE as RESIDUAL_FILE
from robolora.residual import ResidualHead

logger = logging.getLogger(__name__)

# robolora's envs act in (dx, dy, dz, gripper): their safe hold is no end-effector motion with the gripper open (the
# envs start open) before any action, and the gripper keeping its last command on a fault
STOP_ACTION = (0.0, 0.0, 0.0, 1.0)
HOLD_LAST = (False, False, False, True)
ONNX_OPSET = 17
PROBE_BATCHES = (1, 5)
COMPLETION_OUTPUT = "done"
PARITY_TOLERANCE = 5e-5  # max abs difference per link of the parity chain (module docstring)


class ExportParityError(RuntimeError):
    """The exported programs do not compute what the torch policy computes (within the tolerance)."""


class ExportModule(nn.Module):
    """``policy.predict_chunk`` with positional raw-observation inputs: the function that is exported. With a
    completion head it also returns the head's probability on ``policy.features`` (``output_names``). ``residual``:
    the residual head installed on ``policy`` (``set_action_residual``), registered here so the exported programs
    hold its weights as parameters."""

    def __init__(self, policy: nn.Module, task_id: int | None = None, completion: CompletionHead | None = None,
                 residual: nn.Module | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.residual = residual
        self.spec: PolicySpec = check_policy(policy, features=completion is not None and completion.reads_features)
        if completion is not None and completion.reads_features and completion.feature_dim != self.spec.feature_dim:
            raise ValueError(f"the completion head reads {completion.feature_dim} features but the policy's "
                             f"features(batch) gives {self.spec.feature_dim}; train the head on this base")
        if completion is not None and completion.image is not None and completion.image_key not in self.spec.image_keys:
            raise ValueError(f"the completion head's image branch reads {completion.image_key!r}, which is not one "
                             f"of the policy's cameras {list(self.spec.image_keys)}")
        self.completion = completion
        self.output_names = (OUTPUT_NAME,) + (() if completion is None else (COMPLETION_OUTPUT,))
        self.task_key = self.spec.task_key
        self.takes_task = self.task_key is not None and getattr(policy, "skill_token", None) is None \
            and task_id is None
        self.register_buffer("baked_task", torch.tensor(task_id or 0, dtype=torch.long))
        self.input_names = tuple(self.spec.observation) + ((self.task_key,) if self.takes_task else ())

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        batch = dict(zip(self.input_names, inputs))
        if self.task_key is not None and not self.takes_task:  # (B,); ignored under a skill
            batch[self.task_key] = self.baked_task.expand(inputs[0].shape[0])
        actions = self.policy.predict_chunk(batch)  # (B, K, A)
        if self.completion is None:
            return actions
        return actions, self.completion.read(self.policy, batch)  # (B, K, A), (B,): features and/or the camera


def probe_inputs(policy: nn.Module, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fixed random observations at the scale the policy sees (``PolicySpec.probe``: images uniform, other inputs
    around the policy's normalisation statistics)."""
    return probe_batch(policy, batch_size, seed)


def export_bundle(
    base: str | Path | nn.Module,
    skill: str | Path | SkillAdapter | None,
    out_dir: str | Path,
    control_hz: float = 20.0,
    *,
    task_id: int | None = None,
    env_id: str | None = None,
    tolerance: float = PARITY_TOLERANCE,
    stop_action: Sequence[float] | None = None,
    hold_last: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Merge ``skill`` into ``base``, strip LoRA, write and verify the bundle at ``out_dir``; returns policy.json.

    ``base``: a checkpoint folder or a plain protocol policy (copied, never modified). ``skill``: an adapter
    folder, a ``SkillAdapter`` or None for the base alone. ``task_id`` bakes a base task into a base bundle.
    ``env_id`` names the env whose proprio bounds the bundle enforces; by default the skill's task when the skill
    is named after one (``dish_rack`` -> robolora/DishRack-v0) or the baked base task, else no bounds (only
    finiteness). An existing bundle at ``out_dir`` is replaced; any other existing folder is refused.

    The action's size and bounds are the policy's ``spec.action``: bounds are recorded (and the controller clamps
    to them) only when the spec gives them. ``stop_action`` / ``hold_last`` set the controller's safe hold
    (:func:`safe_hold`): by default robolora's (dx, dy, dz, gripper) hold for 4-dimensional actions, and for any
    other size the zero action with every dimension keeping its last command; pass them for your robot.
    """
    out_dir = Path(out_dir)
    _check_destination(out_dir)
    policy = copy.deepcopy(base) if isinstance(base, nn.Module) else load_policy(base)
    policy = policy.cpu().float().eval()
    spec = check_policy(policy)
    hold = safe_hold(spec, stop_action, hold_last)  # refused before anything is written
    if lora_layers(policy) or getattr(policy, "skill_token", None) is not None:
        raise ValueError("export_bundle needs the plain base policy (no LoRA layers, no skill token); pass the "
                         "adapter as `skill` and the export merges it")
    fingerprint = base_fingerprint(policy)
    adapter = None if skill is None else skill if isinstance(skill, SkillAdapter) else load_adapter(skill)
    unmerged = None
    if adapter is not None:
        if task_id is not None and adapter.skill_token is not None:
            raise ValueError(f"skill {adapter.skill!r} carries its own skill token; task_id applies to base "
                             f"bundles only, drop it")
        name = attach_active(policy, adapter)  # with the skill's token and chunk execution (goes into the bundle)
        unmerged = copy.deepcopy(policy)
        strip_lora(policy, merge=name)
    leftover = [n for n in policy.state_dict() if "lora_" in n or ".base_layer" in n] + list(lora_layers(policy))
    if leftover:
        raise RuntimeError(f"LoRA modules remain after strip_lora: {leftover[:5]} (robolora.inject bug)")
    if task_id is not None and not 0 <= task_id < spec.num_tasks:
        raise ValueError(f"task_id={task_id} outside [0, {spec.num_tasks}) of the base policy")
    completion = None if adapter is None else adapter.completion
    head = None if completion is None else copy.deepcopy(completion.head).eval().requires_grad_(False)
    residual = None if adapter is None or adapter.residual is None else \
        copy.deepcopy(adapter.residual).eval().requires_grad_(False)
    if residual is not None:
        policy.set_action_residual(residual)  # the graph's own (attach_active installed an equal copy on both)
    module = ExportModule(policy, task_id, head, residual).eval()
    skill_name = None if adapter is None else adapter.skill
    env_id = env_id or _default_env(skill_name, task_id)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_programs(module, policy, tmp)
        meta = _spec(module, env_id, control_hz, skill_name, task_id, fingerprint, adapter, hold)
        files = BUNDLE_FILES
        if residual is not None:
            save_file(residual.tensors(), str(tmp / RESIDUAL_FILE))
            meta["residual"] = {**residual.to_dict(), "file": RESIDUAL_FILE}
            files = (*files, RESIDUAL_FILE)
        meta["files"] = {f: {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size} for f in files}
        _write_json(tmp / SPEC_FILE, meta)
        meta["parity"] = _parity(module, unmerged, tmp, tolerance)
        _write_json(tmp / SPEC_FILE, meta)
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info("exported %s to %s (parity max abs diff %.2e)", skill_name or "base", out_dir,
                meta["parity"]["max_abs_diff"])
    return {**meta, "path": str(out_dir)}


def export_skills(
    base: str | Path | nn.Module,
    skills: Sequence[str | Path | SkillAdapter],
    out_dir: str | Path,
    control_hz: float = 20.0,
    *,
    sequence: Sequence[str] | None = None,
    env_id: str | None = None,
    tolerance: float = PARITY_TOLERANCE,
    stop_action: Sequence[float] | None = None,
    hold_last: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Export several skills of one base as one multi-skill bundle at ``out_dir``; returns its index.

    Each skill goes through ``export_bundle`` (its merged graph, execution, parity report and checksums) into
    ``skills/<name>/``, so the bundle is a bank of merged graphs: the fastest step, N x the model's memory
    (docs/controller.md measures it against onnxruntime's multi-LoRA). The index ``skills.json`` records the skills
    in order, the sequence and the transitions it allows, and the sha256 of every file under ``skills/``.

    ``skills``: adapter folders, shipped skill names (``"wipe"``) or ``SkillAdapter``s. ``sequence``: the order the
    skills run in; the bundle then allows exactly its transitions (default: any skill may follow any other).
    ``env_id``, ``stop_action`` and ``hold_last`` are export_bundle's, for every skill (default env: each skill's own
    task). Written atomically; an existing bundle at ``out_dir`` is replaced, any other existing folder is refused.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / INDEX_FILE).is_file()
                                                       or (out_dir / SPEC_FILE).is_file())):
        raise ValueError(f"{out_dir} exists and is not a bundle folder; choose a new or empty folder")
    if isinstance(skills, (str, Path)) or not skills:
        raise ValueError(f"skills={skills!r}: give a list of adapter folders or shipped names, e.g. "
                         f"['wipe', 'dish_rack']")
    sources = [s if isinstance(s, SkillAdapter) else resolve_adapter(s) for s in skills]
    names = [(s if isinstance(s, SkillAdapter) else load_adapter(s)).skill for s in sources]
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", n)]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"skill names {names} must be distinct folder names (letters, digits, _ . -); rename the "
                         f"adapters' skills (bad: {bad})")
    unknown = [n for n in (sequence or ()) if n not in names]
    if sequence is not None and (unknown or not sequence):
        raise ValueError(f"sequence {list(sequence)} names skill(s) {unknown} not exported; the skills are {names}")
    transitions = ({a: [b for b in names if b != a] for a in names} if sequence is None else
                   {a: sorted({b for x, b in zip(sequence, sequence[1:]) if x == a}) for a in names})
    policy = base if isinstance(base, nn.Module) else load_policy(base)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        reports = {name: export_bundle(policy, source, tmp / SKILLS_DIR / name, control_hz, env_id=env_id,
                                       tolerance=tolerance, stop_action=stop_action, hold_last=hold_last)
                   for name, source in zip(names, sources)}
        files = {f"{SKILLS_DIR}/{name}/{f.name}": {"sha256": sha256_file(f), "bytes": f.stat().st_size}
                 for name in names for f in sorted((tmp / SKILLS_DIR / name).iterdir())}
        first = reports[names[0]]
        index = {
            "format": SKILLS_FORMAT,
            "format_version": SKILLS_FORMAT_VERSION,
            "representation": "bank",
            "skills": names,
            "sequence": None if sequence is None else list(sequence),
            "transitions": transitions,
            "base_fingerprint": first["base_fingerprint"],
            "control_hz": first["control_hz"],
            "completion": {name: reports[name].get("completion") for name in names},
            "parity": {name: reports[name]["parity"]["max_abs_diff"] for name in names},
            "files": files,
            "exported_with": first["exported_with"],
        }
        _write_json(tmp / INDEX_FILE, index)
        load_bundle(tmp)  # the index as the controller reads it
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info("exported skills %s to %s", names, out_dir)
    return {**index, "path": str(out_dir)}


def load_merged_policy(bundle: str | Path) -> nn.Module:
    """The merged torch policy of a bundle, rebuilt from ``policy.json`` and ``model.safetensors`` (strict), with the
    skill's residual head (``residual.safetensors``) installed when the bundle has one."""
    bundle = Path(bundle)
    meta = json.loads((bundle / SPEC_FILE).read_text())
    kind = meta.get("policy_kind", "visuomotor")
    if kind not in POLICY_KINDS:
        raise ValueError(f"{bundle}: the bundle holds a {meta.get('policy_class')} policy, which robolora cannot "
                         "rebuild; run its policy.onnx or policy.pt2, or build the module and load model.safetensors")
    config_cls, policy_cls = POLICY_KINDS[kind]
    policy = policy_cls(config_cls.from_dict(meta["policy_config"]))
    state = load_file(str(bundle / WEIGHTS_FILE))
    if "skill_token" in state:
        policy.set_skill_token(nn.Parameter(torch.zeros_like(state["skill_token"]), requires_grad=False))
    policy.load_state_dict(state, strict=True)
    if meta.get("residual") is not None:
        policy.set_action_residual(_read_bundle_residual(bundle, meta))
    return policy.eval()


def _read_bundle_residual(bundle: Path, meta: dict[str, Any]) -> ResidualHead:
    """The bundle's residual head: its file present and matching policy.json's sha256, shapes and values valid."""
    path = bundle / RESIDUAL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{bundle / SPEC_FILE} records a residual head but {RESIDUAL_FILE} is missing; "
                                "re-copy or re-export the bundle")
    recorded = ((meta.get("files") or {}).get(RESIDUAL_FILE) or {}).get("sha256")
    if recorded is not None and sha256_file(path) != recorded:
        raise ValueError(f"{path} does not match its sha256 in {SPEC_FILE}; re-copy or re-export the bundle")
    return ResidualHead.from_files(meta["residual"], load_file(str(path)), bundle)


def _outputs(value: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


def _write_programs(module: ExportModule, policy: nn.Module, out: Path) -> None:
    save_file({k: v.detach().contiguous() for k, v in policy.state_dict().items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt", "robolora": FORMAT})
    probe = probe_inputs(policy, PROBE_BATCHES[-1])
    args = tuple(probe[k] for k in module.input_names)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad(), warnings.catch_warnings(), _attention_fast_path(False):
        # the TorchScript exporter is deprecated in favour of dynamo (needs onnxscript); predict_chunk's checks on
        # the static image shape trigger TracerWarnings that are true by construction
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, args, str(out / ONNX_FILE), input_names=list(module.input_names),
                          output_names=list(module.output_names), opset_version=ONNX_OPSET, dynamo=False,
                          dynamic_axes={n: {0: "batch"} for n in (*module.input_names, *module.output_names)})
        program = torch.export.export(module, args, dynamic_shapes=(tuple({0: batch} for _ in args),))
    torch.export.save(program, str(out / PT2_FILE))


@contextlib.contextmanager
def _attention_fast_path(enabled: bool) -> Iterator[None]:
    """nn.MultiheadAttention's fused eval path (``aten::_native_multi_head_attention``) has no ONNX op: programs are
    traced through its plain-op path, which computes the same attention (parity checks it against the fused one)."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _parity(module: ExportModule, unmerged: nn.Module | None, bundle: Path, tolerance: float) -> dict:
    controller = load_bundle(bundle)
    program = torch.export.load(str(bundle / PT2_FILE)).module()
    known = type(module.policy) in {cls for _, cls in POLICY_KINDS.values()}  # else no class to rebuild it from
    baked = None if module.takes_task else int(module.baked_task)
    reloaded = ExportModule(load_merged_policy(bundle), baked, module.completion) if known else None
    names = module.output_names
    diffs: dict[str, float] = {}

    def record(key: str, a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> None:
        for name, x, y in zip(names, a, b):  # "actions" keeps the single-output report's keys
            label = key if name == OUTPUT_NAME else f"{name}/{key}"
            diffs[label] = max(diffs.get(label, 0.0), (x - y).abs().max().item())

    for size in PROBE_BATCHES:
        probe = probe_inputs(module.policy, size, seed=size)
        args = tuple(probe[k] for k in module.input_names)
        with torch.no_grad():
            merged = _outputs(module(*args))
            feeds = {k: a.numpy() for k, a in zip(module.input_names, args)}
            onnx = [controller.predict_chunk(feeds)]
            if module.completion is not None:
                onnx += controller.session.run([COMPLETION_OUTPUT], feeds)
            outputs = {"onnx": tuple(torch.from_numpy(o) for o in onnx), "pt2": _outputs(program(*args))}
            if reloaded is not None:
                outputs["safetensors"] = _outputs(reloaded(*args))
            if unmerged is not None:
                outputs["unmerged"] = _outputs(ExportModule(unmerged, baked, module.completion).eval()(*args))
        for name, out in outputs.items():
            record(f"{name}_vs_merged", out, merged)
        if unmerged is not None:
            record("onnx_vs_unmerged", outputs["onnx"], outputs["unmerged"])
    # Each link of the chain bundle -> merged -> unmerged must be within the tolerance; the end-to-end difference
    # is two fp32 roundings apart, so by the triangle inequality it is held to twice the tolerance (the shipped
    # dish_rack adapter measured onnx-vs-merged 2.0e-5 and merged-vs-unmerged 2.4e-5, end to end 4.4e-5).
    links = {k: v for k, v in diffs.items() if not k.endswith("onnx_vs_unmerged")}
    worst = max(links.values())
    end_to_end = max([v for k, v in diffs.items() if k.endswith("onnx_vs_unmerged")], default=0.0)
    if not (worst <= tolerance and end_to_end <= 2 * tolerance):
        raise ExportParityError(f"export parity failed: max abs diff {max(worst, end_to_end):.3e} over tolerance "
                                f"{tolerance:.0e} per link ({diffs}); the exported program does not compute what the "
                                f"torch policy does. Check for ops that trace differently (data-dependent control "
                                f"flow) and report it")
    return {"max_abs_diff": max(diffs.values()), "tolerance": tolerance, "probe_batches": list(PROBE_BATCHES), **diffs}


def safe_hold(spec: PolicySpec, stop_action: Sequence[float] | None = None,
              hold_last: Sequence[bool] | None = None) -> dict[str, list]:
    """The controller's safe hold for a policy's action space: ``{"stop": [A floats], "hold_last": [A bools]}``.

    On a fault the controller executes ``stop`` except on the ``hold_last`` dimensions, which keep their last
    executed command (``stop`` before any). Defaults, from ``spec.action``: for 4-dimensional actions robolora's
    envs' (dx, dy, dz, gripper) hold (``STOP_ACTION``, ``HOLD_LAST``: no motion, the gripper keeps its command); for
    any other size the zero action clipped into the bounds, with every dimension keeping its last command (a
    position-controlled arm then holds its pose). Given values are checked: A of them, finite, inside the bounds.
    """
    a = spec.action_dim
    low = -np.inf if spec.action.low is None else float(spec.action.low)
    high = np.inf if spec.action.high is None else float(spec.action.high)
    if stop_action is None:
        stop = list(STOP_ACTION) if a == len(STOP_ACTION) else np.clip(np.zeros(a), low, high).tolist()
    else:
        stop = np.asarray(stop_action, dtype=np.float64).reshape(-1).tolist()
        if len(stop) != a or not np.all(np.isfinite(stop)) or not np.all((low <= np.asarray(stop)) &
                                                                        (np.asarray(stop) <= high)):
            raise ValueError(f"stop_action={list(stop_action)} must be {a} finite values within the policy's action "
                             f"bounds [{low}, {high}] (spec.action {spec.action.shape})")
    if hold_last is None:
        hold = list(HOLD_LAST) if a == len(HOLD_LAST) else [True] * a
    else:
        hold = list(hold_last)
        if len(hold) != a or not all(isinstance(h, (bool, np.bool_)) for h in hold):
            raise ValueError(f"hold_last={hold} must be {a} booleans, one per action dimension (True: that "
                             "dimension keeps its last command on a fault)")
        hold = [bool(h) for h in hold]
    return {"stop": [float(v) for v in stop], "hold_last": hold}


def _spec(module: ExportModule, env_id: str | None, control_hz: float, skill: str | None, task_id: int | None,
          fingerprint: str, adapter: SkillAdapter | None, hold: dict[str, list]) -> dict[str, Any]:
    spec = module.spec
    if not control_hz > 0:
        raise ValueError(f"control_hz={control_hz} must be > 0")
    bounds = _env_bounds(env_id, spec) if env_id else {}
    observation = {}
    for key, s in spec.observation.items():
        low, high = bounds.get(key, (s.low, s.high))
        observation[key] = {"shape": list(s.shape), "dtype": s.dtype, "low": low, "high": high}
    action_dim = spec.action_dim
    # bounds only where the spec gives them: null means unbounded (the controller then checks only finiteness)
    low = None if spec.action.low is None else [float(spec.action.low)] * action_dim
    high = None if spec.action.high is None else [float(spec.action.high)] * action_dim
    normalization = {f"{k}_{stat}": list(getattr(s, stat)) for k, s in spec.observation.items()
                     for stat in ("mean", "std") if getattr(s, stat) is not None}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "skill": skill,
        "env_id": env_id,
        "base_fingerprint": fingerprint,
        "adapter": None if adapter is None else {"skill": adapter.skill, "lora": adapter.config.to_dict(),
                                                 "layers": len(adapter.lora), "skill_token": adapter.skill_token
                                                 is not None},
        "task": {"input": module.takes_task, "baked": task_id, "num_tasks": spec.num_tasks},
        "inputs": list(module.input_names),
        "output": {"name": OUTPUT_NAME, "shape": ["batch", spec.chunk_size, action_dim], "dtype": "float32"},
        **_completion_spec(module, adapter),
        "observation": observation,
        "action": {"shape": [action_dim], "dtype": "float32", "low": low, "high": high, **hold},
        "normalization": {**normalization, "applied_in_graph": True},
        "chunking": {"chunk_size": spec.chunk_size, **spec.execution.to_dict()},
        "control_hz": float(control_hz),
        **_policy_class(module.policy),
        "onnx_opset": ONNX_OPSET,
        "exported_with": {"robolora": robolora.__version__, "torch": torch.__version__,
                          "onnxruntime": __import__("onnxruntime").__version__},
    }


def _completion_spec(module: ExportModule, adapter: SkillAdapter | None) -> dict[str, Any]:
    """policy.json's "outputs" and "completion" for a skill with a completion head; nothing without one."""
    if adapter is None or adapter.completion is None:
        return {}
    c = adapter.completion
    validation = c.info.get("validation", {})
    return {"outputs": [{"name": OUTPUT_NAME, "shape": ["batch", module.spec.chunk_size, module.spec.action_dim],
                         "dtype": "float32"},
                        {"name": COMPLETION_OUTPUT, "shape": ["batch"], "dtype": "float32"}],
            "completion": {"threshold": c.threshold, "k": c.k, "timeout_ticks": c.timeout_ticks,
                           "output": COMPLETION_OUTPUT, "parameters": c.head.num_parameters,
                           **({"image": c.head.image_entry()} if c.head.image is not None else {}),
                           "validation": {k: validation[k] for k in ("precision", "recall") if k in validation}}}


def _policy_class(policy: nn.Module) -> dict[str, Any]:
    """How ``load_merged_policy`` rebuilds the torch module: robolora's kinds by name and config; other protocol
    policies are recorded by class name only (the bundle's ONNX and pt2 programs do not need the class)."""
    if type(policy) in {cls for _, cls in POLICY_KINDS.values()}:
        return {"policy_kind": policy_kind(policy), "policy_config": policy.config.to_dict()}
    return {"policy_kind": None, "policy_class": f"{type(policy).__module__}.{type(policy).__qualname__}",
            "policy_config": None}


def _default_env(skill: str | None, task_id: int | None) -> str | None:
    import robolora.envs as envs

    if skill is not None:
        return envs.TASKS.get(skill)
    return None if task_id is None else envs.TASKS[envs.BASE_TASKS[task_id]]


def _env_bounds(env_id: str, spec: PolicySpec) -> dict[str, tuple[list[float], list[float]]]:
    """Per-element bounds of the env's non-image observations the policy reads (checked against the spec)."""
    import robolora.envs as envs

    images = spec.image_keys
    env = envs.make(env_id, image_size=spec.observation[images[0]].shape[0] if images else 64,
                    cameras=tuple(k.removeprefix("rgb_") for k in images))
    try:
        out = {}
        for key, s in spec.observation.items():
            if s.is_image:
                continue
            if key not in env.observation_space.spaces:
                raise ValueError(f"{env_id} has no observation {key!r} (has {sorted(env.observation_space.spaces)})")
            space = env.observation_space[key]
            if space.shape != s.shape:
                raise ValueError(f"{env_id} has {key} {space.shape} but the policy takes {s.shape}")
            out[key] = (np.asarray(space.low, np.float32).tolist(), np.asarray(space.high, np.float32).tolist())
        return out
    finally:
        env.close()


def _check_destination(out_dir: Path) -> None:
    if out_dir.exists() and not (out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / SPEC_FILE).is_file())):
        raise ValueError(f"{out_dir} exists and is not a bundle folder; choose a new or empty folder")


def _write_json(path: Path, meta: dict[str, Any]) -> None:
    path.write_text(json.dumps(meta, indent=1) + "\n")


