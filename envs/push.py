"""Push: slide the cyan block onto the magenta goal disc on the table (docs/design.md §8.4, Meta-World push-v2 style).

Success: block centre within 3 cm (xy) of the disc centre. The expert pushes with the closed fingers from behind
the block along the block-to-goal line and re-approaches whenever the hand is no longer behind the block.
"""

from __future__ import annotations

import numpy as np

from .base import TabletopEnv
from .expert import CLOSE, Expert

SUCCESS_RADIUS = 0.03
BLOCK_HALF = 0.025
MIN_GOAL_DISTANCE = 0.1
MAX_YAW = 0.4  # radians of random block yaw


def yaw_quat(yaw: float) -> np.ndarray:
    return np.array([np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)])


class PushEnv(TabletopEnv):
    """Push the block (random pose in the work area) to a goal disc at least 10 cm away."""

    task_name = "push"
    props = ("block", "goal_disc")

    def _reset_task(self) -> None:
        block = self.sample_xy(margin=0.03)
        goal = self.sample_xy(margin=0.03)
        while np.linalg.norm(goal - block) < MIN_GOAL_DISTANCE:
            goal = self.sample_xy(margin=0.03)
        yaw = self.np_random.uniform(-MAX_YAW, MAX_YAW)
        self.set_free_pose("block", np.array([block[0], block[1], BLOCK_HALF]), yaw_quat(yaw))
        self.goal = np.array([goal[0], goal[1], 0.0])
        self.set_fixture_pos("goal_disc", self.goal)

    def _block_distance(self) -> float:
        return float(np.linalg.norm((self.body_pos("block") - self.goal)[:2]))

    def _success(self) -> bool:
        return self._block_distance() < SUCCESS_RADIUS

    def _reward(self) -> tuple[float, dict[str, float]]:
        reach = float(np.linalg.norm(self.tcp_pos - self.body_pos("block")))
        terms = {"reach": -0.5 * reach, "block_to_goal": -self._block_distance(), "success": float(self._success())}
        return sum(terms.values()), terms


class PushExpert(Expert):
    """Phases: approach (above the pre-push point) -> descend -> push (speed-capped); fallback: re-approach."""

    initial_phase = "approach"
    standoff = 0.06  # pre-push point distance behind the block centre
    push_z = 0.025
    travel_z = 0.1

    def _plan(self) -> None:
        self.goal_offset = self.jitter(np.array([0.008, 0.008, 0.0]))
        self.standoff_jitter = float(self.rng.uniform(-0.01, 0.01))
        self.push_speed = float(self.rng.uniform(0.45, 0.7))

    def _geometry(self) -> tuple[np.ndarray, np.ndarray, float]:
        block = self.env.body_pos("block")
        to_goal = (self.env.goal + self.goal_offset - block)[:2]
        dist = float(np.linalg.norm(to_goal))
        direction = to_goal / max(dist, 1e-6)
        return block, direction, dist

    def _act(self) -> tuple[np.ndarray, float]:
        block, direction, dist = self._geometry()
        rel = (self.env.tcp_pos - block)[:2]
        along = float(rel @ direction)
        lateral = float(abs(rel[0] * direction[1] - rel[1] * direction[0]))
        pre_xy = block[:2] - direction * (self.standoff + self.standoff_jitter)

        if self.phase == "push" and (along > -0.02 or lateral > 0.025):
            self.phase = "approach"  # hand slipped beside or ahead of the block
        if self.phase == "approach":
            target = np.array([pre_xy[0], pre_xy[1], self.travel_z])
            if self.near(target, 0.015, slice(0, 2)):
                self.phase = "descend"
            return self.move_to(target), CLOSE
        if self.phase == "descend":
            target = np.array([pre_xy[0], pre_xy[1], self.push_z])
            if not self.near(target, 0.025, slice(0, 2)):
                self.phase = "approach"
            elif self.env.tcp_pos[2] < self.push_z + 0.01:
                self.phase = "push"
            return self.move_to(target), CLOSE
        if dist < 0.008:
            return self.move_to(self.env.tcp_pos), CLOSE  # block on the goal: hold still
        aim = block[:2] + direction * min(dist, 0.03)
        return self.move_to(np.array([aim[0], aim[1], self.push_z]), self.push_speed), CLOSE
