"""Wipe (skill): pick up the sponge and scrub away every dirt spot on the table.

docs/design.md §8.4 (wipe row), after robosuite's Wipe task: the dirt is a set of visual-only markers laid on a
random walk, and a spot counts as wiped when its centre lies inside the sponge's footprint while the sponge is
held and pressed onto the table. Wiped spots turn invisible (alpha 0), so the remaining dirt is always visible
to the policy; the colours are model fields that the base env restores on every reset. Success: all spots wiped.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import TabletopEnv
from .dish_rack import approach
from .expert import CLOSE, OPEN, Expert
from .kitchen_scene import HOLDER_CLEAR_X, KITCHEN_PROPS, N_SPOTS, SPONGE_HALF, SPOT_HIGH, SPOT_LOW, configure_plate, \
    place_dish, place_sponge_home

SPOT_Z = 0.0007  # spot centre: a 1.2 mm disc lying on the table top (z = 0)
SPOT_STEP = (0.035, 0.045)  # random-walk step length (m)
SPOT_TURN = 0.7  # max heading change per step (rad)
PRESS_COMMAND = 0.5  # downward action while scrubbing (the hand rests on the workspace floor, no wind-up)
PRESS_HEIGHT = 0.002  # sponge face within this of the table top counts as on it
FLAT_COS = np.cos(np.deg2rad(15.0))  # a face within 15 degrees of horizontal counts as flat


class WipeEnv(TabletopEnv):
    """A sponge at the front-left and eight dirt spots on a random walk between the plate holder and the rack.

    The kitchen's stage 1 (envs/kitchen_scene.py): the plate stands in its holder and one rack slot is lit.
    """

    task_name = "wipe"
    props = KITCHEN_PROPS

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sponge_geom = self.model.geom("sponge").id
        self._spot_geoms = [self.model.geom(f"dirt_{i}").id for i in range(N_SPOTS)]
        configure_plate(self)

    def _reset_task(self) -> None:
        self.target_slot = place_dish(self)
        place_sponge_home(self)
        self._place_dirt()

    def _place_dirt(self) -> None:
        self.spots = self._random_walk()
        for geom, xy in zip(self._spot_geoms, self.spots):
            self.model.geom_pos[geom] = [xy[0], xy[1], SPOT_Z]
        self.wiped = np.zeros(N_SPOTS, dtype=bool)

    def _random_walk(self) -> np.ndarray:
        """Spot centres (N_SPOTS, 2): a walk with random step lengths and a smoothly turning heading."""
        point = self.np_random.uniform(SPOT_LOW, SPOT_HIGH)
        heading = self.np_random.uniform(-np.pi, np.pi)
        spots = [point]
        while len(spots) < N_SPOTS:
            heading += self.np_random.uniform(-SPOT_TURN, SPOT_TURN)
            step = self.np_random.uniform(*SPOT_STEP) * np.array([np.cos(heading), np.sin(heading)])
            if np.any(point + step < SPOT_LOW) or np.any(point + step > SPOT_HIGH):
                heading += np.pi  # bounce off the edge of the area
                continue
            point = point + step
            spots.append(point)
        return np.array(spots)

    def _sponge_down_axis(self) -> tuple[int, bool]:
        """The sponge's local axis closest to vertical, and whether it is within 15 degrees of vertical.

        Any face of the sponge wipes: one knocked onto its side by a finger still cleans with its narrower face.
        """
        rotation = self.data.body("sponge").xmat.reshape(3, 3)
        axis = int(np.argmax(np.abs(rotation[2])))
        return axis, bool(abs(rotation[2, axis]) > FLAT_COS)

    def sponge_pressed(self) -> bool:
        """The sponge is held by both fingers with one face flat on the table (within PRESS_HEIGHT).

        A height test rather than a contact test: the workspace floor stops the hand where a sponge grasped on the
        table just touches it, so its contact with the table flickers from step to step.
        """
        axis, flat = self._sponge_down_axis()
        bottom = self.body_pos("sponge")[2] - SPONGE_HALF[axis]
        return flat and bottom < PRESS_HEIGHT and self.grasped("sponge")

    def spots_under_sponge(self) -> np.ndarray:
        """(N_SPOTS,) bool: spot centre inside the footprint of the sponge's face that is down."""
        axis, _ = self._sponge_down_axis()
        rotation = self.data.body("sponge").xmat.reshape(3, 3)
        local = (np.column_stack([self.spots, np.full(N_SPOTS, SPOT_Z)]) - self.body_pos("sponge")) @ rotation
        inside = np.abs(local) < SPONGE_HALF
        inside[:, axis] = True
        return inside.all(axis=1)

    def _update_wiped(self) -> None:
        # Idempotent at a given state, so calling it from _success (the hook that runs after every physics step
        # and before the observation is rendered) hides a spot in the very frame it was wiped in.
        if self.sponge_pressed():
            newly = self.spots_under_sponge() & ~self.wiped
            for index in np.flatnonzero(newly):
                self.model.geom_rgba[self._spot_geoms[index], 3] = 0.0
            self.wiped |= newly

    def _success(self) -> bool:
        self._update_wiped()
        return bool(self.wiped.all())

    def _reward(self) -> tuple[float, dict[str, float]]:
        sponge = self.body_pos("sponge")
        remaining = self.spots[~self.wiped]
        to_dirt = float(np.min(np.linalg.norm(remaining - sponge[:2], axis=1))) if len(remaining) else 0.0
        terms = {
            "reach": -0.5 * float(np.linalg.norm(self.tcp_pos - sponge)),
            "grasp": 0.25 * float(self.grasped("sponge")),
            "pressed": 0.25 * float(self.sponge_pressed()),
            "sponge_to_dirt": -to_dirt,
            "wiped": float(self.wiped.mean()),
            "success": float(self.wiped.all()),
        }
        return sum(terms.values()), terms


class WipeExpert(Expert):
    """Phases: above -> descend -> close -> travel (sponge lifted) -> scrub (pressed, spot by spot in walk order).

    Fallback: the sponge is not held while travelling or scrubbing -> open and regrasp it where it lies. The sponge
    centre (not the hand) is steered over each spot, so a grasp off the sponge's centre still wipes.
    """

    default_noise = 0.3
    initial_phase = "above"
    travel_height = 0.03  # sponge bottom above the table while travelling to the first spot

    def _plan(self) -> None:
        self.grasp_offset = self.jitter(np.array([0.002, 0.01, 0.0]))
        self.spot_offset = self.jitter(np.array([0.005, 0.012, 0.0]))[:2]
        self.scrub_speed = float(self.rng.uniform(0.6, 0.9))
        self.counter = 0

    def _act(self) -> tuple[np.ndarray, float]:
        env: WipeEnv = self.env  # type: ignore[assignment]
        sponge = env.body_pos("sponge")
        tcp = env.tcp_pos
        grasp = sponge + np.array([0.0, 0.0, 0.005]) + self.grasp_offset
        held = env.grasped("sponge") or (env.gripper_opening < 0.06 and float(np.linalg.norm(sponge - tcp)) < 0.03)

        if self.phase in ("travel", "scrub") and not held:
            self.phase = "above"
        clear = sponge[2] + SPONGE_HALF[2] + 0.03  # tcp height where the fingertips clear the sponge
        if self.phase == "above":
            target = np.array([grasp[0], grasp[1], max(clear + 0.02, tcp[2])])
            if self.near(grasp, 0.008, slice(0, 2)):
                self.phase = "descend"
            elif tcp[2] < clear and self.near(sponge, 0.08, slice(0, 2)):
                target[:2] = tcp[:2]  # rise before moving sideways: a finger dragged past the sponge flips it
            return self.move_to(target), OPEN
        if self.phase == "descend":
            # the open fingers clear the sponge by 1.5 cm across (x); once they straddle it, only re-centre
            off = np.abs(tcp[:2] - grasp[:2]) > np.array([0.01, 0.025])
            if (tcp[2] > clear and off.any()) or not self.near(grasp, 0.03, slice(0, 2)):
                self.phase = "above"
            elif self.near(grasp, 0.008):
                self.phase, self.counter = "close", 0
            return approach(self, grasp, 0.6), OPEN
        if self.phase == "close":
            self.counter += 1
            if held and self.counter >= 4:
                self.phase, self.counter = "travel", 0
            elif self.counter > 12:
                self.phase = "above"
            return approach(self, grasp, 0.3), CLOSE
        if env.wiped.all():  # done (the env runs on when terminate_on_success=False): lift the sponge off
            return self.move_to(np.array([tcp[0], tcp[1], clear + 0.03]), 0.5), CLOSE
        hold = tcp - sponge  # steer the sponge centre, not the hand
        dirt = env.spots[np.flatnonzero(~env.wiped)[0]] + self.spot_offset
        if self.phase == "travel":
            target = np.array([dirt[0], dirt[1], SPONGE_HALF[2] + self.travel_height]) + hold
            if np.linalg.norm((sponge - target + hold)[:2]) < 0.015:
                self.phase = "scrub"
            elif sponge[2] < SPONGE_HALF[2] + 0.5 * self.travel_height:
                target[:2] = tcp[:2]  # lift clear of the table first
            elif sponge[0] < HOLDER_CLEAR_X:
                target[1] = tcp[1]  # pass in front of the plate holder, not through its walls
            return self.move_to(target), CLOSE
        # scrub: press down (the workspace floor stops the hand) and slide the sponge centre onto the next spot
        self.counter = 0 if env.sponge_pressed() else self.counter + 1
        if self.counter > 8:
            self.phase = "above"  # held too high to touch the table: put it down and grasp it lower
        target = np.array([dirt[0], dirt[1], sponge[2]]) + hold
        move = self.move_to(target, self.scrub_speed)
        move[2] = -PRESS_COMMAND
        return move, CLOSE
