"""Skill sequences on the torch-free controller: which skill of a multi-skill bundle acts, tick by tick (issue 19;
docs/controller.md).

A ``Sequencer`` walks a sequence of a bundle's skills (``["wipe", "dish_rack"]``) on one robot (batch 1), switching
through ``Controller.activate``, so every switch lands at a tick boundary and drops the old skill's queued actions.
Three drivers decide when the next skill takes over:

- ``learned``: when the active skill's completion output ("done", the probability that its goal is reached, from
  the policy's own camera and proprio) stays >= ``threshold`` for ``k`` consecutive ticks. Threshold and k come
  from each skill's bundle ("completion"), or an override. The controller evaluates the head at every tick
  (``Controller.completion_every_tick``). When the last skill's signal fires the sequence is finished and the
  sequencer holds.
- ``schedule``: at given ticks (``schedule[i]`` is the 0-based tick at which skill ``i + 1`` acts first).
- ``command``: an external planner calls ``controller.activate(skill)`` (from any thread); the sequencer follows
  the controller's active skill. In simulation ``stage_success_planner`` stands in for the planner: it asks for the
  next skill once the env reports the active stage's success (the oracle of ``robolora rollout --switch success``).

Timeouts: each skill has one (its bundle's ``completion.timeout_ticks``, or an override; none for a skill without
a head unless overridden). When a skill has acted for that many ticks without handing over, the sequencer stops
the skill and holds safely (``Controller.hold``: zero motion, the gripper keeping its command) until the episode
ends, and reports the skill that did not finish.

When the env reports ``info["stage_success"]`` (one flag per skill of the sequence), every switch is scored:
premature when the stage had not succeeded yet when the switch was decided, otherwise its lag in ticks from the
first observation showing the stage's success to the first tick of the next skill (0 for the oracle; at least
``k`` for the learned driver, which counts from that observation); late when the lag exceeds that minimum.
Stages that succeeded but were never left are missed switches. The last skill's own signal ends the sequence: the
sequencer holds (``finish="hold"``, the default) or, with ``finish="continue"``, reports it and lets the last skill
act on; when it fires before that stage succeeded the episode counts a premature finish.

Imports numpy and the torch-free ``robolora.controller`` / ``robolora.episodes`` only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from robolora.controller import Controller
from robolora.episodes import rate_metrics, timing_metrics

logger = logging.getLogger(__name__)

__all__ = ["SWITCHES", "Sequencer", "SkillRule", "stage_success_planner"]

SWITCHES = ("learned", "schedule", "command")
FINISHES = ("hold", "continue")  # what follows the last skill's own completion signal
RUNNING, FINISHED, TIMED_OUT = "running", "finished", "timed_out"
Planner = Callable[["Sequencer", Mapping[str, Any]], "str | None"]


@dataclass(frozen=True)
class SkillRule:
    """When one stage's skill hands over: completion threshold and k (learned driver) and its timeout in ticks."""

    skill: str
    threshold: float | None
    k: int | None
    timeout_ticks: int | None


class Sequencer:
    """Runs ``sequence`` (default: the bundle's sequence, else its skills in order) on ``controller``.

    ``select_action(obs)`` acts (or holds) and decides switches; ``observe(info)`` after each env step reads the
    env's stage success (optional) and lets a ``planner`` command switches; ``reset(info)`` starts an episode;
    ``record()`` is the episode's report and ``metrics(records)`` summarises many. Every argument is checked here,
    before anything runs: a ``ValueError`` names the bad value and what the bundle offers.
    """

    def __init__(self, controller: Controller, sequence: Sequence[str] | None = None, switch: str = "learned", *,
                 schedule: Sequence[int] | None = None, threshold: float | None = None, k: int | None = None,
                 timeout: int | Sequence[int] | None = None, planner: Planner | None = None,
                 finish: str = "hold") -> None:
        self.controller, self.switch, self.planner = controller, switch, planner
        if finish not in FINISHES:
            raise ValueError(f"finish={finish!r} is invalid; use one of {list(FINISHES)}")
        self.finish = finish
        self.skills = tuple(sequence or controller.sequence or controller.skills)
        self._check_skills()
        if switch not in SWITCHES:
            raise ValueError(f"switch={switch!r} is invalid; use one of {list(SWITCHES)}")
        if planner is not None and switch != "command":
            raise ValueError(f"a planner commands switches; it needs switch='command', not {switch!r}")
        self.schedule = self._check_schedule(schedule)
        self.rules = self._rules(threshold, k, timeout)
        controller.completion_every_tick = switch == "learned"
        self.stage_done = np.zeros(len(self.skills), dtype=bool)
        self.reset()

    # ------------------------------------------------------------------------------------------- validation
    def _check_skills(self) -> None:
        have = list(self.controller.skills)
        unknown = [s for s in self.skills if s not in have or s is None]
        if not self.skills or unknown:
            raise ValueError(f"sequence {list(self.skills)} names skill(s) {unknown} that bundle "
                             f"{self.controller.path} lacks; it has {have}")
        allowed = self.controller.transitions
        for a, b in zip(self.skills, self.skills[1:]):
            if allowed is not None and b not in allowed.get(a, ()):
                raise ValueError(f"bundle {self.controller.path} does not allow the switch {a} -> {b} (from {a}: "
                                 f"{list(allowed.get(a, ()))}); re-export it with --sequence "
                                 f"{','.join(self.skills)} or without a sequence")

    def _check_schedule(self, schedule: Sequence[int] | None) -> tuple[int, ...]:
        if self.switch != "schedule":
            if schedule:
                raise ValueError(f"schedule ticks are only used with switch='schedule', not {self.switch!r}")
            return ()
        ticks = tuple(int(t) for t in (schedule or ()))
        if len(ticks) != len(self.skills) - 1 or any(t < 1 for t in ticks) or list(ticks) != sorted(set(ticks)):
            raise ValueError(f"schedule {list(ticks)} is invalid for sequence {list(self.skills)}: give "
                             f"{len(self.skills) - 1} increasing ticks >= 1, the tick at which each next skill "
                             f"acts first")
        return ticks

    def _rules(self, threshold: float | None, k: int | None, timeout: int | Sequence[int] | None) -> list[SkillRule]:
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold={threshold} must be in (0, 1]")
        if k is not None and k < 1:
            raise ValueError(f"k={k} must be >= 1 (consecutive ticks above the threshold)")
        timeouts = [timeout] * len(self.skills) if timeout is None or isinstance(timeout, int) else list(timeout)
        if len(timeouts) != len(self.skills) or any(t is not None and t < 1 for t in timeouts):
            raise ValueError(f"timeout={timeout} is invalid: give one tick count >= 1, or one per skill of "
                             f"{list(self.skills)}")
        heads = {s: self.controller.skill_spec(s).completion for s in self.skills}
        lacking = [s for s in self.skills[:-1] if heads[s] is None]
        if self.switch == "learned" and lacking:
            have = [s for s in self.controller.skills if s is not None and self.controller.skill_spec(s).completion]
            raise ValueError(f"switch='learned' needs a completion head on every skill that hands over; "
                             f"{lacking} of bundle {self.controller.path} have none (skills with a head: {have}); "
                             f"export skills trained with a completion head, or switch by schedule or command")
        rules = []
        for skill, limit in zip(self.skills, timeouts):
            head = heads[skill]
            rules.append(SkillRule(skill, threshold if threshold is not None else head and head.threshold,
                                   k if k is not None else head and head.k,
                                   limit if limit is not None else head and head.timeout_ticks))
        return rules

    # ------------------------------------------------------------------------------------------- running
    @property
    def active(self) -> str:
        """The skill of the current stage."""
        return self.skills[self.stage]

    def reset(self, info: Mapping[str, Any] | None = None) -> None:
        """Start an episode: the first skill acts from the next tick. ``info``, the env's reset info, may report
        ``stage_success`` (one flag per skill)."""
        self.controller.activate(self.skills[0])
        self.stage, self.tick, self.stage_ticks, self.streak = 0, 0, 0, 0
        self.status, self.unfinished, self.finished_early = RUNNING, None, False
        self.switches: list[dict[str, Any]] = []
        self.off_sequence = 0
        self.has_stages = False
        self.stage_done = np.zeros(len(self.skills), dtype=bool)
        self.success_tick = np.full(len(self.skills), -1, dtype=np.int64)
        flags = None if info is None else info.get("stage_success")
        if flags is not None:
            flags = np.asarray(flags, dtype=bool).reshape(-1)
            if flags.size != len(self.skills):
                raise ValueError(f"the env has {flags.size} stages (info['stage_success']) but the sequence has "
                                 f"{len(self.skills)} skills ({list(self.skills)}); give one skill per stage")
            self.has_stages = True
            self._mark(flags)
        elif self.planner is stage_success_planner and info is not None:
            raise ValueError("the stage-success planner needs an env that reports info['stage_success']; this one "
                             "does not: use switch='learned' or 'schedule', or command switches yourself")

    def select_action(self, obs: Mapping[str, Any]) -> np.ndarray:
        """This tick's action: the active skill's, or the hold action once the sequence finished or timed out."""
        tick = self.tick
        self.tick += 1
        if self.status == FINISHED and self.finish == "continue":
            return self.controller.select_action(obs)
        if self.status != RUNNING:
            return self.controller.hold()
        action = self.controller.select_action(obs)
        self._follow(tick)
        self.stage_ticks += 1
        if self._fired(tick):
            self._advance(tick + 1)
        else:
            limit = self.rules[self.stage].timeout_ticks
            if limit is not None and self.stage_ticks >= limit:
                self.status, self.unfinished = TIMED_OUT, self.active
                logger.warning("skill %r did not finish within %d ticks: holding", self.active, limit)
        return action

    def observe(self, info: Mapping[str, Any], running: bool = True) -> None:
        """After an env step: note stage success (``info["stage_success"]``) and let the planner command."""
        flags = info.get("stage_success") if isinstance(info, Mapping) else None
        if flags is not None and self.has_stages:
            self._mark(np.asarray(flags, dtype=bool).reshape(-1))
        if self.planner is not None and running and self.status == RUNNING:
            target = self.planner(self, info)
            if target is not None:
                self.controller.activate(target)

    def _mark(self, flags: np.ndarray) -> None:
        new = flags & ~self.stage_done
        self.success_tick[new] = self.tick  # the next tick is the first whose observation shows it
        self.stage_done |= flags

    def _fired(self, tick: int) -> bool:
        if self.switch == "schedule":
            return self.stage < len(self.schedule) and tick + 1 >= self.schedule[self.stage]
        if self.switch != "learned":
            return False
        done = self.controller.completion
        rule = self.rules[self.stage]
        if done is None or rule.threshold is None:
            return False
        self.streak = self.streak + 1 if bool(done[0] >= rule.threshold) else 0  # NaN (not computed) breaks it
        return self.streak >= rule.k

    def _advance(self, first_tick: int) -> None:
        if self.stage == len(self.skills) - 1:
            self.status = FINISHED
            self.finished_early = self.has_stages and not bool(self.stage_done[self.stage])
            logger.info("sequence %s finished at tick %d", list(self.skills), first_tick - 1)
            return
        self.controller.activate(self.skills[self.stage + 1])
        self._switched(self.stage + 1, first_tick)

    def _follow(self, tick: int) -> None:
        """A skill activated by someone else (a command) took over at this tick: move the stage along."""
        acting = self.controller.active
        if acting == self.active:
            return
        later = [j for j in range(self.stage + 1, len(self.skills)) if self.skills[j] == acting]
        if not later:
            self.off_sequence += 1
            logger.warning("skill %r acted at tick %d outside the sequence %s (stage %d)", acting, tick,
                           list(self.skills), self.stage)
            return
        self._switched(later[0], tick)

    def _switched(self, stage: int, first_tick: int) -> None:
        old = self.stage
        record: dict[str, Any] = {"from": self.skills[old], "to": self.skills[stage], "tick": first_tick}
        if self.has_stages:
            done = bool(self.stage_done[old])
            lag = int(first_tick - self.success_tick[old]) if done else None
            least = (self.rules[old].k or 0) if self.switch == "learned" else 0
            record.update(premature=not done, lag_ticks=lag, late=done and lag > least)
        self.switches.append(record)
        self.stage, self.stage_ticks, self.streak = stage, 0, 0

    # ------------------------------------------------------------------------------------------- reporting
    def record(self) -> dict[str, Any]:
        """This episode so far: the switches, the skill that timed out (None), whether the sequence finished, and
        with stage information per-stage success, premature and late switches and missed ones."""
        out: dict[str, Any] = {"switch_ticks": [s["tick"] for s in self.switches], "unfinished": self.unfinished,
                               "finished": self.status == FINISHED, "off_sequence": self.off_sequence}
        if self.has_stages:
            left = {self.skills.index(s["from"]) for s in self.switches}
            out.update(stage_success=self.stage_done.tolist(),
                       premature=sum(s["premature"] for s in self.switches),
                       premature_finish=self.finished_early,
                       late=sum(s["late"] for s in self.switches),
                       lag_ticks=[s["lag_ticks"] for s in self.switches if s["lag_ticks"] is not None],
                       missed=int(sum(self.stage_done[i] and i not in left for i in range(len(self.skills) - 1))))
        return out

    def metrics(self, records: Sequence[Mapping[str, Any]], prefix: str = "control") -> dict[str, Any]:
        """Totals over episode records (each holding ``record()``'s fields) and the controller's switch latency."""
        n = len(records)
        out: dict[str, Any] = {
            f"{prefix}/switches": sum(len(r["switch_ticks"]) for r in records),
            f"{prefix}/timeouts": sum(r["unfinished"] is not None for r in records),
            f"{prefix}/finished": sum(bool(r["finished"]) for r in records),
            **timing_metrics(f"{prefix}/switch", list(self.controller.switch_s), "us"),
        }
        for skill in self.skills:
            out[f"{prefix}/timeouts/{skill}"] = sum(r["unfinished"] == skill for r in records)
        if n and all("stage_success" in r for r in records):
            for i, skill in enumerate(self.skills):
                out |= rate_metrics(f"{prefix}/stage{i}/{skill}", sum(r["stage_success"][i] for r in records), n)
            lags = [lag for r in records for lag in r["lag_ticks"]]
            out |= {f"{prefix}/premature_switches": sum(r["premature"] for r in records),
                    f"{prefix}/premature_finishes": sum(bool(r.get("premature_finish")) for r in records),
                    f"{prefix}/late_switches": sum(r["late"] for r in records),
                    f"{prefix}/missed_switches": sum(r["missed"] for r in records),
                    f"{prefix}/switch_lag_ticks_p50": float(np.percentile(lags, 50)) if lags else float("nan"),
                    f"{prefix}/switch_lag_ticks_max": float(max(lags)) if lags else float("nan")}
        return out


def stage_success_planner(sequencer: Sequencer, info: Mapping[str, Any]) -> str | None:
    """A stand-in for an external planner in simulation: the next skill once the env reports the active stage's
    success (the oracle ``robolora rollout --switch success`` uses), else None."""
    stage = sequencer.stage
    if stage + 1 < len(sequencer.skills) and sequencer.stage_done[stage]:
        return sequencer.skills[stage + 1]
    return None
