"""Rollout evaluation (docs/design.md §5): success rate with a 95% Wilson interval, episode length, latency, video.

Episodes are seeded ``seed, seed + 1, ...``; the default ``EVAL_SEED`` is far from the seeds demos are collected
with (``robolora collect`` starts at 0), so evaluation is on held-out scenes. Parallel environments run in waves:
each wave resets ``num_envs`` environments with consecutive seeds and steps them in lock-step through one batched
policy call until all have ended; results do not depend on ``num_envs``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from robolora.episodes import play_episodes, timing_metrics
from robolora.stats import EVAL_SEED, wilson_interval

__all__ = ["EVAL_SEED", "evaluate", "make_env", "wilson_interval", "write_video"]


def write_video(frames: list[np.ndarray], path: str | Path, fps: int = 20) -> Path:
    """Write RGB frames as .gif (Pillow) or .mp4 (imageio with ffmpeg)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not frames:
        raise ValueError("no frames to write")
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    if path.suffix == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        images[0].save(tmp, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    elif path.suffix == ".mp4":
        try:
            import imageio.v2 as imageio

            imageio.mimwrite(tmp, frames, fps=fps, macro_block_size=1)
        except (ImportError, ValueError, RuntimeError) as e:
            raise RuntimeError(f"cannot write {path}: mp4 needs imageio with ffmpeg (pip install "
                               f"'imageio[ffmpeg]'); or write a .gif instead ({e})") from e
    else:
        raise ValueError(f"video path {path} must end in .gif or .mp4")
    tmp.replace(path)
    return path


def make_env(env_id: str, env_kwargs: dict[str, Any]) -> gym.Env:
    """``gym.make`` of a robolora task (registers the tasks first)."""
    from robolora.envs import make

    return make(env_id, **env_kwargs)


def env_action_bounds(env_id: str) -> tuple[float, float]:
    """The action bounds of a robolora env, by task name or gym id (one interval for every dimension)."""
    from robolora.envs import make

    env = make(env_id)
    try:
        return float(env.action_space.low.min()), float(env.action_space.high.max())
    finally:
        env.close()


def _make_envs(env_id: str, num_envs: int, env_kwargs: dict[str, Any]) -> gym.vector.VectorEnv:
    from robolora.envs import make  # torch-free: spawned workers import only the envs, not this module

    fns = [functools.partial(make, env_id, **env_kwargs) for _ in range(num_envs)]
    if num_envs == 1:
        return gym.vector.SyncVectorEnv(fns)
    return gym.vector.AsyncVectorEnv(fns, context="spawn")


def evaluate(
    policy: Any,
    env_id: str,
    episodes: int = 50,
    *,
    seed: int = EVAL_SEED,
    num_envs: int = 1,
    task_id: int | None = None,
    video_path: str | Path | None = None,
    env_kwargs: dict[str, Any] | None = None,
    on_episode: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run ``episodes`` seeded episodes of ``env_id`` with ``policy.select_action``; return metrics.

    ``policy`` needs ``reset()`` and ``select_action(obs)`` on a batched observation dict (a VisuomotorPolicy,
    a SkillManager, or the torch-free controller). ``task_id`` is added to every observation when given.
    Returns ``eval/success_rate``, ``eval/ci_low``, ``eval/ci_high``, ``eval/mean_length``, ``eval/episodes``,
    ``eval/latency_ms_p50|p99|max`` (the ``select_action`` call), the per-episode ``episodes`` list (seed, success,
    length) and ``video`` when written.
    """
    if episodes < 1:
        raise ValueError(f"episodes={episodes}: must be >= 1")
    if num_envs < 1:
        raise ValueError(f"num_envs={num_envs}: must be >= 1")
    kwargs = dict(env_kwargs or {})
    if video_path is not None:
        kwargs["render_mode"] = "rgb_array"
    envs = _make_envs(env_id, min(num_envs, episodes), kwargs)
    task_ids = {} if task_id is None else {"task_id": np.full(envs.num_envs, task_id, dtype=np.int64)}

    def act(obs: dict[str, np.ndarray]) -> np.ndarray:
        return policy.select_action({**obs, **task_ids})

    try:
        run = play_episodes(envs, act, episodes, seed=seed, on_reset=lambda _episodes, _info: policy.reset(),
                            render=None if video_path is None else lambda: envs.call("render")[0],
                            progress=on_episode)
    finally:
        envs.close()
    metrics: dict[str, Any] = {**run.metrics("eval"), **timing_metrics("eval/latency", run.act_s, "ms"),
                               "episodes": run.episodes}
    if video_path is not None:
        metrics["video"] = str(write_video(run.frames, video_path))
    return metrics
