"""Scripted-expert base class: phase machines on privileged state with DART-style perturbation.

docs/design.md §8.5 "Scripted experts and demo diversity": each expert is a small phase machine on privileged simulator
state (body positions, joint q) driving the mocap with a P-controller, a speed cap in contact phases and a
reactive fallback in every phase. Diversity comes from a per-episode gain and waypoint jitter sampled in
:meth:`Expert.reset`, and from per-step Gaussian action noise added by :meth:`Expert.perturb` (DART, Laskey et al.
2017: label the demo with the clean action, execute the perturbed one, so demos contain recoveries). An expert's
``quiet_phases`` execute clean: dish_rack's slot alignment, where noise only makes the expert land on a wall and
back out, so its demos showed two different actions from the same place (docs/results.md "Demo noise").

Subclass contract: implement ``_plan()`` (sample per-episode jitter from ``self.rng``; called by ``reset``) and
``_act() -> (xyz_command (3,), grip)`` which reads ``self.env`` state, updates ``self.phase`` and returns the
clean command. Every random draw goes through ``self.rng`` so an expert built with the episode seed replays
exactly.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import gymnasium as gym
import numpy as np

from .base import ACTION_SCALE, TabletopEnv

logger = logging.getLogger(__name__)

OPEN, CLOSE = 1.0, -1.0


class Expert:
    """Scripted expert for one :class:`TabletopEnv` task.

    Usage: ``expert = make_expert(env, seed)``; after each ``env.reset(seed=...)`` call ``expert.reset()``; then
    ``clean = expert.act()``, ``executed = expert.perturb(clean, expert.default_noise)``, ``env.step(executed)``.
    """

    default_noise: ClassVar[float] = 0.15
    # Phases whose actions are executed without noise: where the perturbation only makes the expert fail and back
    # out (a different action from the same state), which a behaviour-cloned policy averages instead of copying.
    quiet_phases: ClassVar[frozenset[str]] = frozenset()
    gain_range: ClassVar[tuple[float, float]] = (0.7, 1.0)  # P gain in action units per 2 cm of error
    initial_phase: ClassVar[str] = "start"

    def __init__(self, env: gym.Env, seed: int | None = None) -> None:
        unwrapped = env.unwrapped
        if not isinstance(unwrapped, TabletopEnv):
            raise TypeError(f"expert needs a robolora TabletopEnv (possibly wrapped); got {type(unwrapped).__name__}")
        self.env: TabletopEnv = unwrapped
        self.rng = np.random.default_rng(seed)
        self.gain = 1.0
        self.phase = self.initial_phase

    def reset(self) -> None:
        """Start a new episode: resample gain and waypoint jitter. Call right after ``env.reset``."""
        self.gain = float(self.rng.uniform(*self.gain_range))
        self.phase = self.initial_phase
        self._plan()

    def act(self) -> np.ndarray:
        """The clean expert action (4,) float32 for the env's current state."""
        move, grip = self._act()
        return np.clip(np.append(move, grip), -1.0, 1.0).astype(np.float32)

    def perturb(self, clean: np.ndarray, noise: float) -> np.ndarray:
        """The executed action: ``clean`` plus seeded Gaussian noise of std ``noise``, clipped to [-1, 1].

        In :attr:`quiet_phases` the noise is still drawn (the rng stays in step) but not added.
        """
        if noise < 0:
            raise ValueError(f"noise={noise} must be >= 0 (std of the Gaussian action noise)")
        if self.phase in self.quiet_phases:
            noise = 0.0
        executed = np.asarray(clean, dtype=np.float64) + self.rng.normal(0.0, noise, size=4)
        return np.clip(executed, -1.0, 1.0).astype(np.float32)

    # ------------------------------------------------------------------------------------ subclass hooks
    def _plan(self) -> None:
        """Sample per-episode waypoint jitter from ``self.rng``."""

    def _act(self) -> tuple[np.ndarray, float]:
        raise NotImplementedError(f"{type(self).__name__} must implement _act()")

    # ------------------------------------------------------------------------------------------ helpers
    def move_to(self, target: np.ndarray, max_speed: float = 1.0) -> np.ndarray:
        """P-controller toward ``target`` (tcp frame), its norm capped at ``max_speed`` (action units)."""
        command = self.gain * (np.asarray(target) - self.env.tcp_pos) / ACTION_SCALE
        norm = float(np.linalg.norm(command))
        return command * (max_speed / norm) if norm > max_speed else command

    def jitter(self, scale: float | np.ndarray) -> np.ndarray:
        """Uniform xyz waypoint jitter in ``[-scale, scale]`` from the expert's rng."""
        scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (3,))
        return self.rng.uniform(-scale, scale)

    def near(self, target: np.ndarray, tol: float, axes: slice = slice(None)) -> bool:
        """Whether the tcp is within ``tol`` metres of ``target`` along ``axes``."""
        return bool(np.linalg.norm((self.env.tcp_pos - np.asarray(target))[axes]) < tol)
