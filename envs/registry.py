"""Task registry: names, Gymnasium ids, time limits, env and expert classes (docs/design.md §8).

Adding a task is one subclass of :class:`~robolora.envs.base.TabletopEnv` with its :class:`~robolora.envs.expert.
Expert` beside it in ``envs/<task>.py`` plus one :class:`TaskSpec` line in :data:`SPECS`. Env and expert classes
are imported lazily from ``robolora.envs.<module>`` so a task module is only loaded when it is made.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import gymnasium as gym

from .base import TabletopEnv
from .expert import Expert

logger = logging.getLogger(__name__)

_PACKAGE = __name__.rsplit(".", 1)[0]
GROUPS = ("base", "skill", "composite")


@dataclass(frozen=True)
class TaskSpec:
    """One registered task: ``envs/<module>.py`` defines ``env_class`` and ``expert_class``."""

    name: str
    env_id: str
    module: str
    env_class: str
    expert_class: str
    max_episode_steps: int
    group: str  # "base" (multi-task pretraining), "skill" (held out, learnt by adapters) or "composite" (chains skills)

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"TaskSpec.group={self.group!r} is invalid; use one of {GROUPS}")
        if self.max_episode_steps <= 0:
            raise ValueError(f"TaskSpec.max_episode_steps={self.max_episode_steps} must be > 0")
        if not self.env_id.startswith("robolora/"):
            raise ValueError(f"TaskSpec.env_id={self.env_id!r} must start with 'robolora/'")

    @property
    def entry_point(self) -> str:
        return f"{_PACKAGE}.{self.module}:{self.env_class}"

    def load_env_class(self) -> type[TabletopEnv]:
        return getattr(importlib.import_module(f"{_PACKAGE}.{self.module}"), self.env_class)

    def load_expert_class(self) -> type[Expert]:
        return getattr(importlib.import_module(f"{_PACKAGE}.{self.module}"), self.expert_class)


SPECS: tuple[TaskSpec, ...] = (
    TaskSpec("reach", "robolora/Reach-v0", "reach", "ReachEnv", "ReachExpert", 50, "base"),
    TaskSpec("push", "robolora/Push-v0", "push", "PushEnv", "PushExpert", 100, "base"),
    TaskSpec("pick_place", "robolora/PickPlace-v0", "pick_place", "PickPlaceEnv", "PickPlaceExpert", 100, "base"),
    TaskSpec("drawer_open", "robolora/DrawerOpen-v0", "drawer_open", "DrawerOpenEnv", "DrawerOpenExpert", 100,
             "base"),
    TaskSpec("button_press", "robolora/ButtonPress-v0", "button_press", "ButtonPressEnv", "ButtonPressExpert", 60,
             "base"),
    TaskSpec("dish_rack", "robolora/DishRack-v0", "dish_rack", "DishRackEnv", "DishRackExpert", 150, "skill"),
    TaskSpec("wipe", "robolora/Wipe-v0", "wipe", "WipeEnv", "WipeExpert", 200, "skill"),
    TaskSpec("kitchen", "robolora/Kitchen-v0", "kitchen", "KitchenEnv", "KitchenExpert", 350, "composite"),
)
SPEC_BY_NAME: dict[str, TaskSpec] = {s.name: s for s in SPECS}
SPEC_BY_ID: dict[str, TaskSpec] = {s.env_id: s for s in SPECS}
TASKS: dict[str, str] = {s.name: s.env_id for s in SPECS}
BASE_TASKS: tuple[str, ...] = tuple(s.name for s in SPECS if s.group == "base")
SKILL_TASKS: tuple[str, ...] = tuple(s.name for s in SPECS if s.group == "skill")
COMPOSITE_TASKS: tuple[str, ...] = tuple(s.name for s in SPECS if s.group == "composite")


def register_all() -> None:
    """Register every task with Gymnasium (idempotent)."""
    for spec in SPECS:
        if spec.env_id not in gym.registry:
            gym.register(id=spec.env_id, entry_point=spec.entry_point, max_episode_steps=spec.max_episode_steps)


def get_spec(task: str) -> TaskSpec:
    """The spec of a task given its name (``"push"``) or Gymnasium id (``"robolora/Push-v0"``)."""
    spec = SPEC_BY_NAME.get(task) or SPEC_BY_ID.get(task)
    if spec is None:
        raise KeyError(f"unknown task {task!r}; known names: {list(TASKS)}, ids: {list(TASKS.values())}")
    return spec


def make(task: str, **kwargs: object) -> gym.Env:
    """Make a registered task by name or Gymnasium id, wrapped in its TimeLimit; kwargs go to the env."""
    register_all()
    return gym.make(get_spec(task).env_id, **kwargs)


def make_expert(env: gym.Env, seed: int | None = None) -> Expert:
    """The scripted expert of ``env``'s task (``env`` may be wrapped), seeded with ``seed``."""
    unwrapped = env.unwrapped
    if not isinstance(unwrapped, TabletopEnv) or not unwrapped.task_name:
        raise TypeError(
            f"make_expert needs a robolora TabletopEnv task (possibly wrapped); got {type(unwrapped).__name__}"
        )
    return get_spec(unwrapped.task_name).load_expert_class()(env, seed=seed)
