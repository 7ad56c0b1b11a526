"""Dish rack (skill): take the plate out of its holder and stand it in the rack slot whose marker is lit green.

docs/design.md §8.4 (dish_rack row) and §9.3 ("A new skill on the frozen base"). What no base task shows:
a rim grasp of a thin object, a high clearance lift, millimetre slot alignment, a release inside the slot, and
choosing the slot from a colour cue. The cue is a tall marker behind each slot (one lit green, the others neutral
grey), widened here so it spans several pixels at 64 px: a thin floor strip was misread by trained policies.

Success: the plate stands upright (face normal within 15 degrees of the slots' x axis), its centre is inside the
lit slot (within 7 mm across and 3 cm along the slot, resting low), and no finger touches it. The plate gets
rolling friction so that, once released, it stays in the slot instead of rolling along it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import TabletopEnv
from .expert import CLOSE, OPEN, Expert
from .kitchen_scene import KITCHEN_PROPS, PLATE_RADIUS, PLATE_REST_Z, configure_plate, place_dish, \
    place_sponge_after_wiping

SLOT_TOLERANCE = np.array([0.007, 0.03])  # |dx|, |dy| of the plate centre from the slot centre
MAX_REST_Z = 0.07
UPRIGHT_COS = np.cos(np.deg2rad(15.0))
WALL_TOP_Z = 0.05  # top of the rack's slot walls
HOLDER_WALL_TOP_Z = 0.04
HOVER_Z = WALL_TOP_Z + PLATE_RADIUS + 0.008  # plate centre when its rim hovers just above the walls
RISE_Z = 0.065  # below this tcp height the hand rises before it moves sideways (fingers clear a lying sponge)


class DishRackEnv(TabletopEnv):
    """Plate upright in a holder on the left; a three-slot rack on the right with the target slot's marker lit.

    The kitchen's stage 2 (envs/kitchen_scene.py): no dirt, and the sponge where wiping left it, half of the
    episodes still held by the gripper pressed on the table.
    """

    task_name = "dish_rack"
    props = KITCHEN_PROPS

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._plate_geom = self.model.geom("plate").id
        configure_plate(self)

    def _reset_task(self) -> None:
        self.target_slot = place_dish(self)
        place_sponge_after_wiping(self)

    @property
    def slot_pos(self) -> np.ndarray:
        """Centre of the lit slot on the rack base (world frame)."""
        return self.site_pos(f"rack_slot_{self.target_slot}")

    def plate_normal(self) -> np.ndarray:
        """Unit normal of the plate's faces (its cylinder axis) in the world frame."""
        return self.data.geom_xmat[self._plate_geom].reshape(3, 3)[:, 2].copy()

    def plate_touched(self) -> bool:
        """Whether either finger pad touches the plate."""
        for contact in self.data.contact[: self.data.ncon]:
            pair = {contact.geom1, contact.geom2}
            if self._plate_geom in pair and pair & set(self._finger_geoms):
                return True
        return False

    def plate_in_slot(self) -> bool:
        """Plate upright and resting inside the lit slot (whether or not it is still held)."""
        offset = self.body_pos("plate") - self.slot_pos
        upright = abs(float(self.plate_normal()[0])) > UPRIGHT_COS
        inside = bool(np.all(np.abs(offset[:2]) < SLOT_TOLERANCE)) and self.body_pos("plate")[2] < MAX_REST_Z
        return upright and inside

    def _success(self) -> bool:
        return self.plate_in_slot() and not self.plate_touched()

    def _reward(self) -> tuple[float, dict[str, float]]:
        plate = self.body_pos("plate")
        grasp_point = plate + np.array([0.0, 0.0, PLATE_RADIUS])
        terms = {
            "reach": -0.5 * float(np.linalg.norm(self.tcp_pos - grasp_point)),
            "grasp": 0.25 * float(self.grasped("plate")),
            "plate_to_slot": -float(np.linalg.norm(plate - (self.slot_pos + np.array([0.0, 0.0, PLATE_RADIUS])))),
            "in_slot": 0.5 * float(self.plate_in_slot()),
            "success": float(self._success()),
        }
        return sum(terms.values()), terms


def approach(expert: Expert, target: np.ndarray, z_speed: float) -> np.ndarray:
    """P-control with full authority across and the vertical speed capped on its own.

    ``Expert.move_to`` caps the norm of the whole command, so during a capped descent the sideways correction
    shrinks with it and action noise walks the fingers into the object; here alignment never starves.
    """
    tcp = expert.env.tcp_pos
    across = expert.move_to(np.array([target[0], target[1], tcp[2]]))
    vertical = expert.move_to(np.array([tcp[0], tcp[1], target[2]]), z_speed)
    return np.array([across[0], across[1], vertical[2]])


class DishRackExpert(Expert):
    """Phases: above -> descend -> close -> lift -> carry -> align -> insert -> release.

    Fallbacks: the plate not held while lifting, carrying or inserting -> regrasp it where it stands; the plate
    released outside the lit slot -> regrasp. Insertion aligns the plate itself (not the hand) over the slot, so a
    plate that shifted in the grasp still goes in.
    """

    default_noise = 0.2
    quiet_phases = frozenset({"align", "insert", "release"})
    initial_phase = "above"
    grasp_depth = 0.02  # tcp this far below the plate's top rim

    def _plan(self) -> None:
        self.grasp_offset = self.jitter(np.array([0.002, 0.006, 0.003]))
        self.lift_z = float(self.rng.uniform(0.19, 0.22))
        self.slot_offset = self.jitter(np.array([0.0015, 0.006, 0.0]))
        self.carry_speed = float(self.rng.uniform(0.7, 1.0))
        self.counter = 0
        self.lift_xy = np.zeros(2)  # where the plate was grasped: it is lifted straight up from there

    def _act(self) -> tuple[np.ndarray, float]:
        env: DishRackEnv = self.env  # type: ignore[assignment]
        plate = env.body_pos("plate")
        tcp = env.tcp_pos
        grasp = plate + np.array([0.0, 0.0, PLATE_RADIUS - self.grasp_depth]) + self.grasp_offset
        # Contacts flicker for single steps at a rim grasp: "held" also counts a closed hand right at the plate.
        held = env.grasped("plate") or (env.gripper_opening < 0.02 and float(np.linalg.norm(plate - tcp)) < 0.045)

        if self.phase in ("lift", "carry", "align", "insert") and not held:
            self.phase = "above"  # plate slipped out: regrasp where it stands
        if self.phase == "release" and self.counter > 8 and not env.plate_in_slot():
            self.phase = "above"
        if self.phase == "above":
            target = np.array([grasp[0], grasp[1], max(grasp[2] + 0.05, tcp[2])])
            if self.near(target, 0.008, slice(0, 2)):
                self.phase = "descend"
            elif tcp[2] < RISE_Z and not self.near(target, 0.03, slice(0, 2)):
                target[:2] = tcp[:2]  # let go of a held sponge and rise before moving sideways
            return self.move_to(target), OPEN
        if self.phase == "descend":
            if not self.near(grasp, 0.02, slice(0, 2)):
                self.phase = "above"
            elif self.near(grasp, 0.006):
                self.phase, self.counter = "close", 0
            return approach(self, grasp, 0.6), OPEN
        if self.phase == "close":
            self.counter += 1
            if held and self.counter >= 4:
                self.phase, self.lift_xy = "lift", tcp[:2].copy()
            elif self.counter > 12:
                self.phase = "above"
            return approach(self, grasp, 0.3), CLOSE
        # Hand targets put the plate centre (not the tcp) at a point: the grasp may have shifted the plate.
        hold = tcp - plate
        slot = env.slot_pos + self.slot_offset
        error = plate - slot
        if self.phase == "lift":
            if tcp[2] > self.lift_z - 0.015:
                self.phase = "carry"
            # straight up, slowly while the plate is still between the holder walls (it pivots if it snags)
            in_holder = plate[2] - PLATE_RADIUS < HOLDER_WALL_TOP_Z + 0.01
            target = np.array([self.lift_xy[0], self.lift_xy[1], self.lift_z])
            return self.move_to(target, 0.5 if in_holder else self.carry_speed), CLOSE
        if self.phase == "carry":
            if np.linalg.norm(error[:2]) < 0.015:
                self.phase = "align"
            return self.move_to(np.array([slot[0], slot[1], plate[2]]) + hold, self.carry_speed), CLOSE
        hover = np.array([slot[0], slot[1], HOVER_Z])
        if self.phase == "align":
            # hover just above the wall tops until the plate lines up across the slot (the 4 mm that matter)
            if plate[2] < HOVER_Z + 0.01 and abs(error[0]) < 0.003 and abs(error[1]) < 0.01:
                self.phase, self.counter = "insert", 0
            return approach(self, hover + hold, 0.7), CLOSE
        if self.phase == "insert":
            self.counter += 1
            if plate[2] < PLATE_REST_Z + 0.006:
                self.phase, self.counter = "release", 0
            elif plate[2] > WALL_TOP_Z + PLATE_RADIUS - 0.003 and (
                    abs(error[0]) > 0.005 or self.counter > 2 or abs(env.plate_normal()[2]) > 0.05):
                # landed on a wall top (stalled or tipping in the grasp): back up before it twists out of the hand
                self.phase = "align"
                return approach(self, hover + hold, 0.7), CLOSE
            seated = np.array([slot[0], slot[1], PLATE_REST_Z])
            return approach(self, seated + hold, 1.0), CLOSE
        self.counter += 1
        retreat = np.array([tcp[0], tcp[1], plate[2] + 0.1]) if self.counter > 3 else tcp
        return self.move_to(retreat, 0.5), OPEN
