"""Pick-and-place: grasp the cyan block and hold it at a floating goal (docs/design.md §8.4, Meta-World pick-place-v2).

The goal is the 2 cm magenta sphere on a yellow pole (height cue, docs/design.md §8.2). Success: block centre
within 3 cm of the goal centre. The expert regrasps whenever the block is not held.
"""

from __future__ import annotations

import numpy as np

from .base import TabletopEnv
from .expert import CLOSE, OPEN, Expert
from .push import BLOCK_HALF, MAX_YAW, yaw_quat

SUCCESS_RADIUS = 0.03
GOAL_Z_RANGE = (0.08, 0.2)
MIN_GOAL_DISTANCE = 0.08


class PickPlaceEnv(TabletopEnv):
    """Pick the block (random pose in the work area) and bring it to a goal sphere 8-20 cm above the table."""

    task_name = "pick_place"
    props = ("block", "goal")

    def _reset_task(self) -> None:
        block = self.sample_xy(margin=0.03)
        goal_xy = self.sample_xy(margin=0.03)
        while np.linalg.norm(goal_xy - block) < MIN_GOAL_DISTANCE:
            goal_xy = self.sample_xy(margin=0.03)
        yaw = self.np_random.uniform(-MAX_YAW, MAX_YAW)
        self.set_free_pose("block", np.array([block[0], block[1], BLOCK_HALF]), yaw_quat(yaw))
        self.goal = np.array([goal_xy[0], goal_xy[1], self.np_random.uniform(*GOAL_Z_RANGE)])
        self.set_goal_marker(self.goal)

    def _block_distance(self) -> float:
        return float(np.linalg.norm(self.body_pos("block") - self.goal))

    def _success(self) -> bool:
        return self._block_distance() < SUCCESS_RADIUS

    def _reward(self) -> tuple[float, dict[str, float]]:
        reach = float(np.linalg.norm(self.tcp_pos - self.body_pos("block")))
        terms = {
            "reach": -0.5 * reach,
            "grasp": 0.25 * float(self.grasped("block")),
            "block_to_goal": -self._block_distance(),
            "success": float(self._success()),
        }
        return sum(terms.values()), terms


class PickPlaceExpert(Expert):
    """Phases: above -> descend -> close -> carry (lift, then to the goal) -> hold; fallback: regrasp from above."""

    initial_phase = "above"
    travel_z = 0.12

    def _plan(self) -> None:
        self.grasp_offset = self.jitter(np.array([0.004, 0.004, 0.006]))
        self.goal_offset = self.jitter(0.008)
        self.carry_speed = float(self.rng.uniform(0.6, 0.9))
        self.close_steps = 0

    def _holding(self, block: np.ndarray) -> bool:
        return self.env.grasped("block") and float(np.linalg.norm(block - self.env.tcp_pos)) < 0.03

    def _act(self) -> tuple[np.ndarray, float]:
        env = self.env
        block = env.body_pos("block")
        grasp = block + self.grasp_offset

        if self.phase in ("carry", "hold") and not self._holding(block):
            self.phase = "above"  # block dropped or slipped: regrasp
        if self.phase == "above":
            target = np.array([grasp[0], grasp[1], self.travel_z])
            if self.near(target, 0.012, slice(0, 2)):
                self.phase = "descend"
            return self.move_to(target), OPEN
        if self.phase == "descend":
            if not self.near(grasp, 0.02, slice(0, 2)):
                self.phase = "above"
            elif self.near(grasp, 0.008):
                self.phase, self.close_steps = "close", 0
            return self.move_to(grasp, 0.7), OPEN
        if self.phase == "close":
            self.close_steps += 1
            if self._holding(block) and self.close_steps >= 3:
                self.phase = "carry"
            elif self.close_steps > 10:
                self.phase = "above"  # nothing grasped: open and retry
            return self.move_to(grasp, 0.3), CLOSE
        goal = env.goal + self.goal_offset
        if self.phase == "carry":
            # lift straight up first so the block clears the table before moving sideways
            lifted = env.tcp_pos[2] > min(goal[2], self.travel_z) - 0.02
            target = goal if lifted else np.array([env.tcp_pos[0], env.tcp_pos[1], self.travel_z])
            if self.near(goal, 0.01):
                self.phase = "hold"
            return self.move_to(target, self.carry_speed), CLOSE
        return self.move_to(goal, 0.3), CLOSE
