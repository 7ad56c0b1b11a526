"""The episode runner behind every evaluation loop (docs/design.md §5): seeded episodes, success, Wilson intervals,
latency percentiles, video frames.

``evaluate`` (batched policies on Gymnasium vector envs), ``rollout`` (skill switching between ticks) and the
deploy controller's fixed-rate ``run_episodes`` all call :func:`play_episodes`; what differs between them is
passed in as small callables: ``act(obs) -> action``, ``on_reset(episodes, info)`` after every env reset and
``on_step(tick)`` after every env step (switch skills, keep deadlines, add fields to the episode records).
``evaluate_sb3`` runs SB3's own loop and summarises its episodes with :func:`episode_metrics`.

Seeding: episode ``i`` runs on seed ``seed + i``. A vector env of ``n`` envs runs the episodes in waves: each
wave resets all ``n`` envs with consecutive seeds and steps them in lock-step until every counted episode has
ended (envs past the last episode are stepped but not counted), so results do not depend on ``n``.

Success: an episode succeeds when ``info["success"]`` is true after any of its steps. Length: its number of steps.

Imports numpy, the standard library and ``robolora.stats`` only (gymnasium lazily), so the torch-free controller
can use it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from robolora.stats import wilson_interval

if TYPE_CHECKING:
    import gymnasium as gym

logger = logging.getLogger(__name__)

__all__ = ["Episode", "EpisodeRun", "Tick", "episode_metrics", "play_episodes", "rate_metrics", "timing_metrics"]

TIME_UNITS = {"s": 1.0, "ms": 1e3, "us": 1e6}


@dataclass
class Episode:
    """One episode's record while it runs; hooks may set ``success`` or add their own ``fields``."""

    seed: int
    success: bool = False
    length: int = 0
    fields: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """``{"seed", "success", "length", **fields}``: the per-episode entry callers return."""
        return {"seed": self.seed, "success": self.success, "length": self.length, **self.fields}


@dataclass(frozen=True)
class Tick:
    """What ``on_step`` sees after one env step: ``episodes[i]`` runs on env ``i``."""

    episodes: list[Episode]
    info: dict[str, Any]  # the env's step info (a vector env's: arrays over its envs)
    ended: np.ndarray  # (len(episodes),) bool: the episode ended at this step
    running: np.ndarray  # (len(episodes),) bool: the episode goes on after this step
    stepped_at: float  # time.perf_counter() right after env.step returned


@dataclass(frozen=True)
class EpisodeRun:
    """Per-episode records in seed order, per-tick timings (seconds) and the first episode's frames."""

    episodes: list[dict[str, Any]]
    act_s: list[float]  # each act(obs) call
    tick_s: list[float]  # each act(obs) + env.step(action)
    frames: list[np.ndarray]

    def metrics(self, prefix: str) -> dict[str, float]:
        """:func:`episode_metrics` of these episodes."""
        return episode_metrics(prefix, self.episodes)


def play_episodes(
    env: gym.Env | gym.vector.VectorEnv,
    act: Callable[[Any], Any],
    episodes: int,
    *,
    seed: int,
    on_reset: Callable[[list[Episode], dict[str, Any]], None] | None = None,
    on_step: Callable[[Tick], None] | None = None,
    render: Callable[[], np.ndarray] | None = None,
    progress: Callable[[int], None] | None = None,
) -> EpisodeRun:
    """Run ``episodes`` episodes seeded ``seed, seed + 1, ...`` on ``env`` (one env or a Gymnasium vector env).

    ``act(obs)`` gets the observation as the env returns it (batched for a vector env) and returns the action,
    sent to the env as float32. ``on_reset(episodes, info)`` runs after each reset with the episodes about to
    start and the reset info; ``on_step(tick)`` after each step. ``render()`` returns a frame of the first
    episode's env: given, that episode is recorded after its reset and after each of its steps.
    ``progress(n_done)`` runs after each finished episode. The env is neither made nor closed here.
    """
    import gymnasium as gym

    if episodes < 1:
        raise ValueError(f"episodes={episodes}: must be >= 1")
    vector = isinstance(env, gym.vector.VectorEnv)
    n = env.num_envs if vector else 1
    name = getattr(getattr(env, "spec", None), "id", type(env).__name__)
    records: list[dict[str, Any]] = []
    act_s: list[float] = []
    tick_s: list[float] = []
    frames: list[np.ndarray] = []
    for wave_start in range(0, episodes, n):
        seeds = [seed + wave_start + i for i in range(n)]
        batch = [Episode(s) for s in seeds[:min(n, episodes - wave_start)]]
        obs, info = env.reset(seed=seeds if vector else seeds[0])
        if on_reset is not None:
            on_reset(batch, info)
        recording = render is not None and wave_start == 0
        if recording:
            frames.append(render())
        running = np.ones(len(batch), dtype=bool)
        while running.any():
            t0 = time.perf_counter()
            action = act(obs)
            t1 = time.perf_counter()
            obs, _, terminated, truncated, info = env.step(np.asarray(action, dtype=np.float32))
            t2 = time.perf_counter()
            act_s.append(t1 - t0)
            tick_s.append(t2 - t0)
            success = _per_env(info.get("success", False), n)[:len(batch)]
            ended = running & (_per_env(terminated, n) | _per_env(truncated, n))[:len(batch)]
            for i in np.flatnonzero(running):
                batch[i].length += 1
                batch[i].success |= bool(success[i])
            if recording and running[0]:
                frames.append(render())
            running &= ~ended
            if on_step is not None:
                on_step(Tick(batch, info, ended, running.copy(), t2))
        for episode in batch:
            records.append(episode.record())
            if progress is not None:
                progress(len(records))
        logger.info("%s: %d/%d episodes, success so far %.2f", name, len(records), episodes,
                    np.mean([r["success"] for r in records]))
    return EpisodeRun(records, act_s, tick_s, frames)


def _per_env(value: Any, n: int) -> np.ndarray:
    """A step's flag as (n,) bool: a vector env's array, or one env's scalar."""
    return np.broadcast_to(np.asarray(value, dtype=bool).reshape(-1), (n,))


def rate_metrics(key: str, successes: int, n: int) -> dict[str, float]:
    """``key/success_rate`` with its 95% Wilson interval ``key/ci_low``, ``key/ci_high``."""
    low, high = wilson_interval(successes, n)
    return {f"{key}/success_rate": successes / n, f"{key}/ci_low": low, f"{key}/ci_high": high}


def episode_metrics(prefix: str, episodes: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``prefix/success_rate``, ``prefix/ci_low``, ``prefix/ci_high``, ``prefix/mean_length`` and
    ``prefix/episodes`` of per-episode records (each with ``success`` and ``length``)."""
    if not episodes:
        raise ValueError("no episodes to summarise")
    return {
        **rate_metrics(prefix, sum(bool(e["success"]) for e in episodes), len(episodes)),
        f"{prefix}/mean_length": float(np.mean([e["length"] for e in episodes])),
        f"{prefix}/episodes": len(episodes),
    }


def timing_metrics(key: str, seconds: Sequence[float], unit: Literal["s", "ms", "us"]) -> dict[str, float]:
    """``key_<unit>_p50``, ``key_<unit>_p99`` and ``key_<unit>_max`` of durations in seconds (NaN when none)."""
    values = np.asarray(seconds, dtype=np.float64) * TIME_UNITS[unit]
    if values.size == 0:
        p50 = p99 = top = float("nan")
    else:
        p50, p99, top = float(np.percentile(values, 50)), float(np.percentile(values, 99)), float(values.max())
    return {f"{key}_{unit}_p50": p50, f"{key}_{unit}_p99": p99, f"{key}_{unit}_max": top}
