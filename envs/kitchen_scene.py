"""The kitchen scene shared by dish_rack, wipe and the two-stage kitchen: where its props sit and how they are placed.

Issue 6 (a two-stage kitchen: wipe the table, then rack the dish) and docs/design.md §8.4. A skill adapter trained
on a single-skill task must see the scene it will act in inside the kitchen, so both skill tasks show every kitchen
prop: the plate holder (left) with the plate in it, the rack (right) with one slot lit, the sponge, and (in wipe
and kitchen stage 1) the dirt. What differs between them is only what the kitchen's stage would show:

- wipe (= kitchen stage 1): sponge at its home front-left, dirt on the table, plate in its holder, a slot lit.
- dish_rack (= kitchen stage 2): no dirt (already wiped), the sponge where wiping leaves it: either lying in the
  dirt area, or still held, pressed on the table, by the gripper (the hand-over state the kitchen switches in).

Clearances (measured with the experts, see tests/test_kitchen.py): the dirt area keeps a sponge centred on a
spot, with its finger pads, 1 cm clear of the holder base (x <= -0.15) and the rack base (x >= 0.065).
"""

from __future__ import annotations

import numpy as np

from .base import FINGER_CLOSED, TCP_OFFSET, TabletopEnv

KITCHEN_PROPS = ("plate_holder", "plate", "rack", "sponge")

# plate holder, plate and rack (dish_rack)
HOLDER_JITTER = np.array([0.01, 0.02, 0.0])  # around the arena's holder position; the rack stays where it is
PLATE_RADIUS = 0.045
PLATE_ROLLING_FRICTION = 0.01
PLATE_REST_Z = 0.056  # plate centre when it stands on the holder or rack base
N_SLOTS = 3
LIT = np.array([0.1, 0.9, 0.15, 1.0])
UNLIT = np.array([0.25, 0.25, 0.25, 1.0])
MARKER_HALF_WIDTH = 0.018

# sponge and dirt (wipe)
SPONGE_HALF = np.array([0.025, 0.04, 0.015])
SPONGE_JITTER = np.array([0.015, 0.015])
N_SPOTS = 8
SPOT_LOW = np.array([-0.09, -0.08])  # dirt spot centres: between the holder and the rack
SPOT_HIGH = np.array([0.01, 0.1])
HOLDER_CLEAR_X = -0.11  # a held sponge left of this moves only rightwards (in front of the holder's walls)
SPONGE_REST_LOW = np.array([-0.095, -0.12])  # where a sponge put down after wiping lies (dish_rack)
SPONGE_REST_HIGH = np.array([0.015, 0.1])
SPONGE_REST_YAW = np.deg2rad(30.0)
HANDOVER_PROB = 0.5  # dish_rack episodes that start with the sponge still held (the kitchen's switch state)
HANDOVER_TCP_Z = 0.02  # the workspace floor: where the wipe skill holds the pressed sponge
FINGER_ON_SPONGE = SPONGE_HALF[0] - 0.0005  # finger q whose pads just touch the sponge's x faces


def yaw_quat(yaw: float) -> np.ndarray:
    return np.array([np.cos(yaw / 2.0), 0.0, 0.0, np.sin(yaw / 2.0)])


def configure_plate(env: TabletopEnv) -> None:
    """Give the plate rolling friction (set once per env, in ``__init__``; only the kitchen tasks use the plate).

    A disc standing on its rim rolls out along the slot after release unless rolling friction acts (measured: 4 of
    12 plates rolled 3-8 cm within 30 steps with condim 4, none with this).
    """
    plate = env.model.geom("plate").id
    env.model.geom_condim[plate] = 6
    env.model.geom_friction[plate, 2] = PLATE_ROLLING_FRICTION


def place_dish(env: TabletopEnv) -> int:
    """Holder (jittered) with the plate upright in it; one rack slot lit at random. Returns the lit slot."""
    holder = env.model.body("plate_holder").pos + env.np_random.uniform(-HOLDER_JITTER, HOLDER_JITTER)
    env.set_fixture_pos("plate_holder", holder)
    env.set_free_pose("plate", holder + np.array([0.0, 0.0, PLATE_REST_Z]), np.array([1.0, 0.0, 0.0, 0.0]))
    target = int(env.np_random.integers(N_SLOTS))
    for slot in range(N_SLOTS):
        marker = env.model.geom(f"rack_marker_{slot}")
        marker.rgba[:] = LIT if slot == target else UNLIT
        marker.size[0] = MARKER_HALF_WIDTH
    return target


def place_sponge_home(env: TabletopEnv) -> None:
    """The sponge flat at its home front-left (jittered): where the wipe skill finds it."""
    home = env.model.body("sponge").pos[:2] + env.np_random.uniform(-SPONGE_JITTER, SPONGE_JITTER)
    env.set_free_pose("sponge", np.array([home[0], home[1], SPONGE_HALF[2]]), yaw_quat(0.0))


def place_sponge_after_wiping(env: TabletopEnv) -> bool:
    """The sponge where the wipe skill leaves it; returns whether the hand still holds it.

    With probability :data:`HANDOVER_PROB` the gripper starts closed on the sponge, pressed on the table in the
    dirt area (the state in which the kitchen switches from wipe to dish_rack); otherwise the sponge lies there,
    put down at a small random yaw, and the gripper starts at its usual pose.
    """
    xy = env.np_random.uniform(SPONGE_REST_LOW, SPONGE_REST_HIGH)
    if env.np_random.uniform() >= HANDOVER_PROB:
        yaw = float(env.np_random.uniform(-SPONGE_REST_YAW, SPONGE_REST_YAW))
        env.set_free_pose("sponge", np.array([xy[0], xy[1], SPONGE_HALF[2]]), yaw_quat(yaw))
        return False
    env.set_free_pose("sponge", np.array([xy[0], xy[1], SPONGE_HALF[2]]), yaw_quat(0.0))
    start_closed_at(env, np.array([xy[0], xy[1], HANDOVER_TCP_Z]), FINGER_ON_SPONGE)
    return True


def start_closed_at(env: TabletopEnv, tcp: np.ndarray, finger_q: float) -> None:
    """Start the episode with the tcp at ``tcp`` and the gripper closing (command -1) with fingers at ``finger_q``.

    Overrides the base env's start pose from ``_reset_task``: hand, mocap, finger joints, finger targets and the
    last gripper command (proprio) are all data fields that ``reset`` rewrites, so nothing leaks.
    """
    hand = env.model.joint("hand").qposadr[0]
    env.data.qpos[hand:hand + 3] = tcp - TCP_OFFSET
    env.data.mocap_pos[0] = tcp - TCP_OFFSET
    for joint in ("finger_left", "finger_right"):
        env.data.qpos[env.model.joint(joint).qposadr[0]] = finger_q
    env.data.ctrl[:] = FINGER_CLOSED
    env._last_grip = -1.0
