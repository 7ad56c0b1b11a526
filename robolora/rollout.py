"""Multi-skill rollouts: chain skill adapters through the two-stage kitchen, switching between control ticks.

DESIGN.md §1 ("base + adapters -> SkillManager -> control loop / rollouts (switch skills between ticks)") and §4,
issue 6 (``robolora rollout --skills wipe,dish_rack``). Skill ``i`` drives stage ``i`` of ``robolora/Kitchen-v0``
(skill order = stage order). The switch to the next skill happens between ticks, either when the env reports the
current stage's success (``switch="success"``: the skill that acts at the tick after the success signal is the
next one) or at fixed ticks (``switch="schedule"``). Every switch is ``activate(name)`` followed by
``apply_pending()``, timed together, so the reported switch latency is all the time a switch takes outside a step;
applying a switch also drops the old skill's queued actions (``SkillManager`` resets the policy).

Reported: overall and per-stage success rates with 95% Wilson intervals, mean episode length, switch latency
p50/p99/max (microseconds), policy step latency p50/p99 (milliseconds, the ``select_action`` call alone) and
per-episode records; optionally the first episode as a video with the active skill's name drawn on each frame.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np

from robolora.stats import EVAL_SEED, wilson_interval

logger = logging.getLogger(__name__)

__all__ = ["KITCHEN_ENV_ID", "parse_skills", "resolve_skill", "rollout", "rollout_main", "rollout_rows"]

KITCHEN_ENV_ID = "robolora/Kitchen-v0"
Switch = Literal["success", "schedule"]
SWITCHES: tuple[str, ...] = ("success", "schedule")


def shipped_skills_dir() -> Path:
    """Where the shipped skill adapters live: ``policies/pretrained/skills/<name>/``."""
    from importlib import resources

    return Path(str(resources.files("robolora.policies"))) / "pretrained" / "skills"


def parse_skills(skills: str | Sequence[str | Path]) -> list[str | Path]:
    """``"wipe,dish_rack"`` or a list -> a list of skill names / adapter paths (empty entries dropped)."""
    items = skills.split(",") if isinstance(skills, str) else list(skills)
    out = [s.strip() if isinstance(s, str) else s for s in items]
    return [s for s in out if s != ""]


def resolve_skill(skill: str | Path) -> Path:
    """An adapter folder: ``skill`` itself when it is an existing path, else the shipped adapter of that name."""
    path = Path(skill)
    if path.is_dir():
        return path
    if isinstance(skill, str) and "/" not in skill and "\\" not in skill:
        shipped = shipped_skills_dir() / skill
        if shipped.is_dir():
            return shipped
        available = sorted(p.name for p in shipped_skills_dir().glob("*") if p.is_dir())
        raise FileNotFoundError(f"skill {skill!r} is neither an adapter folder nor a shipped skill (shipped: "
                                f"{available}); pass the folder robolora train-skill wrote (RUN/adapter)")
    raise FileNotFoundError(f"adapter folder {skill} does not exist; pass the folder robolora train-skill wrote")


def _attach_skills(manager: Any, skills: Sequence[str | Path]) -> list[str]:
    """Names of the skills in stage order: already attached names are used as they are, others are loaded."""
    names = []
    for skill in skills:
        if isinstance(skill, str) and skill in manager.skills:
            names.append(skill)
            continue
        name = manager.load(resolve_skill(skill)).skill
        names.append(name)
    if len(set(names)) != len(names):
        raise ValueError(f"skills {names} repeat a name; each stage needs its own skill")
    return names


def _check_schedule(switch: str, schedule_ticks: Sequence[int] | None, n_skills: int) -> list[int]:
    if switch not in SWITCHES:
        raise ValueError(f"switch={switch!r} is invalid; use one of {list(SWITCHES)}")
    if switch == "success":
        if schedule_ticks is not None:
            raise ValueError("schedule_ticks is only used with switch='schedule'")
        return []
    ticks = [int(t) for t in (schedule_ticks or ())]
    if len(ticks) != n_skills - 1 or any(t < 1 for t in ticks) or ticks != sorted(set(ticks)):
        raise ValueError(f"schedule_ticks={list(schedule_ticks or ())} is invalid: give {n_skills - 1} increasing "
                         f"ticks >= 1, the tick at which each next skill takes over")
    return ticks


def _labelled(frame: np.ndarray, text: str) -> np.ndarray:
    """The frame with ``text`` drawn in its top-left corner (Pillow's default font)."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(frame)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 8 + 7 * len(text), 16), fill=(0, 0, 0))
    draw.text((4, 3), text, fill=(255, 255, 255))
    return np.asarray(image)


def _percentiles(values: list[float], scale: float) -> tuple[float, float, float]:
    array = np.asarray(values, dtype=np.float64) * scale
    if array.size == 0:
        return float("nan"), float("nan"), float("nan")
    return float(np.percentile(array, 50)), float(np.percentile(array, 99)), float(array.max())


def rollout(
    policy_or_manager: Any,
    skills: Sequence[str | Path],
    episodes: int = 50,
    seed: int = EVAL_SEED,
    switch: Switch = "success",
    schedule_ticks: Sequence[int] | None = None,
    mode: str = "bank",
    video_path: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
    env: gym.Env | None = None,
) -> dict[str, Any]:
    """Run ``episodes`` seeded kitchen episodes, skill ``i`` driving stage ``i``; return metrics.

    ``policy_or_manager``: a ``VisuomotorPolicy`` (wrapped in a ``SkillManager(policy, mode)`` that is closed at
    the end, handing the policy back as it was) or a ``SkillManager`` (used as is; ``mode`` is then ignored).
    ``skills``: names already attached to the manager, adapter folders, or shipped skill names
    (``policies/pretrained/skills/<name>``). ``switch="schedule"`` needs ``schedule_ticks``: for each next skill,
    the tick (0-based env step) at which it acts first. ``env``: an env with ``info["stage_success"]`` to run
    instead of ``robolora/Kitchen-v0`` made to the policy's image size and cameras. ``progress(n_done)`` after
    each episode. Keys: ``rollout/success_rate``, ``rollout/ci_low``, ``rollout/ci_high``,
    ``rollout/stage<i>/<skill>/success_rate`` (and ``ci_low``, ``ci_high``), ``rollout/mean_length``,
    ``rollout/switch_us_p50|p99|max``, ``rollout/latency_ms_p50|p99``, ``rollout/episodes``, ``rollout/switches``,
    ``skills``, ``episodes`` (seed, success, length, stage_success, switch_ticks) and ``video`` when written.
    """
    skills = parse_skills(skills)
    if episodes < 1:
        raise ValueError(f"episodes={episodes}: must be >= 1")
    if len(skills) < 1:
        raise ValueError("skills is empty; give one skill per stage, e.g. ['wipe', 'dish_rack']")
    ticks = _check_schedule(switch, schedule_ticks, len(skills))
    owns_manager = not (hasattr(policy_or_manager, "activate") and hasattr(policy_or_manager, "load"))
    if owns_manager:
        from robolora.skills import SkillManager

        manager = SkillManager(policy_or_manager, mode=mode)  # type: ignore[arg-type]
    else:
        manager = policy_or_manager
    owns_env = env is None
    try:
        names = _attach_skills(manager, skills)
        if env is None:
            from robolora.envs import make

            config = manager.policy.config
            env = make(KITCHEN_ENV_ID, image_size=config.image_size, cameras=tuple(config.cameras),
                       render_mode="rgb_array" if video_path is not None else None)
        if video_path is not None and env.render_mode != "rgb_array":
            raise ValueError(f"video_path needs an env made with render_mode='rgb_array' (got {env.render_mode!r})")
        return _run(manager, env, names, episodes, seed, switch, ticks, video_path, progress)
    finally:
        if owns_env and env is not None:
            env.close()
        if owns_manager:
            manager.close()


def _run(manager: Any, env: gym.Env, names: list[str], episodes: int, seed: int, switch: str, ticks: list[int],
         video_path: str | Path | None, progress: Callable[[int], None] | None) -> dict[str, Any]:
    switch_s: list[float] = []
    step_s: list[float] = []
    results: list[dict[str, Any]] = []
    frames: list[np.ndarray] = []

    def activate(name: str) -> None:
        t0 = time.perf_counter()
        manager.activate(name)
        manager.apply_pending()
        switch_s.append(time.perf_counter() - t0)

    for episode in range(episodes):
        obs, info = env.reset(seed=seed + episode)
        n_stages = len(info.get("stage_success", ()))
        if n_stages != len(names):
            raise ValueError(f"the env has {n_stages} stages (info['stage_success']) but {len(names)} skills were "
                             f"given ({names}); give one skill per stage, in stage order")
        stage_done = np.zeros(n_stages, dtype=bool)
        current, switch_ticks, tick, done, success = 0, [], 0, False, False
        activate(names[0])
        manager.reset()
        record = video_path is not None and episode == 0
        if record:
            frames.append(_labelled(env.render(), names[current]))
        while not done:
            t0 = time.perf_counter()
            action = manager.select_action(obs)
            step_s.append(time.perf_counter() - t0)
            obs, _, terminated, truncated, info = env.step(np.asarray(action, dtype=np.float32))
            tick += 1
            stage_done |= np.asarray(info["stage_success"], dtype=bool)
            success = success or bool(info["success"])
            done = bool(terminated or truncated)
            if record:
                frames.append(_labelled(env.render(), names[current]))
            # the switch lands between this tick and the next: the next skill computes tick `tick`'s action
            if switch == "success":
                target = current
                while target < len(names) - 1 and info["stage_success"][target]:
                    target += 1
            else:
                target = current + int(current < len(ticks) and tick >= ticks[current])
            if target != current and not done:
                current = target
                activate(names[current])
                switch_ticks.append(tick)
        results.append({"seed": seed + episode, "success": success, "length": tick,
                        "stage_success": stage_done.tolist(), "switch_ticks": switch_ticks})
        if progress is not None:
            progress(len(results))
        logger.info("rollout: %d/%d episodes, success so far %.2f", len(results), episodes,
                    np.mean([r["success"] for r in results]))
    return _metrics(names, results, switch_s, step_s, frames, video_path)


def _metrics(names: list[str], results: list[dict[str, Any]], switch_s: list[float], step_s: list[float],
             frames: list[np.ndarray], video_path: str | Path | None) -> dict[str, Any]:
    n = len(results)
    wins = sum(r["success"] for r in results)
    low, high = wilson_interval(wins, n)
    metrics: dict[str, Any] = {"rollout/success_rate": wins / n, "rollout/ci_low": low, "rollout/ci_high": high}
    for stage, name in enumerate(names):
        stage_wins = sum(r["stage_success"][stage] for r in results)
        s_low, s_high = wilson_interval(stage_wins, n)
        metrics |= {f"rollout/stage{stage}/{name}/success_rate": stage_wins / n,
                    f"rollout/stage{stage}/{name}/ci_low": s_low, f"rollout/stage{stage}/{name}/ci_high": s_high}
    sw50, sw99, swmax = _percentiles(switch_s, 1e6)
    st50, st99, _ = _percentiles(step_s, 1e3)
    metrics |= {
        "rollout/mean_length": float(np.mean([r["length"] for r in results])),
        "rollout/switch_us_p50": sw50, "rollout/switch_us_p99": sw99, "rollout/switch_us_max": swmax,
        "rollout/latency_ms_p50": st50, "rollout/latency_ms_p99": st99,
        "rollout/episodes": n, "rollout/switches": len(switch_s),
        "skills": list(names), "episodes": results,
    }
    if video_path is not None:
        from robolora.evaluate import write_video

        metrics["video"] = str(write_video(frames, video_path))
    return metrics


def rollout_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per stage plus the overall row, for the CLI."""
    rows = []
    for stage, name in enumerate(metrics["skills"]):
        key = f"rollout/stage{stage}/{name}"
        rows.append({"stage": f"{stage + 1}: {name}", "success": metrics[f"{key}/success_rate"],
                     "ci95": f"[{metrics[f'{key}/ci_low']:.2f}, {metrics[f'{key}/ci_high']:.2f}]"})
    rows.append({"stage": "overall", "success": metrics["rollout/success_rate"],
                 "ci95": f"[{metrics['rollout/ci_low']:.2f}, {metrics['rollout/ci_high']:.2f}]"})
    return rows


def rollout_main(
    skills: str | Sequence[str | Path],
    base: str | Path,
    *,
    episodes: int = 50,
    seed: int = EVAL_SEED,
    switch: Switch = "success",
    schedule_ticks: Sequence[int] | None = None,
    mode: str = "bank",
    video_path: str | Path | None = None,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """``robolora rollout``: load the base policy from ``base`` onto ``device``, attach ``skills``
    (``"wipe,dish_rack"``, names or adapter folders) in a ``SkillManager(mode)`` and run :func:`rollout`."""
    from robolora.policies import load_policy

    policy = load_policy(base, device=device).eval()
    return rollout(policy, skills, episodes, seed, switch, schedule_ticks, mode, video_path, progress)
