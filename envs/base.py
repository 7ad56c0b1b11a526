"""Shared tabletop MuJoCo environment: one arena, one gripper, one action space for every task.

Implements the task-suite contract of docs/design.md §2 and §8 ("Embodiment and control", "Observations",
"Rendering cost", "The suite"), in the style of Gymnasium's ``envs/mujoco`` (tiny uniform tasks on one base env).

How a task subclass works
-------------------------
A task is one subclass of :class:`TabletopEnv` plus one entry in ``envs/registry.py``::

    class ReachEnv(TabletopEnv):
        task_name = "reach"             # registry key
        props = ("goal",)               # arena props this task uses; every other prop is parked out of view

        def _reset_task(self) -> None:  # place props / goals, drawing ONLY from self.np_random
            self.set_goal_marker(goal_xyz)
        def _success(self) -> bool: ...
        def _reward(self) -> tuple[float, dict[str, float]]:   # (reward, {term: value}) -> info["reward/<term>"]
            ...

Reset order (``reset``): ``super().reset(seed)`` -> restore every mutable model field from the pristine copy
(:data:`MUTABLE_MODEL_FIELDS`) -> ``mj_resetData`` -> park unused props -> place the gripper at its jittered start
pose (open) -> ``_reset_task()`` -> ``mj_forward``. A task may therefore write any field in
:data:`MUTABLE_MODEL_FIELDS` (body positions of fixtures, colours, visual geom sizes/positions) without leaking
into the next episode; writing any other model field requires adding it there. Only resize *visual* geoms
(collision bounding radii are not recomputed). Free props (block, plate, sponge) are placed through
:meth:`set_free_pose`; fixtures (cabinet, button, rack, ...) through :meth:`set_fixture_pos`.

Action: ``Box(-1, 1, (4,), float32)``; ``a[:3]`` moves the mocap target by ``a[:3] * 0.02`` m (clipped to the
workspace with a z floor that keeps the fingertips off the table, and to a 5 cm leash around the hand so the mocap
cannot wind up against an obstacle); ``a[3]`` is the gripper command, **+1 fully open, -1 closed** (linear in
between; the closed target lies below the finger range so the grip force saturates at 5 N).

Observation: ``Dict(rgb_front, [rgb_wrist], proprio)``; proprio (10,) float32 = tcp xyz, tcp velocity, left and
right finger positions, opening between the pads, last gripper command; every entry is clipped to finite bounds.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, ClassVar

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym  # noqa: E402
import mujoco  # noqa: E402
import numpy as np  # noqa: E402
from gymnasium import spaces  # noqa: E402

logger = logging.getLogger(__name__)

ASSET_PATH = Path(__file__).resolve().parent / "assets" / "arena.xml"
CAMERAS = ("front", "wrist")
PROPRIO_DIM = 10
ACTION_SCALE = 0.02  # metres of mocap motion per unit action per step
N_SUBSTEPS = 25  # 25 x 2 ms = 20 Hz control (docs/design.md §8.1: coarser steps broke contact tasks)
TCP_OFFSET = np.array([0.0, 0.0, -0.06])  # tcp site relative to the hand origin (gripper.xml)
WORKSPACE_LOW = np.array([-0.3, -0.28, 0.02])  # tcp bounds; z floor keeps fingertips 5 mm above the table
WORKSPACE_HIGH = np.array([0.3, 0.3, 0.3])
MOCAP_LEASH = 0.05  # max distance between mocap target and hand: no wind-up against obstacles
FINGER_OPEN, FINGER_CLOSED = 0.04, -0.01  # actuator targets; closed is below the joint range on purpose
START_TCP = np.array([0.0, -0.23, 0.08])  # in front of and below the camera's line of sight to the work area
START_JITTER = np.array([0.02, 0.01, 0.01])
WORK_AREA_LOW = np.array([-0.15, -0.1])  # xy range where tasks place randomised objects
WORK_AREA_HIGH = np.array([0.15, 0.12])

# Arena props: name -> (body, has a free joint). Parked props go behind the table, out of the front camera's view.
PROPS: dict[str, tuple[str, bool]] = {
    "block": ("block", True),
    "goal": ("goal", False),
    "goal_disc": ("goal_disc", False),
    "cabinet": ("cabinet", False),
    "button": ("button_base", False),
    "plate_holder": ("plate_holder", False),
    "plate": ("plate", True),
    "rack": ("rack", False),
    "sponge": ("sponge", True),
}
PARK_Y, FLOOR_Z = 3.0, -0.75
MUTABLE_MODEL_FIELDS = ("body_pos", "body_quat", "body_gravcomp", "geom_pos", "geom_quat", "geom_size", "geom_rgba",
                        "geom_contype", "geom_conaffinity", "site_pos", "site_rgba")

_PROPRIO_LOW = np.concatenate([WORKSPACE_LOW - 0.1, [-2.0] * 3, [-0.01] * 2, [-0.02], [-1.0]]).astype(np.float32)
_PROPRIO_HIGH = np.concatenate([WORKSPACE_HIGH + 0.1, [2.0] * 3, [0.05] * 2, [0.1], [1.0]]).astype(np.float32)


class TabletopEnv(gym.Env):
    """Base class of every robolora task; see the module docstring for the subclass contract."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 20}
    task_name: ClassVar[str] = ""
    props: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        image_size: int = 64,
        cameras: tuple[str, ...] = ("front",),
        render_mode: str | None = None,
        render_size: int = 256,
        terminate_on_success: bool = True,
    ) -> None:
        cameras = tuple(cameras)
        if not 16 <= int(image_size) <= 1024:
            raise ValueError(f"image_size={image_size} is out of range; use 16..1024 pixels (default 64)")
        if not 16 <= int(render_size) <= 2048:
            raise ValueError(f"render_size={render_size} is out of range; use 16..2048 pixels (default 256)")
        if not cameras or len(set(cameras)) != len(cameras) or not set(cameras) <= set(CAMERAS):
            raise ValueError(f"cameras={cameras!r} is invalid; use a non-empty tuple of distinct names from {CAMERAS}")
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode={render_mode!r} is not supported; use None or 'rgb_array'")
        unknown = set(self.props) - set(PROPS)
        if unknown:
            raise ValueError(f"{type(self).__name__}.props names unknown props {sorted(unknown)}; known: {list(PROPS)}")
        self.image_size = int(image_size)
        self.cameras = cameras
        self.render_mode = render_mode
        self.render_size = int(render_size)
        self.terminate_on_success = bool(terminate_on_success)

        self.model = mujoco.MjModel.from_xml_path(str(ASSET_PATH))
        self.model.vis.global_.offwidth = max(self.model.vis.global_.offwidth, self.image_size, self.render_size)
        self.model.vis.global_.offheight = max(self.model.vis.global_.offheight, self.image_size, self.render_size)
        self.data = mujoco.MjData(self.model)
        self._pristine = {f: getattr(self.model, f).copy() for f in MUTABLE_MODEL_FIELDS}
        self._renderers: dict[int, mujoco.Renderer] = {}

        self._hand_qadr = self.model.joint("hand").qposadr[0]
        self._hand_vadr = self.model.joint("hand").dofadr[0]
        self._finger_qadr = [self.model.joint(n).qposadr[0] for n in ("finger_left", "finger_right")]
        self._finger_geoms = (self.model.geom("finger_left").id, self.model.geom("finger_right").id)
        self._tcp_site = self.model.site("tcp").id
        self._last_grip = 1.0

        img = spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8)
        obs_spaces: dict[str, spaces.Space] = {f"rgb_{c}": img for c in cameras}
        obs_spaces["proprio"] = spaces.Box(_PROPRIO_LOW, _PROPRIO_HIGH, dtype=np.float32)
        self.observation_space = spaces.Dict(obs_spaces)
        self.action_space = spaces.Box(-1.0, 1.0, (4,), np.float32)

    # ----------------------------------------------------------------------------------------- task hooks
    def _reset_task(self) -> None:
        """Place the task's props and goals, drawing from ``self.np_random`` only."""
        raise NotImplementedError(f"{type(self).__name__} must implement _reset_task()")

    def _success(self) -> bool:
        raise NotImplementedError(f"{type(self).__name__} must implement _success()")

    def _reward(self) -> tuple[float, dict[str, float]]:
        raise NotImplementedError(f"{type(self).__name__} must implement _reward()")

    # ------------------------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        for field, value in self._pristine.items():
            getattr(self.model, field)[:] = value
        mujoco.mj_resetData(self.model, self.data)
        for index, (name, (body, free)) in enumerate(PROPS.items()):
            if name not in self.props:
                self._park(index, body, free)
        tcp = START_TCP + self.np_random.uniform(-START_JITTER, START_JITTER)
        self.data.qpos[self._hand_qadr:self._hand_qadr + 3] = tcp - TCP_OFFSET
        self.data.mocap_pos[0] = tcp - TCP_OFFSET
        self.data.qpos[self._finger_qadr] = FINGER_OPEN
        self.data.ctrl[:] = FINGER_OPEN
        self._last_grip = 1.0
        self._reset_task()
        mujoco.mj_forward(self.model, self.data)
        return self._get_obs(), {"success": bool(self._success())}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (4,) or not np.all(np.isfinite(action)):
            raise ValueError(f"action must be 4 finite numbers (dx, dy, dz, grip); got {action!r}")
        action = np.clip(action, -1.0, 1.0)
        hand = self.data.qpos[self._hand_qadr:self._hand_qadr + 3]
        target = self.data.mocap_pos[0] + action[:3] * ACTION_SCALE
        target = np.clip(target, hand - MOCAP_LEASH, hand + MOCAP_LEASH)
        self.data.mocap_pos[0] = np.clip(target, WORKSPACE_LOW - TCP_OFFSET, WORKSPACE_HIGH - TCP_OFFSET)
        self._last_grip = float(action[3])
        self.data.ctrl[:] = FINGER_CLOSED + (action[3] + 1.0) / 2.0 * (FINGER_OPEN - FINGER_CLOSED)
        mujoco.mj_step(self.model, self.data, nstep=N_SUBSTEPS)
        success = bool(self._success())
        reward, terms = self._reward()
        info: dict[str, Any] = {"success": success, **{f"reward/{k}": float(v) for k, v in terms.items()}}
        return self._get_obs(), float(reward), success and self.terminate_on_success, False, info

    def render(self) -> np.ndarray | None:
        if self.render_mode is None:
            gym.logger.warn("render() called without render_mode; make the env with render_mode='rgb_array'")
            return None
        return self._render_camera("front", self.render_size)

    def close(self) -> None:
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers.clear()

    # ---------------------------------------------------------------------------------- observations
    def _get_obs(self) -> dict[str, np.ndarray]:
        obs = {f"rgb_{c}": self._render_camera(c, self.image_size) for c in self.cameras}
        obs["proprio"] = self.proprio()
        return obs

    def proprio(self) -> np.ndarray:
        fingers = self.data.qpos[self._finger_qadr]
        raw = np.concatenate([
            self.tcp_pos,
            self.data.qvel[self._hand_vadr:self._hand_vadr + 3],
            fingers,
            [fingers.sum(), self._last_grip],
        ])
        return np.clip(raw, _PROPRIO_LOW, _PROPRIO_HIGH).astype(np.float32)

    def _render_camera(self, camera: str, size: int) -> np.ndarray:
        renderer = self._renderers.get(size)
        if renderer is None:
            renderer = self._renderers[size] = mujoco.Renderer(self.model, size, size)
        renderer.update_scene(self.data, camera=camera)
        return renderer.render()

    # ------------------------------------------------------------------------ privileged state (experts)
    @property
    def tcp_pos(self) -> np.ndarray:
        return self.data.site_xpos[self._tcp_site].copy()

    @property
    def gripper_opening(self) -> float:
        return float(self.data.qpos[self._finger_qadr].sum())

    def body_pos(self, body: str) -> np.ndarray:
        return self.data.body(body).xpos.copy()

    def site_pos(self, site: str) -> np.ndarray:
        return self.data.site(site).xpos.copy()

    def joint_q(self, joint: str) -> float:
        return float(self.data.joint(joint).qpos[0])

    def grasped(self, body: str) -> bool:
        """True when both finger pads touch a geom of ``body``."""
        body_id = self.model.body(body).id
        touching = set()
        for contact in self.data.contact[: self.data.ncon]:
            for finger, other in ((contact.geom1, contact.geom2), (contact.geom2, contact.geom1)):
                if finger in self._finger_geoms and self.model.geom_bodyid[other] == body_id:
                    touching.add(finger)
        return len(touching) == 2

    # --------------------------------------------------------------------------- scene editing (tasks)
    def set_free_pose(self, body: str, pos: np.ndarray, quat: np.ndarray | None = None) -> None:
        """Place a free-joint prop (block, plate, sponge) at ``pos`` (and ``quat``), at rest."""
        joint = self.model.body(body).jntadr[0]
        qadr, vadr = self.model.jnt_qposadr[joint], self.model.jnt_dofadr[joint]
        self.data.qpos[qadr:qadr + 3] = pos
        if quat is not None:
            self.data.qpos[qadr + 3:qadr + 7] = quat
        self.data.qvel[vadr:vadr + 6] = 0.0

    def set_fixture_pos(self, body: str, pos: np.ndarray) -> None:
        """Move a fixed prop (cabinet, button_base, rack, goal markers, ...) by rewriting its body position."""
        self.model.body(body).pos[:] = pos

    def set_goal_marker(self, pos: np.ndarray) -> None:
        """Place the floating goal sphere at ``pos`` with its yellow pole and base disk down to the table."""
        height = max(float(pos[2]), 0.005)
        self.set_fixture_pos("goal", pos)
        self.model.geom("goal_pole").size[1] = height / 2.0
        self.model.geom("goal_pole").pos[2] = -height / 2.0
        self.model.geom("goal_base").pos[2] = -height + 0.001

    def sample_xy(self, margin: float = 0.0) -> np.ndarray:
        """A uniform xy point in the randomised work area, ``margin`` metres inside its edges."""
        return self.np_random.uniform(WORK_AREA_LOW + margin, WORK_AREA_HIGH - margin)

    def _park(self, index: int, body: str, free: bool) -> None:
        """Move an unused prop behind the table, out of view; a free prop also floats without contacts there,
        which saves the solver its floor contacts (~40% of a reach step's physics)."""
        body_id = self.model.body(body).id
        park = np.array([-1.6 + 0.4 * index, PARK_Y, self._pristine["body_pos"][body_id][2] + FLOOR_Z])
        if free:
            self.set_free_pose(body, park)
            self.model.body_gravcomp[body_id] = 1.0
            first = self.model.body_geomadr[body_id]
            geoms = slice(first, first + self.model.body_geomnum[body_id])
            self.model.geom_contype[geoms] = 0
            self.model.geom_conaffinity[geoms] = 0
        else:
            self.set_fixture_pos(body, park)
