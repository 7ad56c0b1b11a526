"""Demo datasets: DART-labelled expert episodes on disk and a memory-mapped behaviour-cloning Dataset.

docs/design.md §5. A dataset is a folder of ``episode_XXXXXX.safetensors`` files plus ``manifest.json``. Each episode
records the clean expert action as the label (``action``) and the noisy action that was executed
(``action_exec``), as in DART (Laskey et al., 2017, "DART: Noise Injection for Robust Imitation Learning"), so the
demos contain the recoveries a policy needs. ``success[t]`` is ``info["success"]`` after executing ``action[t]``.

Episodes end at success, so a demo shows the goal reached in hardly a frame. ``post_success=N`` records N more
steps of the expert after success (the env run without terminating; the expert's own finish: wipe lifts the sponge
off, dish_rack retreats from the rack), which a completion head needs as positives (robolora.completion).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from torch.utils.data import Dataset

from robolora.atomic import write_json

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
STD_FLOOR = 1e-2
_ACTION_DIM = 4
_PROPRIO_DIM = 10
_MAX_ATTEMPTS_PER_EPISODE = 10


def episode_filename(index: int) -> str:
    """File name of the episode in slot ``index`` of a dataset folder."""
    return f"episode_{index:06d}.safetensors"


def _episode_keys(cameras: Sequence[str]) -> dict[str, str]:
    """Tensor name -> safetensors dtype, for every tensor an episode file must hold."""
    keys = {f"obs.rgb_{cam}": "U8" for cam in cameras}
    keys.update({"obs.proprio": "F32", "action": "F32", "action_exec": "F32", "success": "U8"})
    return keys


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------- collection


class _EpisodeRunner:
    """Runs seeded expert episodes in one process and writes each to a staging file (used in workers too)."""

    def __init__(self, env_id: str, image_size: int, cameras: tuple[str, ...], post_success: int = 0) -> None:
        os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is first imported in this process
        from robolora.envs import make, make_expert

        self.post_success = int(post_success)
        self.env = make(env_id, image_size=image_size, cameras=cameras, terminate_on_success=not self.post_success)
        self._make_expert = make_expert
        self.env_id = self.env.spec.id if self.env.spec is not None else env_id
        self.cameras = cameras
        self.image_size = image_size
        probe = make_expert(self.env, seed=0)
        self.default_noise = float(probe.default_noise)
        self.expert_name = type(probe).__name__
        # The phases the expert executes without noise change what its demos show, so they are part of the
        # settings a resumed folder must match (recorded only where there are any, so older folders stay valid).
        self.quiet_phases = ",".join(sorted(getattr(probe, "quiet_phases", ())))

    def run(self, seed: int, noise: float) -> dict[str, np.ndarray]:
        obs, info = self.env.reset(seed=seed)
        expert = self._make_expert(self.env, seed=seed)
        expert.reset()
        steps: dict[str, list[np.ndarray]] = {key: [] for key in _episode_keys(self.cameras)}
        done, extra = False, None  # extra: steps still to record after success (post_success)
        while not done:
            clean = np.asarray(expert.act(), dtype=np.float32)
            executed = np.asarray(expert.perturb(clean, noise), dtype=np.float32)
            for cam in self.cameras:
                steps[f"obs.rgb_{cam}"].append(obs[f"rgb_{cam}"])
            steps["obs.proprio"].append(obs["proprio"])
            steps["action"].append(clean)
            steps["action_exec"].append(executed)
            obs, _, terminated, truncated, info = self.env.step(executed)
            steps["success"].append(np.uint8(bool(info["success"])))
            if extra is None and info["success"] and self.post_success:
                extra = self.post_success
            elif extra is not None:
                extra -= 1
            done = terminated or truncated or extra == 0
        return {key: np.stack(values) for key, values in steps.items()}

    def collect_one(self, seed: int, noise: float, task: str, stage_dir: str, keep_failed: bool) -> dict[str, Any]:
        arrays = self.run(seed, noise)
        length = int(arrays["action"].shape[0])
        success = bool(arrays["success"].any())  # without post_success only the last step can be
        result: dict[str, Any] = {"seed": seed, "length": length, "success": success, "staged": None}
        if success or keep_failed:
            metadata = {
                "format_version": str(FORMAT_VERSION), "env_id": self.env_id, "task": task, "seed": str(seed),
                "expert": self.expert_name, "noise": repr(float(noise)), "length": str(length),
                "success": str(int(success)), "image_size": str(self.image_size),
                "cameras": ",".join(self.cameras), "sha256": _checksum(arrays),
            }
            if self.quiet_phases:
                metadata["quiet_phases"] = self.quiet_phases
            if self.post_success:
                metadata["post_success"] = str(self.post_success)
            staged = Path(stage_dir) / f".staged_seed{seed}.tmp-{os.getpid()}"
            save_file(arrays, str(staged), metadata=metadata)
            result["staged"] = str(staged)
        return result


_WORKER_RUNNER: _EpisodeRunner | None = None


def _init_worker(env_id: str, image_size: int, cameras: tuple[str, ...], post_success: int) -> None:
    global _WORKER_RUNNER
    os.environ.setdefault("MUJOCO_GL", "egl")
    torch.set_num_threads(1)
    _WORKER_RUNNER = _EpisodeRunner(env_id, image_size, cameras, post_success)


def _worker_collect_one(seed: int, noise: float, task: str, stage_dir: str, keep_failed: bool) -> dict[str, Any]:
    assert _WORKER_RUNNER is not None, "worker used before _init_worker"
    return _WORKER_RUNNER.collect_one(seed, noise, task, stage_dir, keep_failed)


def _valid_episode_seed(path: Path, expected: dict[str, str | None]) -> int | None:
    """Seed of a complete, uncorrupted episode file collected with ``expected`` settings; None if unusable.

    Raises ValueError when the file is intact but was collected with other settings (mixing would corrupt data).
    """
    try:
        arrays = load_file(str(path))
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("sha256") != _checksum(arrays) or int(metadata["length"]) != len(arrays["action"]):
            raise ValueError("checksum or length mismatch")
    except Exception as exc:  # any decoding failure means the file must be recollected
        logger.warning("episode file %s is corrupt or truncated (%s); recollecting it", path, exc)
        return None
    for key, value in expected.items():
        if metadata.get(key) != value:
            raise ValueError(
                f"{path} was collected with {key}={metadata.get(key)!r} but this call uses {key}={value!r}; "
                "collect into a new folder or repeat the original settings to resume"
            )
    return int(metadata["seed"])


def collect(
    env_id: str,
    episodes: int,
    out_dir: str | Path,
    seed: int = 0,
    noise: float | None = None,
    workers: int = 1,
    image_size: int = 64,
    cameras: tuple[str, ...] = ("front",),
    only_successful: bool = True,
    progress: Callable[[int], None] | None = None,
    post_success: int = 0,
) -> dict[str, Any]:
    """Collect ``episodes`` scripted-expert demos of ``env_id`` (a task name or gym id) into ``out_dir``.

    Episode seeds are drawn in order from ``seed, seed+1, ...``; with ``only_successful`` a failed seed is recorded in
    the manifest's ``failed_seeds`` and the next seed is tried, so slot i holds the i-th successful seed. Resumable:
    valid episode files already in ``out_dir`` are kept, missing or corrupt ones are recollected (a seed listed in
    the manifest is reused, so the content is identical). A folder that already holds more than ``episodes`` keeps all
    of them. ``noise`` None uses the expert's default. ``workers`` > 1
    runs episodes in separate processes (forkserver or spawn: a calling script needs the usual
    ``if __name__ == "__main__":`` guard); the result does not depend on it. ``progress(n)`` is called with the
    number of finished episodes. ``post_success=N`` records N more expert steps after the first success (module
    docstring; fewer when the time limit comes first). Returns the manifest written to ``out_dir/manifest.json``.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
    if isinstance(post_success, bool) or not isinstance(post_success, int) or post_success < 0:
        raise ValueError(f"post_success must be an int >= 0 (expert steps recorded after success), got "
                         f"{post_success!r}")
    cameras = tuple(cameras)
    from robolora.envs import TASKS

    runner = _EpisodeRunner(env_id, image_size, cameras, post_success)
    task = {gym_id: name for name, gym_id in TASKS.items()}.get(runner.env_id, runner.env_id)
    noise = runner.default_noise if noise is None else float(noise)
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1] (std of the action noise), got {noise}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp-*"):
        stale.unlink()

    previous = _previous_manifest(out)
    if previous is not None and (previous.get("seed"), previous.get("only_successful")) != (seed, only_successful):
        raise ValueError(
            f"{out} was collected with seed={previous.get('seed')}, only_successful="
            f"{previous.get('only_successful')}; this call uses seed={seed}, only_successful={only_successful}. "
            "Use a new folder or the same settings"
        )
    held = len(previous.get("episodes", [])) if previous is not None else 0
    if held > episodes:
        # Asking for fewer episodes than the folder holds must not drop the rest from the manifest (a 25-demo run
        # on a 50-demo folder once left later 50-demo runs without data); use ``max_episodes`` to train on fewer.
        logger.info("collect %s: %s already holds %d episodes (> %d asked for); keeping all of them", runner.env_id,
                    out, held, episodes)
        episodes = held
    expected: dict[str, str | None] = {"env_id": runner.env_id, "noise": repr(noise), "image_size": str(image_size),
                                       "cameras": ",".join(cameras)}
    if runner.quiet_phases:
        expected["quiet_phases"] = runner.quiet_phases
    expected["post_success"] = str(post_success) if post_success else None  # None: files that record none
    slots: dict[int, int] = {}
    for index in range(episodes):
        path = out / episode_filename(index)
        if path.exists() and (found := _valid_episode_seed(path, expected)) is not None:
            slots[index] = found
    failed = set(previous.get("failed_seeds", [])) if previous is not None else set()
    missing = [index for index in range(episodes) if index not in slots]
    logger.info("collect %s -> %s: %d episodes present, %d to collect", runner.env_id, out, len(slots), len(missing))
    if progress is not None:
        progress(len(slots))

    used = set(slots.values())
    candidates = (s for s in _count_from(seed) if s not in used and s not in failed)
    args = (noise, task, str(out), not only_successful)
    try:
        if workers == 1 or len(missing) <= 1:
            _fill_slots(_InlineExecutor(), runner.collect_one, 1, missing, candidates, args, out, slots, failed,
                        progress, runner.env_id)
        else:
            context = _worker_context()
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                     initargs=(runner.env_id, image_size, cameras, post_success)) as pool:
                _fill_slots(pool, _worker_collect_one, workers, missing, candidates, args, out, slots, failed,
                            progress, runner.env_id)
    finally:
        runner.env.close()
    manifest = _build_manifest(out, runner, task, seed, noise, only_successful, slots, failed, image_size, cameras)
    write_json(out / MANIFEST_NAME, manifest)
    logger.info("collect %s: %d episodes, expert success rate %.3f", runner.env_id, episodes, manifest["success_rate"])
    return manifest


def _previous_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of an earlier run into ``out`` (tells which seed each slot had and which seeds failed)."""
    if not (out / MANIFEST_NAME).exists():
        return None
    try:
        return load_manifest(out)
    except ValueError as exc:
        logger.warning("ignoring unreadable manifest in %s (%s); it is rewritten at the end", out, exc)
        return None


def _count_from(start: int) -> Iterator[int]:
    value = start
    while True:
        yield value
        value += 1


def _worker_context() -> multiprocessing.context.BaseContext:
    """A start method that is safe after torch and EGL are initialised: forkserver (spawn where unavailable).

    The fork server imports this module (and so torch) once, and every worker forks from it, instead of each worker
    importing torch itself (~3 s on a busy 2-core machine).
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


class _InlineExecutor:
    """Runs submitted work at once in this process: the serial path shares the parallel scheduler."""

    def submit(self, fn: Callable[..., dict[str, Any]], *args: Any) -> Future[dict[str, Any]]:
        future: Future[dict[str, Any]] = Future()
        future.set_result(fn(*args))
        return future


def _fill_slots(executor: ProcessPoolExecutor | _InlineExecutor, work: Callable[..., dict[str, Any]], workers: int,
                missing: list[int], candidates: Iterator[int], args: tuple[Any, ...], out: Path,
                slots: dict[int, int], failed: set[int], progress: Callable[[int], None] | None, env_id: str) -> None:
    """Run candidate seeds until every missing slot holds an episode; commit in seed order (so workers don't matter)."""
    max_attempts = _MAX_ATTEMPTS_PER_EPISODE * len(missing)
    attempts = 0
    pending: dict[int, Future[dict[str, Any]]] = {}
    finished: dict[int, dict[str, Any]] = {}
    order: list[int] = []
    todo = list(missing)
    while todo:
        # Never more episodes in flight than slots left, so no successful episode is thrown away.
        while len(pending) < 2 * workers and len(pending) + len(finished) < len(todo):
            if attempts == max_attempts:
                raise RuntimeError(
                    f"the {env_id} expert failed {len(failed)} times in {attempts} attempts ({len(slots)} episodes "
                    "collected); check the expert, lower the noise or pass only_successful=False"
                )
            attempts += 1
            order.append(next(candidates))
            pending[order[-1]] = executor.submit(work, order[-1], *args)
        wait(pending.values(), return_when=FIRST_COMPLETED)
        for seed in [seed for seed, future in pending.items() if future.done()]:
            finished[seed] = pending.pop(seed).result()
        # Commit strictly in seed order so slot i always gets the i-th successful seed, as in a serial run.
        while order and order[0] in finished:
            if _commit(finished.pop(order.pop(0)), todo[0], out, slots, failed):
                todo.pop(0)
                if progress is not None:
                    progress(len(slots))


def _commit(result: dict[str, Any], index: int, out: Path, slots: dict[int, int], failed: set[int]) -> bool:
    """Move a finished episode into slot ``index``; record a failed seed instead. True when the slot was filled."""
    if result["staged"] is None:
        failed.add(result["seed"])
        logger.debug("seed %d failed (length %d); drawing another", result["seed"], result["length"])
        return False
    os.replace(result["staged"], out / episode_filename(index))
    slots[index] = result["seed"]
    return True


def _build_manifest(out: Path, runner: _EpisodeRunner, task: str, seed: int, noise: float, only_successful: bool,
                    slots: dict[int, int], failed: set[int], image_size: int,
                    cameras: tuple[str, ...]) -> dict[str, Any]:
    entries, proprio, action = [], [], []
    for index in sorted(slots):
        with safe_open(str(out / episode_filename(index)), framework="numpy") as handle:
            tensors = {name: handle.get_tensor(name) for name in ("obs.proprio", "action", "success")}
        proprio.append(tensors["obs.proprio"].astype(np.float64))
        action.append(tensors["action"].astype(np.float64))
        entries.append({"file": episode_filename(index), "seed": slots[index], "length": len(tensors["action"]),
                        "success": bool(tensors["success"].any())})
    proprio_all, action_all = np.concatenate(proprio), np.concatenate(action)
    successes = sum(entry["success"] for entry in entries)
    return {
        "format_version": FORMAT_VERSION, "env_id": runner.env_id, "task": task, "image_size": image_size,
        "cameras": list(cameras), "seed": seed, "noise": noise, "expert": runner.expert_name,
        "quiet_phases": runner.quiet_phases.split(",") if runner.quiet_phases else [],
        "only_successful": only_successful, "post_success": runner.post_success, "episodes": entries,
        "failed_seeds": sorted(failed),
        "success_rate": successes / (len(entries) + len(failed)),
        "stats": {
            "proprio_mean": proprio_all.mean(0).tolist(), "proprio_std": proprio_all.std(0).tolist(),
            "action_mean": action_all.mean(0).tolist(), "action_std": action_all.std(0).tolist(),
            "action_min": action_all.min(0).tolist(), "action_max": action_all.max(0).tolist(),
        },
        "counts": {"episodes": len(entries), "steps": int(len(action_all)), "successful_episodes": successes,
                   "failed_seeds": len(failed), "attempts": len(entries) + len(failed)},
    }


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check ``manifest.json`` of a dataset folder; a clear error if the folder is not a dataset."""
    folder = Path(path)
    manifest_path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {folder} does not exist; create it with robolora.data.collect(...) "
                                "or `robolora collect`")
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{folder} is not a robolora dataset (no {MANIFEST_NAME}); create one with "
                                "robolora.data.collect(...) or `robolora collect`, or resume an interrupted "
                                "collection by running it again on this folder")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{manifest_path} is not valid JSON ({exc}); rerun collect on {folder} to rewrite it") from exc
    required = ("format_version", "env_id", "task", "image_size", "cameras", "episodes", "stats", "counts")
    missing = [key for key in required if key not in manifest]
    if missing:
        raise ValueError(f"{manifest_path} lacks {missing}; rerun collect on {folder} to rewrite it")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{manifest_path} has format_version {manifest['format_version']}, this robolora reads "
                         f"{FORMAT_VERSION}; recollect the dataset")
    return manifest


# ---------------------------------------------------------------------------------------------------- loading


class BCDataset(Dataset):
    """Behaviour-cloning samples (one per time step) from one or more dataset folders, images memory-mapped.

    Item: ``rgb_<camera>`` uint8 (H, W, 3), ``proprio`` float32 (10,), ``task_id`` int64 scalar, ``action`` float32
    (K, 4) = the clean actions t..t+K-1 of the episode, the steps past its end filled with its last action and
    flagged in ``action_is_pad`` bool (K,). Proprio and actions (a few MB) live in RAM; frames are sliced out of the
    memory-mapped episode files on access, so workers share the page cache instead of copying every image.
    ``task_ids`` maps task name -> id; None uses the order of ``robolora.envs.TASKS`` (base tasks 0..4).
    ``max_episodes`` keeps only the first N episodes of each folder (a demo budget, e.g. 10/25/50 demos).
    Episodes collected with ``post_success`` (for completion heads) end at their first success step unless
    ``keep_post_success``: what the expert does after the goal (wipe lifts the sponge) is not the skill, and
    cloning it cost a 50-demo wipe adapter everything (0.00 held-out against 0.76 without those frames).
    A missing, corrupt or truncated episode file raises an error naming it.
    """

    def __init__(self, dirs: Sequence[str | Path], chunk_size: int, task_ids: dict[str, int] | None = None,
                 max_episodes: int | None = None, keep_post_success: bool = False) -> None:
        if isinstance(dirs, (str, Path)):
            dirs = [dirs]
        if not dirs:
            raise ValueError("dirs is empty; pass at least one dataset folder made by robolora.data.collect")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if task_ids is None:
            from robolora.envs import TASKS

            task_ids = {name: index for index, name in enumerate(TASKS)}
        self.chunk_size = chunk_size
        self.manifests = [load_manifest(folder) for folder in dirs]
        first = self.manifests[0]
        self.image_size: int = first["image_size"]
        self.cameras: tuple[str, ...] = tuple(first["cameras"])
        for folder, manifest in zip(dirs, self.manifests):
            if (manifest["image_size"], tuple(manifest["cameras"])) != (self.image_size, self.cameras):
                raise ValueError(
                    f"{folder} has image_size={manifest['image_size']}, cameras={manifest['cameras']} but {dirs[0]} "
                    f"has image_size={self.image_size}, cameras={list(self.cameras)}; datasets must match"
                )
            if max_episodes is not None and len(manifest["episodes"]) < max_episodes:
                raise ValueError(f"{folder} has {len(manifest['episodes'])} episodes but max_episodes={max_episodes}; "
                                 f"collect more with `robolora collect --episodes {max_episodes}` on that folder")
            if manifest["task"] not in task_ids:
                raise ValueError(f"task {manifest['task']!r} of {folder} has no id in task_ids {task_ids}")
        self.files: list[str] = []
        self.task_of_episode: list[int] = []
        proprio, actions, lengths = [], [], []
        for folder, manifest in zip(dirs, self.manifests):
            for entry in manifest["episodes"][:max_episodes]:
                path = Path(folder) / entry["file"]
                episode = _read_episode_header(path, entry["length"], self.cameras, self.image_size)
                length = entry["length"]
                if manifest.get("post_success") and not keep_post_success:
                    hits = episode["success"].nonzero()
                    if len(hits):
                        length = int(hits[0]) + 1  # the step whose action reached the goal is the last kept
                self.files.append(str(path))
                self.task_of_episode.append(task_ids[manifest["task"]])
                proprio.append(episode["obs.proprio"][:length])
                actions.append(episode["action"][:length])
                lengths.append(length)
        self.proprio = torch.cat(proprio)  # (N, 10), all steps of all episodes
        self.actions = torch.cat(actions)  # (N, 4)
        self.lengths = torch.tensor(lengths)
        self.starts = torch.cumsum(self.lengths, 0) - self.lengths  # first global step of each episode
        self._handles: dict[int, Any] = {}
        self._handles_pid = os.getpid()
        self.stats = _combine_stats(self.manifests)
        trimmed = any(m.get("post_success") for m in self.manifests) and not keep_post_success
        if max_episodes is not None or trimmed:  # statistics of exactly the frames used
            self.stats.update(_sample_stats(self.proprio, self.actions))
        logger.info("BCDataset: %d episodes, %d samples from %d folders", len(self.files), len(self), len(dirs))

    def __len__(self) -> int:
        return int(self.lengths.sum())

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        index %= len(self)
        episode = int(torch.searchsorted(self.starts, torch.tensor(index), right=True)) - 1
        t = index - int(self.starts[episode])
        first, length = int(self.starts[episode]), int(self.lengths[episode])
        steps = torch.arange(t, t + self.chunk_size)
        handle = self._handle(episode)
        item = {f"rgb_{cam}": handle.get_slice(f"obs.rgb_{cam}")[t] for cam in self.cameras}
        item["proprio"] = self.proprio[first + t]
        item["task_id"] = torch.tensor(self.task_of_episode[episode], dtype=torch.int64)
        item["action"] = self.actions[first + steps.clamp(max=length - 1)]  # (K, 4), padded with the last action
        item["action_is_pad"] = steps >= length  # (K,)
        return item

    def get_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The collated batch of ``indices``, gathered in one vectorised pass (the training loop's fast path).

        Equal to ``default_collate([self[i] for i in indices])``. Each episode's frames are read once from the
        memory map and kept in RAM (a 1,000-episode base dataset at 64 px is about 0.5 GB), so after the first
        epoch a batch costs one gather instead of 64 safetensors slice reads.
        """
        index = torch.as_tensor(list(indices), dtype=torch.long) % len(self)  # (B,)
        episode = torch.searchsorted(self.starts, index, right=True) - 1  # (B,)
        first, length = self.starts[episode], self.lengths[episode]
        t = index - first
        steps = t[:, None] + torch.arange(self.chunk_size)  # (B, K)
        batch: dict[str, torch.Tensor] = {}
        for cam in self.cameras:
            frames = [self._frames(int(e), cam)[int(s)] for e, s in zip(episode, t)]
            batch[f"rgb_{cam}"] = torch.stack(frames)  # (B, H, W, 3)
        batch["proprio"] = self.proprio[index]
        batch["task_id"] = torch.as_tensor(self.task_of_episode, dtype=torch.int64)[episode]
        batch["action"] = self.actions[first[:, None] + torch.minimum(steps, length[:, None] - 1)]  # (B, K, 4)
        batch["action_is_pad"] = steps >= length[:, None]
        return batch

    def _frames(self, episode: int, cam: str) -> torch.Tensor:
        cache = self.__dict__.setdefault("_frame_cache", {})
        if (episode, cam) not in cache:
            cache[(episode, cam)] = self._handle(episode).get_tensor(f"obs.rgb_{cam}")
        return cache[(episode, cam)]

    def _handle(self, episode: int) -> Any:
        # mmap handles are per process: DataLoader workers (fork or spawn) open their own on first use.
        if self._handles_pid != os.getpid():
            self._handles, self._handles_pid = {}, os.getpid()
        if episode not in self._handles:
            self._handles[episode] = safe_open(self.files[episode], framework="pt")
        return self._handles[episode]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        state["_frame_cache"] = {}
        return state


def _read_episode_header(path: Path, length: int, cameras: tuple[str, ...], image_size: int) -> dict[str, torch.Tensor]:
    """Check an episode file's layout without reading its images; return its proprio and actions."""
    fix = "delete it and run collect on its folder again to recollect it"
    if not path.is_file():
        raise FileNotFoundError(f"episode file {path} listed in the manifest is missing; run collect on its folder "
                                "again to recollect it")
    try:
        with safe_open(str(path), framework="pt") as handle:
            expected_shapes = {f"obs.rgb_{cam}": [length, image_size, image_size, 3] for cam in cameras}
            expected_shapes.update({"obs.proprio": [length, _PROPRIO_DIM], "action": [length, _ACTION_DIM],
                                    "action_exec": [length, _ACTION_DIM], "success": [length]})
            for name, dtype in _episode_keys(cameras).items():
                if name not in handle.keys():
                    raise ValueError(f"tensor {name!r} is missing")
                tensor = handle.get_slice(name)
                if tensor.get_dtype() != dtype or list(tensor.get_shape()) != expected_shapes[name]:
                    raise ValueError(f"tensor {name!r} is {tensor.get_dtype()} {tensor.get_shape()}, expected "
                                     f"{dtype} {expected_shapes[name]}")
            arrays = {name: handle.get_tensor(name) for name in ("obs.proprio", "action", "success")}
    except Exception as exc:
        raise ValueError(f"corrupt or truncated episode file {path}: {exc}; {fix}") from exc
    if not all(bool(torch.isfinite(arrays[k]).all()) for k in ("obs.proprio", "action")):
        raise ValueError(f"episode file {path} holds non-finite proprio or actions; {fix}")
    return arrays


def _sample_stats(proprio: torch.Tensor, actions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Statistics of the loaded steps themselves (used when only part of each folder is loaded)."""
    return {"proprio_mean": proprio.mean(0), "proprio_std": proprio.std(0, unbiased=False).clamp(min=STD_FLOOR),
            "action_mean": actions.mean(0), "action_std": actions.std(0, unbiased=False).clamp(min=STD_FLOOR),
            "action_min": actions.min(0).values, "action_max": actions.max(0).values}


def _combine_stats(manifests: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pool per-folder statistics exactly (weighted by step counts); standard deviations floored at STD_FLOOR."""
    steps = torch.tensor([float(m["counts"]["steps"]) for m in manifests], dtype=torch.float64)[:, None]
    weights = steps / steps.sum()
    stats = {}
    for name in ("proprio", "action"):
        means = torch.tensor([m["stats"][f"{name}_mean"] for m in manifests], dtype=torch.float64)
        stds = torch.tensor([m["stats"][f"{name}_std"] for m in manifests], dtype=torch.float64)
        mean = (weights * means).sum(0)
        second_moment = (weights * (stds**2 + means**2)).sum(0)
        stats[f"{name}_mean"] = mean.float()
        stats[f"{name}_std"] = (second_moment - mean**2).clamp(min=0).sqrt().clamp(min=STD_FLOOR).float()
    stats["action_min"] = torch.tensor([m["stats"]["action_min"] for m in manifests]).min(0).values.float()
    stats["action_max"] = torch.tensor([m["stats"]["action_max"] for m in manifests]).max(0).values.float()
    return stats
