"""Button press: push the red button on its pedestal down (docs/design.md §8.4, Meta-World button-press-topdown-v2).

The button stands back-right (jittered by up to 1.5 cm per episode); its cap slides down 2 cm against a spring.
Success: slide below -0.015 m. The expert presses with the closed fingertips from above.
"""

from __future__ import annotations

import numpy as np

from .base import TabletopEnv
from .expert import CLOSE, Expert

SUCCESS_DEPTH = -0.015
FIXTURE_JITTER = np.array([0.015, 0.015, 0.0])
CAP_TOP = 0.024  # cap top above the button body origin (arena.xml)
TIP_BELOW_TCP = 0.015  # fingertips below the tcp (gripper.xml)


class ButtonPressEnv(TabletopEnv):
    """Press the button on the pedestal at the back-right of the table."""

    task_name = "button_press"
    props = ("button",)

    def _reset_task(self) -> None:
        home = self._pristine["body_pos"][self.model.body("button_base").id]
        self.set_fixture_pos("button_base", home + self.np_random.uniform(-FIXTURE_JITTER, FIXTURE_JITTER))

    def _success(self) -> bool:
        return self.joint_q("button") < SUCCESS_DEPTH

    def _reward(self) -> tuple[float, dict[str, float]]:
        reach = float(np.linalg.norm(self.tcp_pos - self.body_pos("button")))
        terms = {"reach": -0.5 * reach, "pressed": -self.joint_q("button") / 0.02, "success": float(self._success())}
        return sum(terms.values()), terms


class ButtonPressExpert(Expert):
    """Phases: above (the cap) -> press (speed-capped, to below the travel limit); fallback: re-centre above."""

    initial_phase = "above"
    hover = 0.03  # fingertip height above the cap top before pressing

    def _plan(self) -> None:
        self.xy_offset = self.jitter(np.array([0.008, 0.008, 0.0]))
        self.press_speed = float(self.rng.uniform(0.5, 0.8))

    def _act(self) -> tuple[np.ndarray, float]:
        env = self.env
        centre = env.body_pos("button_base") + np.array([0.0, 0.0, 0.05 + CAP_TOP])
        cap = centre + self.xy_offset
        above = cap + np.array([0.0, 0.0, TIP_BELOW_TCP + self.hover])

        if self.phase == "press" and not self.near(centre, 0.022, slice(0, 2)):
            self.phase = "above"  # drifted off the cap: the fingertips would land on the pedestal
        if self.phase == "above":
            if self.near(above, 0.012, slice(0, 2)) and env.tcp_pos[2] > cap[2]:
                self.phase = "press"
            return self.move_to(above), CLOSE
        press = cap + np.array([0.0, 0.0, TIP_BELOW_TCP - 0.025])
        return self.move_to(press, self.press_speed), CLOSE
