"""The deploy-side controller: runs an exported bundle with numpy + onnxruntime only, no torch (docs/design.md §6).

``load_bundle(dir)`` checks the bundle before anything runs: every file present, every checksum recorded in
``policy.json`` matching, the spec well formed and the ONNX graph's inputs and output agreeing with it.
``Controller.check_env`` compares the spec with an environment's spaces before a loop starts.

Acting (``Controller.select_action``) follows the torch policy's ``ChunkExecutor`` exactly: each batch element
executes the first ``n_action_steps`` actions of its K-action chunk and then re-queries the model, or, with
temporal ensembling, queries every step and averages every chunk's prediction for the current step with weights
exp(-m * i), i = 0 for the oldest (ACT, Zhao et al. 2023).

Safety. Every observation is validated (keys, shape, dtype, finite, recorded bounds). A batch element whose
observation (or model output) is bad gets the *hold* action instead and the fault is counted:

- the hold action is ``action.stop`` from ``policy.json`` (zero end-effector motion) except on the dimensions marked
  ``action.hold_last`` (the gripper), which keep the last executed value, so a held object is neither dropped nor
  grabbed. Before any action was executed those dimensions take ``stop``'s value too (the gripper starts open);
- the element's chunk queue is cleared, so the first good observation afterwards re-queries the model instead of
  replaying a plan made before the fault.

Actions are clamped to ``action.low``/``action.high``. ``run_episodes`` runs a fixed-rate loop (sleeping until each
tick's deadline, counting ticks whose work overran it, then re-anchoring rather than bursting to catch up).

This module must import without torch: it imports numpy, onnxruntime and the torch-free ``robolora.stats`` and
``robolora.episodes`` (the episode runner); ``run_episodes`` and ``control_main`` import gymnasium, and
``control_main`` ``robolora.envs`` (which import no torch either), when called.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from robolora.episodes import Episode, Tick, play_episodes, timing_metrics
from robolora.stats import EVAL_SEED

logger = logging.getLogger(__name__)

FORMAT = "robolora.bundle"
FORMAT_VERSION = 1
ONNX_FILE, PT2_FILE, WEIGHTS_FILE, SPEC_FILE = "policy.onnx", "policy.pt2", "model.safetensors", "policy.json"
BUNDLE_FILES = (ONNX_FILE, PT2_FILE, WEIGHTS_FILE)
OUTPUT_NAME = "actions"
TASK_INPUT = "task_id"


class BundleError(ValueError):
    """The bundle is incomplete, corrupt or does not fit the environment; nothing was run."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_session(onnx_path: str | Path, threads: int | None = 1) -> ort.InferenceSession:
    """The CPU onnxruntime session the controller runs (export measures parity through the same settings)."""
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class ObsSpec:
    """One observation entry: per-element shape, dtype and optional inclusive bounds."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    low: np.ndarray | None
    high: np.ndarray | None

    def check(self, value: Any, batch: int, unbatched: bool) -> tuple[np.ndarray, str]:
        """(rows that pass (batch,) bool, reason for the failures)."""
        bad = np.zeros(batch, dtype=bool)
        if value is None:
            return bad, f"{self.key} missing"
        try:
            array = np.asarray(value)
        except (TypeError, ValueError) as e:
            return bad, f"{self.key} is not an array ({e})"
        want = self.shape if unbatched else (batch, *self.shape)
        if array.dtype != self.dtype:
            return bad, f"{self.key} dtype {array.dtype}, expected {self.dtype}"
        if array.shape != want:
            return bad, f"{self.key} shape {array.shape}, expected {want}"
        rows = array.reshape(batch, -1)
        ok = np.ones(batch, dtype=bool)
        if np.issubdtype(self.dtype, np.floating):
            ok &= np.isfinite(rows).all(axis=1)
        if self.low is not None:
            ok &= (rows >= self.low.reshape(1, -1)).all(axis=1) & (rows <= self.high.reshape(1, -1)).all(axis=1)
        return ok, "" if ok.all() else f"{self.key} non-finite or out of bounds"


@dataclass(frozen=True)
class BundleSpec:
    """``policy.json`` parsed and validated."""

    observation: tuple[ObsSpec, ...]
    inputs: tuple[str, ...]
    num_tasks: int | None  # set when the graph takes task_id as an input
    action_low: np.ndarray
    action_high: np.ndarray
    stop_action: np.ndarray
    hold_last: np.ndarray
    chunk_size: int
    n_action_steps: int
    temporal_ensemble: float | None
    control_hz: float
    skill: str | None
    meta: dict[str, Any]

    @property
    def cameras(self) -> tuple[str, ...]:
        return tuple(o.key[len("rgb_"):] for o in self.observation if o.key.startswith("rgb_"))

    @property
    def image_size(self) -> int:
        return next(o.shape[0] for o in self.observation if o.key.startswith("rgb_"))

    @classmethod
    def from_json(cls, meta: dict[str, Any], where: Path) -> BundleSpec:
        try:
            if meta["format"] != FORMAT or meta["format_version"] != FORMAT_VERSION:
                raise BundleError(f"{where}: format {meta['format']!r} version {meta['format_version']!r}; this "
                                  f"controller reads {FORMAT!r} version {FORMAT_VERSION}; re-export the bundle")
            obs = tuple(_obs_spec(k, v) for k, v in meta["observation"].items())
            act = meta["action"]
            a = int(np.prod(act["shape"]))
            low, high, stop = (np.asarray(act[k], dtype=np.float32).reshape(a) for k in ("low", "high", "stop"))
            hold = np.asarray(act["hold_last"], dtype=bool).reshape(a)
            chunk, task = meta["chunking"], meta["task"]
            spec = cls(obs, tuple(meta["inputs"]), int(task["num_tasks"]) if task["input"] else None, low, high,
                       stop, hold, int(chunk["chunk_size"]), int(chunk["n_action_steps"]),
                       None if chunk["temporal_ensemble"] is None else float(chunk["temporal_ensemble"]),
                       float(meta["control_hz"]), meta.get("skill"), meta)
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{where}: missing or malformed field ({type(e).__name__}: {e}); re-export the "
                              f"bundle with robolora export") from e
        problems = []
        if not (np.all(low <= stop) and np.all(stop <= high) and np.all(low < high)):
            problems.append(f"action low {low} <= stop {stop} <= high {high} does not hold")
        if not 1 <= spec.n_action_steps <= spec.chunk_size:
            problems.append(f"n_action_steps={spec.n_action_steps} outside [1, chunk_size={spec.chunk_size}]")
        if spec.temporal_ensemble is not None and spec.n_action_steps != 1:
            problems.append("temporal_ensemble needs n_action_steps=1")
        want_inputs = tuple(o.key for o in obs) + ((TASK_INPUT,) if spec.num_tasks else ())
        if spec.inputs != want_inputs:
            problems.append(f"inputs {list(spec.inputs)} should be {list(want_inputs)}")
        if not spec.control_hz > 0:
            problems.append(f"control_hz={spec.control_hz} must be > 0")
        if problems:
            raise BundleError(f"{where}: inconsistent spec: {'; '.join(problems)}; re-export the bundle")
        return spec


def _obs_spec(key: str, d: dict[str, Any]) -> ObsSpec:
    shape, dtype = tuple(int(s) for s in d["shape"]), np.dtype(d["dtype"])
    bounded = d.get("low") is not None
    if bounded and dtype.kind in "iu":  # bounds that span the whole integer dtype (uint8 images) check nothing
        info = np.iinfo(dtype)
        bounded = not (np.all(np.asarray(d["low"]) <= info.min) and np.all(np.asarray(d["high"]) >= info.max))
    low = np.broadcast_to(np.asarray(d["low"], dtype=dtype), shape).copy() if bounded else None
    high = np.broadcast_to(np.asarray(d["high"], dtype=dtype), shape).copy() if bounded else None
    return ObsSpec(key, shape, dtype, low, high)


def load_bundle(path: str | Path, *, task_id: int | None = None, threads: int | None = 1) -> Controller:
    """Validate a bundle folder and return its controller; any problem raises ``BundleError`` naming it.

    ``task_id`` is the task a base bundle (exported without a skill or baked task) runs when observations carry
    none; ``threads`` is onnxruntime's intra-op thread count (None: its default).
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"no bundle folder at {path}; create one with `robolora export --out {path}`")
    missing = [name for name in (SPEC_FILE, *BUNDLE_FILES) if not (path / name).is_file()]
    if missing:
        raise BundleError(f"bundle {path} is missing {missing}; re-export it (a bundle holds {SPEC_FILE} and "
                          f"{list(BUNDLE_FILES)})")
    try:
        meta = json.loads((path / SPEC_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path / SPEC_FILE} is not valid JSON ({e}); re-export the bundle") from e
    files = meta.get("files") if isinstance(meta, dict) else None
    for name in BUNDLE_FILES:
        recorded = (files or {}).get(name, {}).get("sha256")
        if recorded is None:
            raise BundleError(f"{path / SPEC_FILE} records no sha256 for {name}; re-export the bundle")
        actual = sha256_file(path / name)
        if actual != recorded:
            raise BundleError(f"{path / name} does not match its checksum in {SPEC_FILE} (sha256 {actual[:16]}..., "
                              f"recorded {recorded[:16]}...): the file is corrupt or was replaced; re-copy the "
                              f"whole bundle or re-export it")
    spec = BundleSpec.from_json(meta, path / SPEC_FILE)
    session = make_session(path / ONNX_FILE, threads)
    got_inputs = tuple(i.name for i in session.get_inputs())
    got_outputs = tuple(o.name for o in session.get_outputs())
    if got_inputs != spec.inputs or got_outputs != (OUTPUT_NAME,):
        raise BundleError(f"{path / ONNX_FILE} takes {list(got_inputs)} -> {list(got_outputs)} but {SPEC_FILE} "
                          f"says {list(spec.inputs)} -> [{OUTPUT_NAME!r}]; re-export the bundle")
    return Controller(spec, session, path, task_id)


class Controller:
    """Acts with a loaded bundle: ``reset()``, ``select_action(obs)``; counts faults in ``faults``."""

    def __init__(self, spec: BundleSpec, session: ort.InferenceSession, path: Path, task_id: int | None) -> None:
        self.spec, self.session, self.path = spec, session, path
        self.task_id = task_id
        self.faults = {"observation": 0, "output": 0}
        self._queue = _ChunkQueue(spec)
        self._last: np.ndarray | None = None  # (B, A) last executed action per element
        self._layout: tuple[int, bool] | None = None  # (batch size, unbatched) fixed from the first call

    @property
    def fault_count(self) -> int:
        return sum(self.faults.values())

    def check_env(self, observation_space: Any, action_space: Any) -> None:
        """Raise ``BundleError`` if an env with these spaces cannot be driven by this bundle."""
        problems = []
        spaces = getattr(observation_space, "spaces", {})
        for o in self.spec.observation:
            space = spaces.get(o.key)
            if space is None:
                problems.append(f"the env has no observation {o.key!r} (has {sorted(spaces)})")
            elif tuple(space.shape) != o.shape or np.dtype(space.dtype) != o.dtype:
                problems.append(f"observation {o.key!r} is {tuple(space.shape)} {np.dtype(space.dtype)}, the bundle "
                                f"needs {o.shape} {o.dtype}")
            elif o.low is not None and (np.any(space.low < o.low) or np.any(space.high > o.high)):
                problems.append(f"observation {o.key!r} bounds [{space.low}, {space.high}] exceed the bundle's "
                                f"[{o.low}, {o.high}]: valid env observations would be refused")
        shape = self.spec.action_low.shape
        if tuple(getattr(action_space, "shape", ())) != shape:
            problems.append(f"action shape {getattr(action_space, 'shape', None)}, the bundle emits {shape}")
        elif np.any(self.spec.action_low < action_space.low) or np.any(self.spec.action_high > action_space.high):
            problems.append(f"the bundle's action limits [{self.spec.action_low}, {self.spec.action_high}] exceed "
                            f"the env's [{action_space.low}, {action_space.high}]")
        if self.spec.num_tasks and self.task_id is None:
            problems.append(f"this base bundle takes a task id; pass load_bundle(..., task_id=N), "
                            f"N in 0..{self.spec.num_tasks - 1}")
        if problems:
            raise BundleError(f"bundle {self.path} does not fit the env: {'; '.join(problems)}; make the env with "
                              f"image_size={self.spec.image_size}, cameras={self.spec.cameras} or export for it")

    def reset(self, indices: Sequence[int] | None = None) -> None:
        """Forget queued actions (all, or those of the given batch elements) and the held action."""
        self._queue.reset(indices)
        if indices is None or self._last is None:
            self._last, self._layout = None, None
        else:
            self._last[list(indices)] = self.spec.stop_action

    def predict_chunk(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The model on batched graph inputs (already validated): (B, K, A) float32."""
        return self.session.run([OUTPUT_NAME], {k: np.ascontiguousarray(inputs[k]) for k in self.spec.inputs})[0]

    def select_action(self, obs: Mapping[str, Any]) -> np.ndarray:
        """Next action, (A,) for one observation or (B, A) for a batch; never raises on a bad observation."""
        batch, unbatched = self._layout_of(obs)
        if self._layout is None:
            self._layout = (batch, unbatched)
            self._last = np.repeat(self.spec.stop_action[None], batch, axis=0)
        ok, reasons = self._validate(obs, batch, unbatched)
        self.faults["observation"] += int((~ok).sum())
        actions = np.zeros_like(self._last)
        rows = np.flatnonzero(ok)
        if rows.size:
            inputs = {k: self._rows(obs[k], unbatched, rows) for k in self.spec.inputs if k != TASK_INPUT}
            if self.spec.num_tasks:
                inputs[TASK_INPUT] = self._task_ids(obs, batch)[rows]
            actions[rows] = self._queue.step(rows, batch, lambda sub: self.predict_chunk(
                {k: v[np.searchsorted(rows, sub)] for k, v in inputs.items()}))
            broken = rows[~np.isfinite(actions[rows]).all(axis=1)]
            if broken.size:
                self.faults["output"] += broken.size
                reasons.append("model output non-finite")
                ok[broken] = False
        bad = np.flatnonzero(~ok)
        if bad.size:
            logger.warning("fault on element(s) %s (%s): holding", bad.tolist(), "; ".join(reasons))
            self._queue.reset(bad)
            actions[bad] = np.where(self.spec.hold_last, self._last[bad], self.spec.stop_action)
        actions = np.clip(actions, self.spec.action_low, self.spec.action_high).astype(np.float32)
        self._last = actions.copy()
        return actions[0] if unbatched else actions

    def _layout_of(self, obs: Mapping[str, Any]) -> tuple[int, bool]:
        if self._layout is not None:
            return self._layout
        for o in self.spec.observation:
            shape = np.shape(obs.get(o.key)) if isinstance(obs, Mapping) and o.key in obs else None
            if shape is not None and len(shape) == len(o.shape) + 1:
                return shape[0], False
            if shape is not None and len(shape) == len(o.shape):
                return 1, True
        return 1, True

    def _validate(self, obs: Mapping[str, Any], batch: int, unbatched: bool) -> tuple[np.ndarray, list[str]]:
        ok, reasons = np.ones(batch, dtype=bool), []
        if not isinstance(obs, Mapping):
            return ~ok, [f"observation is a {type(obs).__name__}, not a dict"]
        for o in self.spec.observation:
            good, reason = o.check(obs.get(o.key), batch, unbatched)
            ok &= good
            if reason:
                reasons.append(reason)
        if self.spec.num_tasks:
            ids = self._task_ids(obs, batch)
            good = (ids >= 0) & (ids < self.spec.num_tasks)
            ok &= good
            if not good.all():
                reasons.append(f"task_id missing or outside [0, {self.spec.num_tasks})")
        return ok, reasons

    def _task_ids(self, obs: Mapping[str, Any], batch: int) -> np.ndarray:
        value = obs.get(TASK_INPUT, self.task_id)
        try:
            ids = np.broadcast_to(np.asarray(value, dtype=np.int64), (batch,)).copy()
        except (TypeError, ValueError):
            ids = np.full(batch, -1, dtype=np.int64)
        return ids

    @staticmethod
    def _rows(value: Any, unbatched: bool, rows: np.ndarray) -> np.ndarray:
        array = np.asarray(value)
        return array[None] if unbatched else array[rows]


class _ChunkQueue:
    """numpy twin of ``robolora.policies.transformer.ChunkExecutor``, stepping only the given rows."""

    def __init__(self, spec: BundleSpec) -> None:
        self.k, self.a = spec.chunk_size, spec.action_low.shape[0]
        self.n, self.m = spec.n_action_steps, spec.temporal_ensemble
        self.chunks: np.ndarray | None = None  # (B, K, A) current chunk, or ensemble weighted sums
        self.position = self.counts = self.weights = np.zeros(0)

    def reset(self, indices: Sequence[int] | np.ndarray | None = None) -> None:
        if indices is None or self.chunks is None:
            self.chunks = None
            return
        idx = np.asarray(indices, dtype=np.int64)
        self.position[idx], self.chunks[idx], self.counts[idx], self.weights[idx] = self.k, 0.0, 0, 0.0

    def step(self, rows: np.ndarray, batch: int, predict: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Actions (len(rows), A) for the given rows of a batch; ``predict(sub_rows)`` returns their chunks."""
        if self.chunks is None:
            self.chunks = np.zeros((batch, self.k, self.a), dtype=np.float32)
            self.position = np.full(batch, self.k, dtype=np.int64)
            self.counts = np.zeros((batch, self.k), dtype=np.int64)
            self.weights = np.zeros((batch, self.k), dtype=np.float32)
        if self.m is not None:
            return self._ensemble_step(rows, predict(rows).astype(np.float32))
        need = rows[self.position[rows] >= self.n]
        if need.size:
            self.chunks[need] = predict(need)
            self.position[need] = 0
        action = self.chunks[rows, self.position[rows]]
        self.position[rows] += 1
        return action

    def _ensemble_step(self, rows: np.ndarray, chunk: np.ndarray) -> np.ndarray:
        # slot j of the buffers is the action for time t + j
        w = np.exp(np.float32(-self.m) * self.counts[rows].astype(np.float32))  # (b, K)
        self.chunks[rows] += w[..., None] * chunk
        self.weights[rows] += w
        self.counts[rows] += 1
        action = self.chunks[rows, 0] / self.weights[rows, :1]
        for buf in (self.chunks, self.weights, self.counts):
            buf[rows] = np.roll(buf[rows], -1, axis=1)
            buf[rows, -1] = 0
        return action


# ------------------------------------------------------------------------------------------ the control loop
class _FixedRate:
    """Tick deadlines 1/hz apart. A tick that ended before its deadline sleeps until it; one that overran it is a
    miss and re-anchors the next deadline one period after its end (no burst of short ticks to catch up)."""

    def __init__(self, hz: float | None) -> None:
        self.period = 1.0 / hz if hz else None
        self.deadline = 0.0

    def start(self) -> None:
        self.deadline = time.perf_counter() + (self.period or 0.0)

    def wait(self, tick_end: float) -> bool:
        """Hold until the deadline of the tick whose work ended at ``tick_end``; False when it missed it."""
        if self.period is None:
            return True
        if tick_end > self.deadline:
            self.deadline = tick_end + self.period
            return False
        time.sleep(max(0.0, self.deadline - time.perf_counter()))
        self.deadline += self.period
        return True


def run_episodes(env: Any, controller: Controller, episodes: int, hz: float | None = None, seed: int = EVAL_SEED,
                 on_episode: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Drive ``env`` (one Gymnasium env) with ``controller`` for seeded episodes ``seed, seed + 1, ...``.

    With ``hz`` each tick (select_action + env.step) has a deadline 1/hz after the previous one; the loop sleeps
    until it, or counts a miss and re-anchors when the tick overran. ``hz`` None or 0 runs as fast as possible.
    The env's spaces are checked first (``BundleError`` before any step). Returns ``control/...`` metrics
    (``policy_ms`` times select_action, ``tick_ms`` select_action + env.step) and the per-episode list (seed,
    success, length, faults, deadline misses).
    """
    if hz is not None and not hz >= 0:
        raise ValueError(f"hz={hz}: must be > 0, or 0 / None to run unpaced")
    controller.check_env(env.observation_space, env.action_space)
    rate = _FixedRate(hz)
    faults_at_reset = 0

    def on_reset(started: list[Episode], info: dict[str, Any]) -> None:
        nonlocal faults_at_reset
        controller.reset()
        faults_at_reset = controller.fault_count
        started[0].success = bool(info.get("success", False))  # the controller also counts a scene that starts solved
        started[0].fields.update(faults=0, deadline_misses=0)
        rate.start()

    def on_step(tick: Tick) -> None:
        episode = tick.episodes[0]
        episode.fields["faults"] = controller.fault_count - faults_at_reset
        if tick.running[0] and not rate.wait(tick.stepped_at):
            episode.fields["deadline_misses"] += 1

    run = play_episodes(env, controller.select_action, episodes, seed=seed, on_reset=on_reset, on_step=on_step,
                        progress=on_episode)
    return {
        **run.metrics("control"),
        "control/ticks": len(run.tick_s),
        "control/faults": sum(e["faults"] for e in run.episodes),
        "control/deadline_misses": sum(e["deadline_misses"] for e in run.episodes),
        "control/hz": float(hz or 0.0),
        **timing_metrics("control/policy", run.act_s, "ms"),
        **timing_metrics("control/tick", run.tick_s, "ms"),
        "episodes": run.episodes,
    }


def control_main(bundle: str | Path, env_id: str, hz: float | None = None, episodes: int = 20,
                 seed: int = EVAL_SEED, *, task_id: int | None = None, threads: int | None = 1,
                 on_episode: Callable[[int], None] | None = None) -> dict[str, Any]:
    """``robolora control``: load ``bundle``, make ``env_id`` to its spec and run ``episodes`` at ``hz``.

    ``hz`` defaults to the bundle's ``control_hz``; 0 runs unpaced. A base bundle that takes a task id runs
    ``task_id``, by default the env's index in ``robolora.envs.BASE_TASKS``.
    """
    import gymnasium as gym

    import robolora.envs as envs

    controller = load_bundle(bundle, task_id=task_id, threads=threads)
    spec = controller.spec
    if spec.num_tasks and controller.task_id is None:
        name = envs.get_spec(env_id).name
        if name not in envs.BASE_TASKS:
            raise BundleError(f"bundle {bundle} is a base policy without a skill and {env_id} is not a base task "
                              f"{list(envs.BASE_TASKS)}; export it with --skill, or pass task_id")
        controller.task_id = envs.BASE_TASKS.index(name)
    env = gym.make(envs.get_spec(env_id).env_id, image_size=spec.image_size, cameras=spec.cameras)
    try:
        metrics = run_episodes(env, controller, episodes, spec.control_hz if hz is None else hz, seed, on_episode)
    finally:
        env.close()
    return {**metrics, "bundle": str(bundle), "env_id": env_id, "skill": spec.skill, "task_id": controller.task_id}
