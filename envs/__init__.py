"""MuJoCo tabletop tasks and their scripted experts (installed as ``robolora.envs``).

Importing this package registers every task with Gymnasium (docs/design.md §2 and §8).
``make("push")`` or ``gymnasium.make("robolora/Push-v0")`` builds a task; ``make_expert(env, seed)`` its expert.
"""

from __future__ import annotations

from .base import PROPRIO_DIM, TabletopEnv
from .expert import Expert
from .registry import BASE_TASKS, SKILL_TASKS, SPECS, TASKS, TaskSpec, get_spec, make, make_expert, register_all

register_all()

__all__ = [
    "BASE_TASKS",
    "PROPRIO_DIM",
    "SKILL_TASKS",
    "SPECS",
    "TASKS",
    "Expert",
    "TabletopEnv",
    "TaskSpec",
    "get_spec",
    "make",
    "make_expert",
]
