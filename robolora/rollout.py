"""Multi-skill rollouts: chain skill adapters through a multi-stage env, switching between control ticks.

docs/design.md §1 ("base + adapters -> SkillManager -> control loop / rollouts (switch skills between ticks)") and §4,
issue 6 (``robolora rollout --skills wipe,dish_rack``), issue 19 (any env, learned completion). Skill ``i`` drives
stage ``i`` (skill order = stage order) of ``robolora/Kitchen-v0`` or any env whose info reports ``stage_success``
(one flag per stage). The switch to the next skill happens between ticks, either when the env reports the current
stage's success (``switch="success"``, the oracle: the skill that acts at the tick after the success signal is the
next one), at fixed ticks (``switch="schedule"``), or on the skill's own completion head
(``switch="learned"``, ``robolora.completion``: after the tick whose observation made its probability stay at or
above its threshold for k ticks, as the torch-free controller's sequencer does; with this switch the env need not
report stages). Every switch is ``activate(name)`` followed by ``apply_pending()``, timed together, so the reported
switch latency is all the time a switch takes outside a step; applying a switch also drops the old skill's queued
actions (``SkillManager`` resets the policy).

Reported: overall and per-stage success rates with 95% Wilson intervals, mean episode length, switch latency
p50/p99/max (microseconds), policy step latency p50/p99/max (milliseconds, the ``select_action`` call alone; with
``switch="learned"`` the completion head's features pass is timed apart) and per-episode records (with the learned
switch: switches decided before the stage had succeeded, as ``premature``); optionally the first episode as a video
with the active skill's name drawn on each frame.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np

from robolora.episodes import Episode, Tick, play_episodes, rate_metrics, timing_metrics
from robolora.stats import EVAL_SEED

__all__ = ["KITCHEN_ENV_ID", "parse_skills", "resolve_skill", "rollout", "rollout_main", "rollout_rows"]

KITCHEN_ENV_ID = "robolora/Kitchen-v0"
Switch = Literal["success", "schedule", "learned"]
SWITCHES: tuple[str, ...] = ("success", "schedule", "learned")


def shipped_skills_dir() -> Path:
    """Where the shipped skill adapters live: ``policies/pretrained/skills/<name>/`` (robolora.adapters')."""
    from robolora.adapters import shipped_skills_dir

    return shipped_skills_dir()


def parse_skills(skills: str | Sequence[str | Path]) -> list[str | Path]:
    """``"wipe,dish_rack"`` or a list -> a list of skill names / adapter paths (empty entries dropped)."""
    items = skills.split(",") if isinstance(skills, str) else list(skills)
    out = [s.strip() if isinstance(s, str) else s for s in items]
    return [s for s in out if s != ""]


def resolve_skill(skill: str | Path) -> Path:
    """An adapter folder: ``skill`` itself when it is an existing path, else the shipped adapter of that name."""
    from robolora.adapters import resolve_adapter

    return resolve_adapter(skill)


def _attach_skills(manager: Any, skills: Sequence[str | Path], heads: bool = False) -> tuple[list[str], list[Any]]:
    """Names of the skills in stage order (already attached names are used as they are, others are loaded) and,
    with ``heads``, each skill's completion head (``robolora.completion.Completion``; read from the adapter folder,
    so every skill must be given as a folder or shipped name, not only attached)."""
    names, completions = [], []
    for skill in skills:
        if isinstance(skill, str) and skill in manager.skills:
            if heads:
                raise ValueError(f"skill {skill!r} is already attached to the manager; pass its adapter folder (or "
                                 f"shipped name) so its completion head can be read")
            names.append(skill)
            completions.append(None)
            continue
        from robolora.adapters import load_adapter

        adapter = load_adapter(resolve_skill(skill))
        manager.attach(adapter.skill, adapter)
        names.append(adapter.skill)
        completions.append(adapter.completion)
    if len(set(names)) != len(names):
        raise ValueError(f"skills {names} repeat a name; each stage needs its own skill")
    lacking = [n for n, c in zip(names[:-1], completions) if c is None]
    if heads and lacking:
        raise ValueError(f"switch='learned' needs a completion head on every skill that hands over; {lacking} have "
                         f"none: train one (robolora.completion) or switch on success or a schedule")
    return names, completions


def _check_schedule(switch: str, schedule_ticks: Sequence[int] | None, n_skills: int) -> list[int]:
    if switch not in SWITCHES:
        raise ValueError(f"switch={switch!r} is invalid; use one of {list(SWITCHES)}")
    if switch != "schedule":
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
    env_id: str = KITCHEN_ENV_ID,
) -> dict[str, Any]:
    """Run ``episodes`` seeded episodes of a multi-stage env, skill ``i`` driving stage ``i``; return metrics.

    ``policy_or_manager``: a ``VisuomotorPolicy`` (wrapped in a ``SkillManager(policy, mode)`` that is closed at
    the end, handing the policy back as it was) or a ``SkillManager`` (used as is; ``mode`` is then ignored).
    ``skills``: names already attached to the manager, adapter folders, or shipped skill names
    (``policies/pretrained/skills/<name>``). ``switch="schedule"`` needs ``schedule_ticks``: for each next skill,
    the tick (0-based env step) at which it acts first; ``switch="learned"`` needs a completion head on every
    skill but the last (skills given as adapter folders or shipped names). ``env``: an env to run instead of
    making ``env_id`` (default the kitchen) to the policy's image size and cameras; it reports
    ``info["stage_success"]`` (one flag per skill) unless ``switch="learned"``. ``progress(n_done)`` after
    each episode. Keys: ``rollout/success_rate``, ``rollout/ci_low``, ``rollout/ci_high``,
    ``rollout/stage<i>/<skill>/success_rate`` (and ``ci_low``, ``ci_high``), ``rollout/mean_length``,
    ``rollout/switch_us_p50|p99|max``, ``rollout/latency_ms_p50|p99|max``, ``rollout/episodes``,
    ``rollout/switches``, ``skills``, ``episodes`` (seed, success, length, stage_success, switch_ticks) and ``video`` when written.
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
        names, heads = _attach_skills(manager, skills, heads=switch == "learned")
        if env is None:
            from robolora.envs import make

            env = make(env_id, **manager.spec.env_kwargs(),  # the policy's cameras and image size
                       render_mode="rgb_array" if video_path is not None else None)
        if video_path is not None and env.render_mode != "rgb_array":
            raise ValueError(f"video_path needs an env made with render_mode='rgb_array' (got {env.render_mode!r})")
        return _run(manager, env, names, episodes, seed, switch, ticks, video_path, progress, heads)
    finally:
        if owns_env and env is not None:
            env.close()
        if owns_manager:
            manager.close()


class _SkillSequence:
    """Which skill acts in an episode: the first from its start, each next one from the tick the switch rule picks.

    ``act`` (the active skill's action, then with ``switch="learned"`` its completion signal on the same
    observation), ``on_reset`` and ``on_step`` are the episode runner's hooks; every switch (``activate`` +
    ``apply_pending``) is timed into ``switch_s``, the completion head's pass into ``head_s``.
    """

    def __init__(self, manager: Any, names: list[str], switch: str, ticks: list[int], heads: list[Any]) -> None:
        self.manager, self.names, self.switch, self.ticks, self.heads = manager, names, switch, ticks, heads
        self.switch_s: list[float] = []
        self.head_s: list[float] = []
        self.current = 0
        self.streak = 0
        self.fired = False
        self.has_stages = False
        self.stage_done = np.zeros(len(names), dtype=bool)

    def _activate(self, index: int) -> None:
        t0 = time.perf_counter()
        self.manager.activate(self.names[index])
        self.manager.apply_pending()
        self.switch_s.append(time.perf_counter() - t0)
        self.current, self.streak, self.fired = index, 0, False

    def act(self, obs: Any) -> np.ndarray:
        action = self.manager.select_action(obs)
        if self.switch == "learned" and self.current < len(self.names) - 1:
            self.fired = self._completed(obs)
            if self.fired and self.has_stages and not self.stage_done[self.current]:
                self.episode.fields["premature"] += 1
        return action

    def _completed(self, obs: Any) -> bool:
        """Whether the active skill's head has now been at or above its threshold for k ticks."""
        import torch

        from robolora.policy import policy_device

        t0 = time.perf_counter()
        completion = self.heads[self.current]
        policy = self.manager.policy
        batch, _ = self.manager.spec.batch(obs, policy_device(policy))
        with torch.no_grad():
            probability = float(completion.head.read(policy, batch)[0])
        self.head_s.append(time.perf_counter() - t0)
        self.streak = self.streak + 1 if probability >= completion.threshold else 0
        return self.streak >= completion.k

    def on_reset(self, episodes: list[Episode], info: dict[str, Any]) -> None:
        n_stages = len(info.get("stage_success", ()))
        self.has_stages = n_stages > 0
        if n_stages != len(self.names) and (self.has_stages or self.switch != "learned"):
            raise ValueError(f"the env has {n_stages} stages (info['stage_success']) but {len(self.names)} skills "
                             f"were given ({self.names}); give one skill per stage, in stage order")
        self.stage_done = np.zeros(len(self.names), dtype=bool)
        self.episode = episodes[0]
        self.episode.fields.update(switch_ticks=[])
        if self.has_stages:
            self.episode.fields.update(stage_success=self.stage_done.tolist())
        if self.switch == "learned":
            self.episode.fields.update(premature=0)
        self._activate(0)
        self.manager.reset()

    def on_step(self, tick: Tick) -> None:
        episode, stage_success = tick.episodes[0], tick.info.get("stage_success")
        if self.has_stages:
            self.stage_done |= np.asarray(stage_success, dtype=bool)
            episode.fields["stage_success"] = self.stage_done.tolist()
        # the switch lands between this tick and the next: the next skill computes tick `episode.length`'s action
        if self.switch == "success":
            target = self.current
            while target < len(self.names) - 1 and stage_success[target]:
                target += 1
        elif self.switch == "learned":
            target = self.current + int(self.fired)
        else:
            due = self.current < len(self.ticks) and episode.length >= self.ticks[self.current]
            target = self.current + int(due)
        if target != self.current and tick.running[0]:
            self._activate(target)
            episode.fields["switch_ticks"].append(episode.length)

    def labelled(self, frame: np.ndarray) -> np.ndarray:
        """``frame`` with the acting skill's name drawn on it."""
        return _labelled(frame, self.names[self.current])


def _run(manager: Any, env: gym.Env, names: list[str], episodes: int, seed: int, switch: str, ticks: list[int],
         video_path: str | Path | None, progress: Callable[[int], None] | None, heads: list[Any]) -> dict[str, Any]:
    skills = _SkillSequence(manager, names, switch, ticks, heads)
    run = play_episodes(env, skills.act, episodes, seed=seed, on_reset=skills.on_reset,
                        on_step=skills.on_step, progress=progress,
                        render=None if video_path is None else lambda: skills.labelled(env.render()))
    metrics: dict[str, Any] = run.metrics("rollout")
    if all("stage_success" in e for e in run.episodes):
        for stage, name in enumerate(names):
            stage_wins = sum(e["stage_success"][stage] for e in run.episodes)
            metrics |= rate_metrics(f"rollout/stage{stage}/{name}", stage_wins, len(run.episodes))
    if switch == "learned":
        metrics |= {"rollout/premature_switches": sum(e.get("premature", 0) for e in run.episodes),
                    **timing_metrics("rollout/completion", skills.head_s, "ms")}
    metrics |= {
        **timing_metrics("rollout/switch", skills.switch_s, "us"),
        **timing_metrics("rollout/latency", run.act_s, "ms"),
        "rollout/switches": len(skills.switch_s),
        "skills": list(names),
        "episodes": run.episodes,
    }
    if video_path is not None:
        from robolora.evaluate import write_video

        metrics["video"] = str(write_video(run.frames, video_path))
    return metrics


def rollout_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per stage (when the env reports stages) plus the overall row, for the CLI."""
    rows = []
    for stage, name in enumerate(metrics["skills"]):
        key = f"rollout/stage{stage}/{name}"
        if f"{key}/success_rate" in metrics:
            rows.append({"stage": f"{stage + 1}: {name}", "success": metrics[f"{key}/success_rate"],
                         "ci95": f"[{metrics[f'{key}/ci_low']:.2f}, {metrics[f'{key}/ci_high']:.2f}]"})
    rows.append({"stage": "overall", "success": metrics["rollout/success_rate"],
                 "ci95": f"[{metrics['rollout/ci_low']:.2f}, {metrics['rollout/ci_high']:.2f}]"})
    return rows


def rollout_main(
    skills: str | Sequence[str | Path],
    base: str | Path | Any,
    *,
    episodes: int = 50,
    seed: int = EVAL_SEED,
    switch: Switch = "success",
    schedule_ticks: Sequence[int] | None = None,
    mode: str = "bank",
    video_path: str | Path | None = None,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
    env_id: str = KITCHEN_ENV_ID,
) -> dict[str, Any]:
    """``robolora rollout``: load the base policy from ``base`` (a checkpoint folder, or an already loaded policy
    such as a LeRobot one) onto ``device``, attach ``skills`` (``"wipe,dish_rack"``, names or adapter folders) in a
    ``SkillManager(mode)`` and run :func:`rollout` on ``env_id``."""
    from robolora.policies import load_policy

    policy = (load_policy(base, device=device) if isinstance(base, (str, Path)) else base).eval()
    return rollout(policy, skills, episodes, seed, switch, schedule_ticks, mode, video_path, progress,
                   env_id=env_id)
