"""The deploy-side controller: runs an exported bundle with numpy + onnxruntime only, no torch (docs/design.md §6,
docs/controller.md).

``load_bundle(dir)`` checks the bundle before anything runs: every file present, every checksum recorded in
``policy.json`` matching, the spec well formed and the ONNX graph's inputs and outputs agreeing with it.
A multi-skill bundle (``robolora export --skills``: an index ``skills.json`` and one single-skill bundle per skill
under ``skills/<name>/``) is detected by its index; every file of every skill is checked against the index's
checksums and every skill's session is loaded, so switching never loads anything.
``Controller.check_env`` compares the spec with an environment's spaces before a loop starts.

Acting (``Controller.select_action``) follows the torch policy's ``ChunkExecutor`` exactly: each batch element
executes the first ``n_action_steps`` actions of its K-action chunk and then re-queries the model, or, with
temporal ensembling, queries every step and averages every chunk's prediction for the current step with weights
exp(-m * i), i = 0 for the oldest (ACT, Zhao et al. 2023).

Switching skills. ``Controller.activate(skill)`` may be called from any thread; it only records the request. The
switch happens at the next tick boundary, at the start of the next ``select_action``, which reads the request once
under a lock: that whole tick runs on one skill, the old skill's queued actions and ensembling state are dropped and
the new skill starts from an empty queue. A loop may apply the request earlier with ``apply_pending()`` in its
idle time between ticks (``run_episodes`` does, before sleeping to the deadline), so the next tick carries no switch
work; it waits for a tick in progress, so it is safe from any thread too. A skill whose graph has a completion
output ("done", (B,) probability, policy.json "completion") reports it in ``Controller.completion``
(``robolora.sequencer`` drives sequences on it).

Safety. Every observation is validated (keys, shape, dtype, finite, recorded bounds). A batch element whose
observation (or model output) is bad gets the *hold* action instead and the fault is counted:

- the hold action is ``action.stop`` from ``policy.json`` (zero end-effector motion) except on the dimensions marked
  ``action.hold_last`` (the gripper), which keep the last executed value, so a held object is neither dropped nor
  grabbed. Before any action was executed those dimensions take ``stop``'s value too (the gripper starts open);
- the element's chunk queue is cleared, so the first good observation afterwards re-queries the model instead of
  replaying a plan made before the fault.

Actions are clamped to ``action.low``/``action.high`` where the bundle records them (``null`` when the policy's
spec has no action bounds: those actions are only checked for finiteness); ``action.shape`` is the policy's. ``run_episodes`` runs a fixed-rate loop (sleeping until each
tick's deadline, counting ticks whose work overran it, then re-anchoring rather than bursting to catch up).

This module must import without torch: it imports numpy, onnxruntime and the torch-free ``robolora.stats`` and
``robolora.episodes`` (the episode runner); ``run_episodes`` and ``control_main`` import gymnasium, and
``control_main`` ``robolora.envs`` and ``robolora.sequencer`` (which import no torch either), when called.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from robolora.episodes import Episode, Tick, play_episodes, timing_metrics
from robolora.stats import EVAL_SEED

if TYPE_CHECKING:
    from robolora.sequencer import Sequencer

logger = logging.getLogger(__name__)

FORMAT = "robolora.bundle"
FORMAT_VERSION = 1
ONNX_FILE, PT2_FILE, WEIGHTS_FILE, SPEC_FILE = "policy.onnx", "policy.pt2", "model.safetensors", "policy.json"
BUNDLE_FILES = (ONNX_FILE, PT2_FILE, WEIGHTS_FILE)
OUTPUT_NAME = "actions"
TASK_INPUT = "task_id"
SKILLS_FORMAT = "robolora.skills"  # a multi-skill bundle: INDEX_FILE + one single-skill bundle per skill
SKILLS_FORMAT_VERSION = 1
INDEX_FILE, SKILLS_DIR = "skills.json", "skills"
SWITCH_LOG = 100_000  # switch latencies kept (a controller may run for days)


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
class CompletionSpec:
    """A skill's learned completion signal (policy.json "completion"): the graph output ``output`` is the (B,)
    probability that the skill's goal is reached; a sequence advances once it stays >= ``threshold`` for ``k``
    consecutive ticks, and gives the skill up (holding) after ``timeout_ticks`` ticks without that."""

    threshold: float
    k: int
    timeout_ticks: int
    output: str = "done"

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"completion threshold={self.threshold} must be in (0, 1]")
        if self.k < 1:
            raise ValueError(f"completion k={self.k} must be >= 1 (consecutive ticks above the threshold)")
        if self.timeout_ticks < 1:
            raise ValueError(f"completion timeout_ticks={self.timeout_ticks} must be >= 1")
        if not self.output or self.output == OUTPUT_NAME:
            raise ValueError(f"completion output={self.output!r} must name a graph output other than {OUTPUT_NAME!r}")

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CompletionSpec:
        return cls(float(d["threshold"]), int(d["k"]), int(d["timeout_ticks"]), str(d.get("output", "done")))


@dataclass(frozen=True)
class BundleSpec:
    """``policy.json`` parsed and validated."""

    observation: tuple[ObsSpec, ...]
    inputs: tuple[str, ...]
    num_tasks: int | None  # set when the graph takes task_id as an input
    action_low: np.ndarray  # (A,), -inf where the bundle records no bound
    action_high: np.ndarray  # (A,), +inf where the bundle records no bound
    stop_action: np.ndarray
    hold_last: np.ndarray
    chunk_size: int
    n_action_steps: int
    temporal_ensemble: float | None
    control_hz: float
    skill: str | None
    completion: CompletionSpec | None
    meta: dict[str, Any]

    @property
    def cameras(self) -> tuple[str, ...]:
        return tuple(o.key[len("rgb_"):] for o in self.observation if o.key.startswith("rgb_"))

    @property
    def image_size(self) -> int:
        return next(o.shape[0] for o in self.observation if o.key.startswith("rgb_"))

    @property
    def outputs(self) -> tuple[str, ...]:
        """The graph's outputs: the action chunk, then the completion probability when the skill has a head."""
        return (OUTPUT_NAME,) + (() if self.completion is None else (self.completion.output,))

    @classmethod
    def from_json(cls, meta: dict[str, Any], where: Path) -> BundleSpec:
        try:
            if meta["format"] != FORMAT or meta["format_version"] != FORMAT_VERSION:
                raise BundleError(f"{where}: format {meta['format']!r} version {meta['format_version']!r}; this "
                                  f"controller reads {FORMAT!r} version {FORMAT_VERSION}; re-export the bundle")
            obs = tuple(_obs_spec(k, v) for k, v in meta["observation"].items())
            act = meta["action"]
            a = int(np.prod(act["shape"]))
            low, high = (np.full(a, inf, np.float32) if act[k] is None else
                         np.asarray(act[k], dtype=np.float32).reshape(a) for k, inf in (("low", -np.inf),
                                                                                       ("high", np.inf)))
            stop = np.asarray(act["stop"], dtype=np.float32).reshape(a)
            hold = np.asarray(act["hold_last"], dtype=bool).reshape(a)
            chunk, task = meta["chunking"], meta["task"]
            completion = CompletionSpec.from_json(meta["completion"]) if meta.get("completion") else None
            spec = cls(obs, tuple(meta["inputs"]), int(task["num_tasks"]) if task["input"] else None, low, high,
                       stop, hold, int(chunk["chunk_size"]), int(chunk["n_action_steps"]),
                       None if chunk["temporal_ensemble"] is None else float(chunk["temporal_ensemble"]),
                       float(meta["control_hz"]), meta.get("skill"), completion, meta)
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{where}: missing or malformed field ({type(e).__name__}: {e}); re-export the "
                              f"bundle with robolora export") from e
        problems = []
        if not (np.all(np.isfinite(stop)) and np.all(low <= stop) and np.all(stop <= high) and np.all(low < high)):
            problems.append(f"action low {low} <= stop {stop} <= high {high} (stop finite) does not hold")
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


@dataclass(frozen=True)
class SkillSession:
    """One skill of a bundle, ready to run: its spec, its onnxruntime session and its folder."""

    spec: BundleSpec
    session: ort.InferenceSession
    path: Path


def load_bundle(path: str | Path, *, task_id: int | None = None, threads: int | None = 1) -> Controller:
    """Validate a bundle folder (one skill, or several with a ``skills.json`` index) and return its controller;
    any problem raises ``BundleError`` naming it.

    ``task_id`` is the task a base bundle (exported without a skill or baked task) runs when observations carry
    none; ``threads`` is onnxruntime's intra-op thread count (None: its default).
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"no bundle folder at {path}; create one with `robolora export --out {path}`")
    if (path / INDEX_FILE).is_file():
        skills, index = _load_skills(path, threads)
        return Controller(skills, path, task_id, sequence=index.get("sequence"), transitions=index["transitions"])
    return Controller([_load_skill(path, threads)], path, task_id)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}); re-export the bundle") from e


def _verify(path: Path, recorded: str | None, index: Path, what: str) -> None:
    """Refuse ``path`` unless its sha256 is the one ``index`` records."""
    if recorded is None:
        raise BundleError(f"{index} records no sha256 for {what}; re-export the bundle")
    actual = sha256_file(path)
    if actual != recorded:
        raise BundleError(f"{path} does not match its checksum in {index.name} (sha256 {actual[:16]}..., "
                          f"recorded {recorded[:16]}...): the file is corrupt or was replaced; re-copy the "
                          f"whole bundle or re-export it")


def _load_skill(path: Path, threads: int | None) -> SkillSession:
    """One single-skill bundle folder, checked file by file, with its session."""
    missing = [name for name in (SPEC_FILE, *BUNDLE_FILES) if not (path / name).is_file()]
    if missing:
        raise BundleError(f"bundle {path} is missing {missing}; re-export it (a bundle holds {SPEC_FILE} and "
                          f"{list(BUNDLE_FILES)}, or a multi-skill bundle {INDEX_FILE} and {SKILLS_DIR}/)")
    meta = _read_json(path / SPEC_FILE)
    files = meta.get("files") if isinstance(meta, dict) else None
    for name in BUNDLE_FILES:
        _verify(path / name, (files or {}).get(name, {}).get("sha256"), path / SPEC_FILE, name)
    spec = BundleSpec.from_json(meta, path / SPEC_FILE)
    session = make_session(path / ONNX_FILE, threads)
    got_inputs = tuple(i.name for i in session.get_inputs())
    got_outputs = tuple(o.name for o in session.get_outputs())
    if got_inputs != spec.inputs or got_outputs != spec.outputs:
        raise BundleError(f"{path / ONNX_FILE} takes {list(got_inputs)} -> {list(got_outputs)} but {SPEC_FILE} "
                          f"says {list(spec.inputs)} -> {list(spec.outputs)}; re-export the bundle")
    return SkillSession(spec, session, path)


def _load_skills(path: Path, threads: int | None) -> tuple[list[SkillSession], dict[str, Any]]:
    """A multi-skill bundle: the index checked, every listed file checked against it, every skill loaded."""
    where = path / INDEX_FILE
    index = _read_json(where)
    try:
        if index["format"] != SKILLS_FORMAT or index["format_version"] != SKILLS_FORMAT_VERSION:
            raise BundleError(f"{where}: format {index['format']!r} version {index['format_version']!r}; this "
                              f"controller reads {SKILLS_FORMAT!r} version {SKILLS_FORMAT_VERSION}; re-export it")
        names, files = [str(n) for n in index["skills"]], dict(index["files"])
        transitions = {str(k): [str(n) for n in v] for k, v in index["transitions"].items()}
        sequence = None if index.get("sequence") is None else [str(n) for n in index["sequence"]]
    except BundleError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BundleError(f"{where}: missing or malformed field ({type(e).__name__}: {e}); re-export the bundle "
                          f"with robolora export --skills") from e
    unknown = sorted({*transitions, *(n for v in transitions.values() for n in v), *(sequence or [])} - set(names))
    if not names or len(set(names)) != len(names) or unknown:
        raise BundleError(f"{where}: skills {names} must be distinct and non-empty and name every skill of the "
                          f"sequence and transitions (unknown: {unknown}); re-export the bundle")
    for rel, record in files.items():
        parts = PurePosixPath(rel).parts
        if PurePosixPath(rel).is_absolute() or ".." in parts or len(parts) != 3 or parts[0] != SKILLS_DIR:
            raise BundleError(f"{where}: file entry {rel!r} is not {SKILLS_DIR}/<skill>/<file>; re-export the bundle")
        if not (path / rel).is_file():
            raise BundleError(f"multi-skill bundle {path} is missing {rel} (skill {parts[1]!r}); re-copy the whole "
                              f"bundle or re-export it")
        _verify(path / rel, (record or {}).get("sha256"), where, rel)
    skills = []
    for name in names:
        for file in (SPEC_FILE, *BUNDLE_FILES):
            if f"{SKILLS_DIR}/{name}/{file}" not in files:
                raise BundleError(f"{where} records no sha256 for {SKILLS_DIR}/{name}/{file}; re-export the bundle")
        skill = _load_skill(path / SKILLS_DIR / name, threads)
        if skill.spec.skill != name:
            raise BundleError(f"{skill.path / SPEC_FILE} holds skill {skill.spec.skill!r}, the index says {name!r}; "
                              f"re-export the bundle")
        skills.append(skill)
    _check_alike(skills, path)
    return skills, {"sequence": sequence, "transitions": transitions}


def _check_alike(skills: Sequence[SkillSession], path: Path) -> None:
    """Skills switched inside one loop must read the same observations and write the same actions."""
    first = skills[0].spec
    for other in skills[1:]:
        spec, problems = other.spec, []
        if [(o.key, o.shape, o.dtype) for o in spec.observation] != [(o.key, o.shape, o.dtype)
                                                                    for o in first.observation]:
            problems.append("observations")
        if spec.inputs != first.inputs or spec.num_tasks != first.num_tasks:
            problems.append("graph inputs")
        if not all(np.array_equal(getattr(spec, f), getattr(first, f))
                   for f in ("action_low", "action_high", "stop_action", "hold_last")):
            problems.append("action spec")
        if spec.control_hz != first.control_hz:
            problems.append("control_hz")
        if problems:
            raise BundleError(f"bundle {path}: skill {spec.skill!r} differs from {first.skill!r} in "
                              f"{', '.join(problems)}; export every skill from the same base with the same --hz")


class Controller:
    """Acts with a loaded bundle: ``reset()``, ``select_action(obs)``, ``activate(skill)`` between ticks (any
    thread), ``hold()``; counts faults in ``faults`` and records each switch's latency in ``switch_s``.

    ``completion_every_tick``: when True, a skill with a completion head evaluates it at every tick, also at ticks
    whose action comes from the chunk queue (one extra model call at those ticks); when False (default) the
    probability is only known at ticks that query the model anyway, NaN at the others.
    """

    def __init__(self, skills: Sequence[SkillSession], path: Path, task_id: int | None, *,
                 sequence: Sequence[str] | None = None, transitions: Mapping[str, Sequence[str]] | None = None) -> None:
        if not skills:
            raise BundleError(f"bundle {path} holds no skill")
        self.path, self.task_id = path, task_id
        self._skills = {s.spec.skill: s for s in skills}
        self._queues = {s.spec.skill: _ChunkQueue(s.spec) for s in skills}
        self.sequence = None if sequence is None else tuple(sequence)
        self.transitions = None if transitions is None else {k: tuple(v) for k, v in transitions.items()}
        self.faults = {"observation": 0, "output": 0}
        self.completion_every_tick = False
        self.switched = False  # the last select_action ran on a skill just switched to (at its boundary or before)
        self.switch_s: deque[float] = deque(maxlen=SWITCH_LOG)  # activate() call + applying the switch
        self._switched_early = False  # apply_pending switched since the last tick
        self._tick_lock = threading.Lock()  # held by select_action and apply_pending: no switch lands mid-tick
        self._active: str | None = skills[0].spec.skill
        self._pending: str | None = None
        self._pending_s = 0.0
        self._lock = threading.Lock()
        self._last: np.ndarray | None = None  # (B, A) last executed action per element
        self._done: np.ndarray | None = None  # (B,) completion probability at the last tick (NaN: not computed)
        self._layout: tuple[int, bool] | None = None  # (batch size, unbatched) fixed from the first call

    @property
    def skills(self) -> tuple[str | None, ...]:
        """The bundle's skills in order (``(None,)`` for a base bundle)."""
        return tuple(self._skills)

    @property
    def active(self) -> str | None:
        """The skill that acts at the next tick unless a switch is pending (the one that acted last)."""
        return self._active

    @property
    def spec(self) -> BundleSpec:
        """The active skill's spec (observation, action and rate are the same for every skill of a bundle)."""
        return self._skills[self._active].spec

    @property
    def session(self) -> ort.InferenceSession:
        return self._skills[self._active].session

    def skill_spec(self, skill: str) -> BundleSpec:
        """The spec of one of the bundle's skills."""
        self._check_skill(skill)
        return self._skills[skill].spec

    @property
    def fault_count(self) -> int:
        return sum(self.faults.values())

    @property
    def completion(self) -> np.ndarray | None:
        """(B,) probability that the skill that acted at the last tick has reached its goal (NaN where it was not
        computed: a faulty element, or a queued tick without ``completion_every_tick``); None without a head."""
        return self._done

    def activate(self, skill: str) -> None:
        """Make ``skill`` act from the next tick on (thread-safe; the last request before a tick wins). At that
        tick boundary the old skill's queued actions and ensembling state are dropped; activating the skill that
        is already active changes nothing."""
        t0 = time.perf_counter()
        self._check_skill(skill)
        with self._lock:
            self._pending = skill
            self._pending_s = time.perf_counter() - t0

    def _check_skill(self, skill: Any) -> None:
        if skill not in self._skills or skill is None:
            raise ValueError(f"unknown skill {skill!r}; bundle {self.path} has {list(self.skills)}")

    def check_env(self, observation_space: Any, action_space: Any) -> None:
        """Raise ``BundleError`` if an env with these spaces cannot be driven by this bundle (by any of its skills)."""
        problems: list[str] = []
        for skill in self._skills.values():
            problems += [p for p in self._env_problems(skill.spec, observation_space, action_space)
                         if p not in problems]
        if self.spec.num_tasks and self.task_id is None:
            problems.append(f"this base bundle takes a task id; pass load_bundle(..., task_id=N), "
                            f"N in 0..{self.spec.num_tasks - 1}")
        if problems:
            make = (f"make the env with image_size={self.spec.image_size}, cameras={self.spec.cameras} or "
                    if self.spec.cameras else "")
            raise BundleError(f"bundle {self.path} does not fit the env: {'; '.join(problems)}; {make}export for it")

    @staticmethod
    def _env_problems(spec: BundleSpec, observation_space: Any, action_space: Any) -> list[str]:
        problems = []
        spaces = getattr(observation_space, "spaces", {})
        for o in spec.observation:
            space = spaces.get(o.key)
            if space is None:
                problems.append(f"the env has no observation {o.key!r} (has {sorted(spaces)})")
            elif tuple(space.shape) != o.shape or np.dtype(space.dtype) != o.dtype:
                problems.append(f"observation {o.key!r} is {tuple(space.shape)} {np.dtype(space.dtype)}, the bundle "
                                f"needs {o.shape} {o.dtype}")
            elif o.low is not None and (np.any(space.low < o.low) or np.any(space.high > o.high)):
                problems.append(f"observation {o.key!r} bounds [{space.low}, {space.high}] exceed the bundle's "
                                f"[{o.low}, {o.high}]: valid env observations would be refused")
        shape = spec.action_low.shape
        if tuple(getattr(action_space, "shape", ())) != shape:
            problems.append(f"action shape {getattr(action_space, 'shape', None)}, the bundle emits {shape}")
        elif np.any(spec.action_low < action_space.low) or np.any(spec.action_high > action_space.high):
            unbounded = not (np.all(np.isfinite(spec.action_low)) and np.all(np.isfinite(spec.action_high)))
            problems.append(f"the bundle's action limits [{spec.action_low}, {spec.action_high}] exceed "
                            f"the env's [{action_space.low}, {action_space.high}]" +
                            (" (the policy's spec has no action bounds: export a policy that clamps to the env's, "
                             "e.g. load_lerobot_policy(..., action_bounds=(-1, 1)))" if unbounded else ""))
        return problems

    def reset(self, indices: Sequence[int] | None = None) -> None:
        """Forget queued actions (all, or those of the given batch elements) and the held action. The active skill
        and a pending switch are kept."""
        self._queues[self._active].reset(indices)
        if indices is None or self._last is None:
            self._last, self._done, self._layout = None, None, None
        else:
            self._last[list(indices)] = self.spec.stop_action

    def predict_chunk(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The active skill's model on batched graph inputs (already validated): (B, K, A) float32."""
        return self.session.run([OUTPUT_NAME], {k: np.ascontiguousarray(inputs[k]) for k in self.spec.inputs})[0]

    def predict(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        """The active skill's graph outputs ``outputs`` (names from ``spec.outputs``) on batched graph inputs."""
        return self.session.run(list(outputs), {k: np.ascontiguousarray(inputs[k]) for k in self.spec.inputs})

    def hold(self) -> np.ndarray:
        """The safe hold action (``stop``, the ``hold_last`` dimensions keeping their last command) for every
        element, executed as this tick's action: queued actions are dropped, so acting again re-queries."""
        if self._last is None:
            return self.spec.stop_action.copy()
        actions = np.where(self.spec.hold_last, self._last, self.spec.stop_action).astype(np.float32)
        self._queues[self._active].reset()
        self._last = actions.copy()
        if self._done is not None:
            self._done[:] = np.nan
        return actions[0] if self._layout is not None and self._layout[1] else actions

    def apply_pending(self) -> bool:
        """Apply a requested switch now instead of at the start of the next ``select_action``; returns whether the
        active skill changed. A loop calls it in its idle time (after the env step, before sleeping to the next
        deadline), so the tick that follows starts on the new skill with no switch work left; ``run_episodes``
        does. Safe from any thread: a tick in progress finishes first, so a switch never lands mid-tick."""
        with self._tick_lock:
            switched = self._apply_pending()
            self._switched_early |= switched
            return switched

    def select_action(self, obs: Mapping[str, Any]) -> np.ndarray:
        """Next action, (A,) for one observation or (B, A) for a batch; never raises on a bad observation."""
        with self._tick_lock:
            return self._select_action(obs)

    def _select_action(self, obs: Mapping[str, Any]) -> np.ndarray:
        self._tick_boundary()
        spec, queue = self.spec, self._queues[self._active]
        batch, unbatched = self._layout_of(obs)
        if self._layout is None:
            self._layout = (batch, unbatched)
            self._last = np.repeat(spec.stop_action[None], batch, axis=0)
        if spec.completion is None:
            self._done = None
        elif self._done is None or self._done.shape != (batch,):
            self._done = np.full(batch, np.nan)
        else:
            self._done[:] = np.nan
        ok, reasons = self._validate(obs, batch, unbatched)
        self.faults["observation"] += int((~ok).sum())
        actions = np.zeros_like(self._last)
        rows = np.flatnonzero(ok)
        if rows.size:
            inputs = {k: self._rows(obs[k], unbatched, rows) for k in spec.inputs if k != TASK_INPUT}
            if spec.num_tasks:
                inputs[TASK_INPUT] = self._task_ids(obs, batch)[rows]
            actions[rows] = queue.step(rows, batch, lambda sub: self._query(
                {k: v[np.searchsorted(rows, sub)] for k, v in inputs.items()}, sub))
            self._complete_every_tick(inputs, rows)
            broken = rows[~np.isfinite(actions[rows]).all(axis=1)]
            if broken.size:
                self.faults["output"] += broken.size
                reasons.append("model output non-finite")
                ok[broken] = False
        bad = np.flatnonzero(~ok)
        if bad.size:
            logger.warning("fault on element(s) %s (%s): holding", bad.tolist(), "; ".join(reasons))
            queue.reset(bad)
            actions[bad] = np.where(spec.hold_last, self._last[bad], spec.stop_action)
            if self._done is not None:
                self._done[bad] = np.nan
        actions = np.clip(actions, spec.action_low, spec.action_high).astype(np.float32)
        self._last = actions.copy()
        return actions[0] if unbatched else actions

    def _tick_boundary(self) -> None:
        """Apply a pending switch, whole: the tick that follows runs on one skill from an empty queue."""
        self.switched = self._apply_pending() or self._switched_early
        self._switched_early = False

    def _apply_pending(self) -> bool:
        with self._lock:
            pending, asked_s, self._pending = self._pending, self._pending_s, None
        if pending is None or pending == self._active:
            return False
        t0 = time.perf_counter()
        self._queues[self._active].reset()
        self._queues[pending].reset()
        self._active, self._done = pending, None
        self.switch_s.append(asked_s + time.perf_counter() - t0)
        logger.info("switched to skill %r", pending)
        return True

    def _query(self, inputs: Mapping[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
        """The action chunks of ``rows``; their completion probabilities too when the skill has a head."""
        head = self.spec.completion
        if head is None:
            return self.predict_chunk(inputs)
        chunk, done = self.predict(inputs, (OUTPUT_NAME, head.output))
        self._done[rows] = np.asarray(done, dtype=np.float64).reshape(len(rows))
        return chunk

    def _complete_every_tick(self, inputs: Mapping[str, np.ndarray], rows: np.ndarray) -> None:
        head = self.spec.completion
        if head is None or not self.completion_every_tick:
            return
        stale = np.isnan(self._done[rows])
        if stale.any():
            sub = {k: v[stale] for k, v in inputs.items()}
            self._done[rows[stale]] = np.asarray(self.predict(sub, (head.output,))[0],
                                                 dtype=np.float64).reshape(int(stale.sum()))

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
                 on_episode: Callable[[int], None] | None = None, *,
                 sequencer: Sequencer | None = None) -> dict[str, Any]:
    """Drive ``env`` (one Gymnasium env) with ``controller`` for seeded episodes ``seed, seed + 1, ...``.

    With ``hz`` each tick (select_action + env.step) has a deadline 1/hz after the previous one; the loop sleeps
    until it, or counts a miss and re-anchors when the tick overran. ``hz`` None or 0 runs as fast as possible.
    The env's spaces are checked first (``BundleError`` before any step). Returns ``control/...`` metrics
    (``policy_ms`` times select_action, ``tick_ms`` select_action + env.step) and the per-episode list (seed,
    success, length, faults, deadline misses). With a ``sequencer`` (``robolora.sequencer``) the sequencer acts
    and sees every step's info; episodes add its record and the deadline misses of ticks that switched skills, the
    metrics its totals (per-stage success, premature/late switches, switch latency) and ``switch_misses``: for each
    tick that switched and missed its deadline, the switch's latency and the tick's policy and total time.
    """
    if hz is not None and not hz >= 0:
        raise ValueError(f"hz={hz}: must be > 0, or 0 / None to run unpaced")
    controller.check_env(env.observation_space, env.action_space)
    rate = _FixedRate(hz)
    faults_at_reset = 0
    ticks = 0
    switch_misses: list[tuple[int, float]] = []  # (tick index in the run, that switch's latency)

    def on_reset(started: list[Episode], info: dict[str, Any]) -> None:
        nonlocal faults_at_reset
        controller.reset()
        faults_at_reset = controller.fault_count
        started[0].success = bool(info.get("success", False))  # the controller also counts a scene that starts solved
        started[0].fields.update(faults=0, deadline_misses=0)
        if sequencer is not None:
            sequencer.reset(info)
            started[0].fields.update(switch_deadline_misses=0, **sequencer.record())
        rate.start()

    def on_step(tick: Tick) -> None:
        nonlocal ticks
        episode = tick.episodes[0]
        episode.fields["faults"] = controller.fault_count - faults_at_reset
        if sequencer is not None:
            sequencer.observe(tick.info, bool(tick.running[0]))
            episode.fields.update(sequencer.record())
            controller.apply_pending()  # the switch it asked for, in the idle time before the next deadline
        if tick.running[0] and not rate.wait(tick.stepped_at):
            episode.fields["deadline_misses"] += 1
            if sequencer is not None and controller.switched:
                episode.fields["switch_deadline_misses"] += 1
                switch_misses.append((ticks, controller.switch_s[-1]))
        ticks += 1

    act = controller.select_action if sequencer is None else sequencer.select_action
    run = play_episodes(env, act, episodes, seed=seed, on_reset=on_reset, on_step=on_step, progress=on_episode)
    metrics = {
        **run.metrics("control"),
        "control/ticks": len(run.tick_s),
        "control/faults": sum(e["faults"] for e in run.episodes),
        "control/deadline_misses": sum(e["deadline_misses"] for e in run.episodes),
        "control/hz": float(hz or 0.0),
        **timing_metrics("control/policy", run.act_s, "ms"),
        **timing_metrics("control/tick", run.tick_s, "ms"),
    }
    if sequencer is not None:
        # what the ticks that switched and missed spent: the switch itself, the policy call, the whole tick
        metrics |= {**sequencer.metrics(run.episodes),
                    "control/switch_deadline_misses": len(switch_misses),
                    "switch_misses": [{"switch_us": 1e6 * switch_s, "policy_ms": 1e3 * run.act_s[i],
                                       "tick_ms": 1e3 * run.tick_s[i]} for i, switch_s in switch_misses]}
    return {**metrics, "episodes": run.episodes}


def control_main(bundle: str | Path, env_id: str, hz: float | None = None, episodes: int = 20,
                 seed: int = EVAL_SEED, *, task_id: int | None = None, threads: int | None = 1,
                 on_episode: Callable[[int], None] | None = None, sequence: Sequence[str] | None = None,
                 switch: str | None = None, schedule: Sequence[int] | None = None, threshold: float | None = None,
                 k: int | None = None, timeout: int | Sequence[int] | None = None,
                 finish: str | None = None) -> dict[str, Any]:
    """``robolora control``: load ``bundle``, make ``env_id`` to its spec and run ``episodes`` at ``hz``.

    ``hz`` defaults to the bundle's ``control_hz``; 0 runs unpaced. A base bundle that takes a task id runs
    ``task_id``, by default the env's index in ``robolora.envs.BASE_TASKS``.

    A multi-skill bundle, or any ``sequence`` / ``switch``, runs a ``robolora.sequencer.Sequencer``: ``sequence``
    (default: the bundle's), ``switch`` "learned" (default), "schedule" (with ``schedule``) or "command" (the
    env's stage success stands in for the external planner), ``threshold``/``k``/``timeout`` overriding the
    bundle's, ``finish`` what follows the last skill's signal ("hold", the default, or "continue"). Every argument
    is checked before the env is made.
    """
    import gymnasium as gym

    import robolora.envs as envs

    controller = load_bundle(bundle, task_id=task_id, threads=threads)
    sequencer = None
    if len(controller.skills) > 1 or sequence is not None or switch is not None:
        from robolora.sequencer import Sequencer, stage_success_planner

        switch = switch or "learned"
        sequencer = Sequencer(controller, sequence, switch, schedule=schedule, threshold=threshold, k=k,
                              timeout=timeout, planner=stage_success_planner if switch == "command" else None,
                              finish=finish or "hold")
    elif schedule or threshold is not None or k is not None or timeout is not None or finish is not None:
        raise ValueError("schedule, threshold, k, timeout and finish drive skill sequences; pass a sequence or a "
                         "switch")
    spec = controller.spec
    if spec.num_tasks and controller.task_id is None:
        name = envs.get_spec(env_id).name
        if name not in envs.BASE_TASKS:
            raise BundleError(f"bundle {bundle} is a base policy without a skill and {env_id} is not a base task "
                              f"{list(envs.BASE_TASKS)}; export it with --skill, or pass task_id")
        controller.task_id = envs.BASE_TASKS.index(name)
    env = gym.make(envs.get_spec(env_id).env_id, image_size=spec.image_size, cameras=spec.cameras)
    try:
        metrics = run_episodes(env, controller, episodes, spec.control_hz if hz is None else hz, seed, on_episode,
                               sequencer=sequencer)
    finally:
        env.close()
    return {**metrics, "bundle": str(bundle), "env_id": env_id, "skill": spec.skill,
            "skills": list(controller.skills if sequencer is None else sequencer.skills),
            "switch": None if sequencer is None else sequencer.switch, "task_id": controller.task_id}
