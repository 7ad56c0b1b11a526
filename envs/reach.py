"""Reach: move the tool centre point to a floating goal sphere (docs/design.md §8.4, Meta-World reach-v2 style).

The goal is a 2 cm magenta sphere on a yellow pole with a base disk (the pole gives the height cue the front camera
lacks, docs/design.md §8.2). Success: tcp within 3 cm of the sphere centre.
"""

from __future__ import annotations

import numpy as np

from .base import TabletopEnv
from .expert import OPEN, Expert

SUCCESS_RADIUS = 0.03
GOAL_Z_RANGE = (0.04, 0.2)


class ReachEnv(TabletopEnv):
    """Reach a goal sphere placed uniformly in the work area at 4-20 cm height."""

    task_name = "reach"
    props = ("goal",)

    def _reset_task(self) -> None:
        xy = self.sample_xy(margin=0.02)
        self.goal = np.array([xy[0], xy[1], self.np_random.uniform(*GOAL_Z_RANGE)])
        self.set_goal_marker(self.goal)

    def _distance(self) -> float:
        return float(np.linalg.norm(self.tcp_pos - self.goal))

    def _success(self) -> bool:
        return self._distance() < SUCCESS_RADIUS

    def _reward(self) -> tuple[float, dict[str, float]]:
        terms = {"distance": -self._distance(), "success": float(self._success())}
        return sum(terms.values()), terms


class ReachExpert(Expert):
    """Single phase: P-control to a jittered point inside the success ball, gripper open."""

    def _plan(self) -> None:
        self.offset = self.jitter(0.008)

    def _act(self) -> tuple[np.ndarray, float]:
        return self.move_to(self.env.goal + self.offset), OPEN
