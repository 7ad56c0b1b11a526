"""Kitchen (two stages): wipe every dirt spot off the table, then stand the plate in the rack slot lit green.

Issue 6 ("a two-stage kitchen task ... success per stage and overall"). The scene is the one both skill tasks show
(envs/kitchen_scene.py), so adapters trained on wipe and dish_rack act in the scene they were trained in: the
kitchen starts exactly as a wipe episode with the same seed does, and stage 2 begins in the state dish_rack's
hand-over episodes start from (no dirt, the gripper holding the sponge pressed on the table).

Info on every step (and from reset), besides ``success`` and the reward terms:
``stage`` (0 while dirt remains, then 1; it never goes back since wiped spots stay wiped), ``stage_success``
(wipe done, plate racked and released) and ``success`` = both. The episode terminates on overall success.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from .dish_rack import DishRackEnv, DishRackExpert
from .expert import Expert
from .wipe import WipeEnv, WipeExpert

STAGES = ("wipe", "dish_rack")


class KitchenEnv(WipeEnv, DishRackEnv):
    """Both skills' scenes in one: the reset is wipe's (dirt, sponge at home), success needs both stages.

    The helper methods of both tasks (``wiped``, ``sponge_pressed``, ``slot_pos``, ``plate_in_slot``, ...) are
    inherited, so both skills' scripted experts drive this env unchanged.
    """

    task_name = "kitchen"

    def stage_success(self) -> tuple[bool, bool]:
        """(every dirt spot wiped, plate upright in the lit slot and released)."""
        return WipeEnv._success(self), DishRackEnv._success(self)

    @property
    def stage(self) -> int:
        return int(self.wiped.all())

    def _success(self) -> bool:
        return all(self.stage_success())

    def _reward(self) -> tuple[float, dict[str, float]]:
        # Stage 2's reward sits one unit above stage 1's, so finishing the wipe is progress however far the plate is.
        wipe_reward, wipe_terms = WipeEnv._reward(self)
        dish_reward, dish_terms = DishRackEnv._reward(self)
        terms = {f"wipe_{k}": v for k, v in wipe_terms.items()} | {f"dish_{k}": v for k, v in dish_terms.items()}
        return (1.0 + dish_reward if self.stage else wipe_reward), terms

    def _stage_info(self) -> dict[str, Any]:
        return {"stage": self.stage, "stage_success": self.stage_success()}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        obs, info = super().reset(seed=seed, options=options)
        return obs, info | self._stage_info()

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, reward, terminated, truncated, info | self._stage_info()


class KitchenExpert(Expert):
    """The wipe expert until every spot is wiped, then the dish_rack expert (it lets go of the sponge first).

    Each stage's expert is seeded with this expert's seed and perturbs with its own rng, so the wipe stage of a
    kitchen episode replays the wipe task's expert episode of the same seeds step for step.
    """

    default_noise = DishRackExpert.default_noise

    def __init__(self, env: gym.Env, seed: int | None = None) -> None:
        super().__init__(env, seed=seed)
        if not isinstance(self.env, KitchenEnv):
            raise TypeError(f"KitchenExpert needs the kitchen env; got {type(self.env).__name__}")
        self.stages: tuple[Expert, Expert] = (WipeExpert(env, seed=seed), DishRackExpert(env, seed=seed))

    @property
    def current(self) -> Expert:
        return self.stages[self.env.stage]  # type: ignore[attr-defined]

    def reset(self) -> None:
        super().reset()
        for expert in self.stages:
            expert.reset()

    def perturb(self, clean: np.ndarray, noise: float) -> np.ndarray:
        return self.current.perturb(clean, noise)

    def _act(self) -> tuple[np.ndarray, float]:
        expert = self.current
        command = expert._act()
        self.phase = f"{STAGES[self.stages.index(expert)]}/{expert.phase}"
        return command
