"""Drawer open: pull the cabinet's drawer out by its handle (docs/design.md §8.4, Meta-World drawer-open-v2 style).

The cabinet stands back-left (jittered by up to 1.5 cm per episode); its drawer slides toward the camera over
0.15 m. Success: drawer slide > 0.12 m. The expert hooks the closed fingers behind the handle bar and pulls.
"""

from __future__ import annotations

import numpy as np

from .base import TabletopEnv
from .expert import CLOSE, Expert

SUCCESS_OPENING = 0.12
FIXTURE_JITTER = np.array([0.015, 0.015, 0.0])


class DrawerOpenEnv(TabletopEnv):
    """Open the drawer of the cabinet at the back-left of the table."""

    task_name = "drawer_open"
    props = ("cabinet",)

    def _reset_task(self) -> None:
        home = self._pristine["body_pos"][self.model.body("cabinet").id]
        self.set_fixture_pos("cabinet", home + self.np_random.uniform(-FIXTURE_JITTER, FIXTURE_JITTER))

    def _success(self) -> bool:
        return self.joint_q("drawer") > SUCCESS_OPENING

    def _reward(self) -> tuple[float, dict[str, float]]:
        reach = float(np.linalg.norm(self.tcp_pos - self.site_pos("handle")))
        terms = {"reach": -0.5 * reach, "opening": self.joint_q("drawer") / 0.15, "success": float(self._success())}
        return sum(terms.values()), terms


class DrawerOpenExpert(Expert):
    """Phases: above (the gap behind the handle bar) -> descend -> pull (speed-capped); fallback: re-hook."""

    initial_phase = "above"
    gap = 0.026  # tcp y behind the handle bar centre: middle of the 3.8 cm gap to the drawer front
    hook_z = 0.055
    travel_z = 0.12

    def _plan(self) -> None:
        self.hook_offset = self.jitter(np.array([0.015, 0.003, 0.005]))
        self.pull_speed = float(self.rng.uniform(0.5, 0.8))

    def _act(self) -> tuple[np.ndarray, float]:
        env = self.env
        hook = env.site_pos("handle") + np.array([0.0, self.gap, self.hook_z - 0.06]) + self.hook_offset
        behind = hook[1] - 0.02 < env.tcp_pos[1] < hook[1] + 0.015 and abs(env.tcp_pos[0] - hook[0]) < 0.03

        if self.phase == "pull" and not (behind and env.tcp_pos[2] < self.hook_z + 0.02):
            self.phase = "above"  # lost the handle
        if self.phase == "above":
            target = np.array([hook[0], hook[1], self.travel_z])
            if self.near(target, 0.008, slice(0, 2)):
                self.phase = "descend"
            return self.move_to(target), CLOSE
        if self.phase == "descend":
            if not self.near(hook, 0.012, slice(0, 2)):
                self.phase = "above"
            elif env.tcp_pos[2] < hook[2] + 0.008:
                self.phase = "pull"
            return self.move_to(hook, 0.8), CLOSE
        if env.joint_q("drawer") > 0.14:
            return self.move_to(env.tcp_pos), CLOSE  # fully open: hold
        return self.move_to(hook - np.array([0.0, 0.05, 0.0]), self.pull_speed), CLOSE
