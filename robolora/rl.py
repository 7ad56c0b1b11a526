"""RL fine-tuning of a skill adapter with stable-baselines3's PPO, training only LoRA (docs/design.md §5, last bullet).

Starting point: a behaviour-cloned adapter on the frozen base. PPO (Schulman et al., 2017) improves it on the
skill's own environment; the base stays bit-identical and the result is an ordinary adapter folder.

Design choices (why):

- Actions are chunks, as at deployment. robolora executes the first ``n_action_steps`` (h) of each predicted chunk
  before re-querying; in the prototype, re-planning every step (h = 1) dropped dish_rack from ~0.5 to 0.0
  (docs/design.md §9.3): an RL policy acting every step would start from a useless actor and optimise a
  controller nobody deploys. So
  one RL action is the first h actions of the chunk, flattened to (h * 4,), executed open-loop by
  :class:`ExecuteChunk` (macro-actions, as in RL with action chunking, Li et al., 2025, "Reinforcement Learning
  with Action Chunking"). The deterministic RL policy is then exactly what ``robolora eval`` runs.
- Actor: the Gaussian mean is the policy's own linear action head on its action-query tokens (before the [-1, 1]
  clamp, so saturated outputs keep a gradient; SB3 clips executed actions to the action space, so the
  deterministic action equals ``predict_chunk``). Exploration: a learned state-independent log-std per action
  dimension, initialised at ``init_std`` = 0.1 (2 mm per step; the experts' DART noise of ~0.2 is what BC data
  covers, so the actor stays in-distribution).
- Critic: a fresh 2-layer MLP on the mean of the action-query tokens, detached, so value regression never moves
  the LoRA weights (only the policy gradient does). It learns ``critic_lr / actor_lr`` times faster (one Adam
  with per-group scales: SB3 rewrites every group's ``lr`` each update) and alone for the first
  ``critic_warmup_rollouts`` rollouts, so early advantages are not noise.
- Reward: sparse success (1 on the step the task succeeds, which ends the episode) by default. The envs' shaped
  terms are a trap with termination on success: dish_rack pays +0.75 per step for holding the plate in the slot,
  more than releasing it (success) ever earns. ``shaped_weight > 0`` adds them for tasks where that is safe.
  Advantages are not normalised by default: with 0/1 rewards, a rollout without successes would otherwise turn
  value noise into unit-size policy updates.
- Step size: actor_lr 3e-4 with target_kl 0.02. Measured on a tiny reach skill (4k env steps): 5e-5 moved the
  policy by a KL of 2e-5 per update (a silent no-op), 3e-4 by 0.02 (clip fraction 0.09), 1e-3 by 0.09.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv
from torch import nn

from robolora.adapters import adapter_from_policy, attach, attach_for_eval, load_adapter, save_adapter
from robolora.envs import TASKS
from robolora.evaluate import evaluate, make_env
from robolora.inject import count_parameters, mark_only_lora_trainable, set_active_adapter
from robolora.policies import VisuomotorPolicy, base_fingerprint, load_policy
from robolora.recipes import shipped_base
from robolora.sb3 import ExecuteChunk, SkillActorCritic
from robolora.stats import EVAL_SEED
from robolora.train import resolve_device

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


def _field(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RLConfig:
    """PPO fine-tuning of a skill adapter; each field's ``help`` metadata is its CLI help text.

    "Decisions" are RL actions: one chunk of h (``execution_horizon``) env steps.
    """

    n_envs: int = _field(4, "parallel environments")
    subproc: bool = _field(False, "one process per environment (SubprocVecEnv) instead of DummyVecEnv")
    n_steps: int = _field(64, "decisions per environment per PPO rollout")
    batch_size: int = _field(64, "PPO minibatch size (decisions)")
    n_epochs: int = _field(4, "PPO epochs over each rollout")
    actor_lr: float = _field(3e-4, "Adam learning rate of LoRA A/B, the log-std (and the skill token if trained)")
    critic_lr: float = _field(1e-3, "Adam learning rate of the fresh value head")
    critic_warmup_rollouts: int = _field(2, "first rollouts that train only the value head (actor frozen)")
    gamma: float = _field(0.99, "discount per decision")
    gae_lambda: float = _field(0.95, "GAE lambda")
    clip_range: float = _field(0.2, "PPO ratio clip")
    target_kl: float | None = _field(0.02, "stop a PPO update early past 1.5x this KL (None: never)")
    max_grad_norm: float = _field(0.5, "gradient clipping norm")
    normalize_advantage: bool = _field(False, "normalise advantages per minibatch (off: 0/1 rewards are scaled)")
    init_std: float = _field(0.1, "initial exploration std per action dimension (actions live in [-1, 1])")
    value_hidden: int = _field(64, "width of the value head's two hidden layers")
    execution_horizon: int | None = _field(None, "env steps per decision (None: the policy's n_action_steps)")
    success_reward: float = _field(1.0, "reward on each step where info['success'] is true")
    shaped_weight: float = _field(0.0, "weight of the env's shaped reward (0: sparse success only)")
    train_skill_token: bool = _field(False, "also train the adapter's skill token")
    seed: int = _field(0, "PPO seed; training env i is seeded seed + i at its first reset")
    device: str = _field("auto", "auto (CUDA when present), cpu or cuda")

    def __post_init__(self) -> None:
        for name in ("n_envs", "n_steps", "batch_size", "n_epochs", "value_hidden"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"RLConfig.{name}={getattr(self, name)!r}: must be an int >= 1")
        if self.n_steps * self.n_envs < 2:
            raise ValueError(f"RLConfig: n_steps * n_envs = {self.n_steps * self.n_envs}; PPO needs >= 2")
        for name in ("actor_lr", "critic_lr", "init_std", "clip_range", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RLConfig.{name}={getattr(self, name)!r}: must be > 0")
        for name in ("gamma", "gae_lambda"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"RLConfig.{name}={getattr(self, name)!r}: must be in (0, 1]")
        if self.target_kl is not None and not self.target_kl > 0:
            raise ValueError(f"RLConfig.target_kl={self.target_kl!r}: must be > 0 or None (no early stop)")
        if self.critic_warmup_rollouts < 0:
            raise ValueError(f"RLConfig.critic_warmup_rollouts={self.critic_warmup_rollouts!r}: must be >= 0")
        if self.execution_horizon is not None and self.execution_horizon < 1:
            raise ValueError(f"RLConfig.execution_horizon={self.execution_horizon!r}: must be >= 1 or None")
        if self.success_reward < 0 or self.shaped_weight < 0 or self.success_reward + self.shaped_weight == 0:
            raise ValueError(f"RLConfig: success_reward={self.success_reward}, shaped_weight={self.shaped_weight}; "
                             "both must be >= 0 and not both 0 (there would be no reward)")
        resolve_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _make_chunk_env(env_id: str, horizon: int, success_reward: float, shaped_weight: float) -> gym.Env:
    return ExecuteChunk(make_env(env_id, {}), horizon, success_reward, shaped_weight)


def make_rl_env(env_id: str, horizon: int, config: RLConfig) -> VecEnv:
    """``config.n_envs`` chunk-executing copies of ``env_id``; PPO seeds env i with ``config.seed + i``."""
    fn = functools.partial(_make_chunk_env, env_id, horizon, config.success_reward, config.shaped_weight)
    return (SubprocVecEnv if config.subproc else DummyVecEnv)([fn] * config.n_envs)


def build_ppo(policy: VisuomotorPolicy, env: VecEnv, config: RLConfig, horizon: int) -> PPO:
    """PPO over ``env`` (an :class:`ExecuteChunk` VecEnv) with ``policy`` (skill active, LoRA trainable) as actor."""
    return PPO(SkillActorCritic, env, learning_rate=config.actor_lr, n_steps=config.n_steps,
               batch_size=config.batch_size, n_epochs=config.n_epochs, gamma=config.gamma,
               gae_lambda=config.gae_lambda, clip_range=config.clip_range,
               normalize_advantage=config.normalize_advantage,
               ent_coef=0.0, vf_coef=0.5, max_grad_norm=config.max_grad_norm, target_kl=config.target_kl,
               seed=config.seed, device=resolve_device(config.device), verbose=0,
               policy_kwargs={"skill_policy": policy, "horizon": horizon, "init_std": config.init_std,
                              "value_hidden": config.value_hidden,
                              "critic_lr_scale": config.critic_lr / config.actor_lr})


class _Monitor(BaseCallback):
    """Counts env steps and episodes, freezes the actor during critic warm-up, reports after each rollout."""

    def __init__(self, warmup_rollouts: int, progress: Callable[[int, dict[str, float]], None] | None) -> None:
        super().__init__()
        self.warmup_rollouts, self.progress = warmup_rollouts, progress
        self.env_steps = self.episodes = self.successes = self.rollouts = 0
        self.window: list[bool] = []
        self.train_metrics: dict[str, float] = {}

    def _read_train_metrics(self) -> None:
        # PPO records its train/* values after each update; they are dumped (cleared) after the next rollout
        self.train_metrics.update({k: float(v) for k, v in self.model.logger.name_to_value.items()
                                   if k.startswith("train/")})

    def _on_rollout_start(self) -> None:
        self._read_train_metrics()
        frozen = self.rollouts < self.warmup_rollouts
        for p in self.model.policy.actor_parameters():
            p.requires_grad_(not frozen)
        self.window = []

    def _on_step(self) -> bool:
        for info, done in zip(self.locals["infos"], self.locals["dones"]):
            self.env_steps += int(info.get("env_steps", 1))
            if done:
                self.episodes += 1
                self.successes += bool(info.get("success", False))
                self.window.append(bool(info.get("success", False)))
        return True

    def _on_rollout_end(self) -> None:
        self.rollouts += 1
        if self.progress is not None:
            self.progress(self.env_steps, {"rl/rollout_success": float(np.mean(self.window)) if self.window else 0.0,
                                           "rl/episodes": float(self.episodes)})

    def _on_training_end(self) -> None:
        self._read_train_metrics()

    def metrics(self) -> dict[str, float]:
        return {"rl/env_steps": float(self.env_steps), "rl/episodes": float(self.episodes),
                "rl/train_success_rate": self.successes / max(self.episodes, 1), "rl/rollouts": float(self.rollouts),
                "rl/actor_rollouts": float(max(0, self.rollouts - self.warmup_rollouts)),
                **{f"rl/{k.split('/', 1)[1]}": v for k, v in self.train_metrics.items()}}


# ------------------------------------------------------------------------------------------------ the recipe
def _load_skill(base: str | Path, skill: str | Path, device: str) -> tuple[VisuomotorPolicy, Any]:
    policy = load_policy(base, device=device)
    adapter = load_adapter(skill)
    if adapter.skill_token is None:
        raise ValueError(f"adapter {skill} has no skill token; RL fine-tuning needs a skill adapter from "
                         "`robolora train-skill` (base tasks take a task id the skill env does not provide)")
    name = attach(policy, adapter)
    set_active_adapter(policy, name)
    return policy, adapter


def finetune_rl(
    skill: str | Path,
    steps: int,
    out_dir: str | Path,
    *,
    base: str | Path | None = None,
    config: RLConfig = RLConfig(),
    env_id: str | None = None,
    eval_episodes: int = 0,
    eval_seed: int = EVAL_SEED,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune the skill adapter folder ``skill`` with PPO for about ``steps`` env steps; save to ``out_dir/adapter``.

    ``base`` defaults to the shipped base; ``env_id`` to the skill's task. Steps are rounded up to whole PPO
    rollouts (``n_envs * n_steps`` decisions of h env steps each, fewer at episode ends); the env steps actually
    run are returned. Only LoRA A/B (and with ``config.train_skill_token`` the skill token) change; the base is
    checked bit-identical afterwards. ``eval_episodes > 0`` evaluates the adapter before and after (loaded from
    their folders) on the same held-out seeds ``eval_seed ...`` with ``robolora.evaluate``. ``progress(env_steps,
    metrics)`` is called after every rollout. Returns ``out``, ``env_id``, ``execution_horizon``,
    ``trainable_params``, the RL metrics (``rl/env_steps``, ``rl/episodes``, ``rl/train_success_rate``,
    ``rl/wall_s``, PPO's last ``rl/approx_kl``, ``rl/value_loss``, ...) and, when evaluated, ``before`` and
    ``after`` (``robolora.evaluate`` metrics plus ``eval/wall_s``).
    """
    if steps < 0:
        raise ValueError(f"steps={steps}: must be >= 0 env steps")
    base = Path(base) if base is not None else shipped_base()
    device = str(resolve_device(config.device))
    policy, source = _load_skill(base, skill, device)
    env_id = env_id or TASKS.get(source.skill)
    if env_id is None:
        raise ValueError(f"adapter skill {source.skill!r} is not a task ({sorted(TASKS)}); pass env_id")
    horizon = config.execution_horizon or policy.config.n_action_steps
    if horizon != policy.config.n_action_steps or policy.config.temporal_ensemble is not None:
        logger.warning("RL executes %d actions per chunk but evaluation runs n_action_steps=%d%s: the fine-tuned "
                       "behaviour is not the evaluated one", horizon, policy.config.n_action_steps,
                       " with temporal ensembling" if policy.config.temporal_ensemble is not None else "")
    fingerprint = base_fingerprint(policy)
    token = nn.Parameter(source.skill_token.clone().to(device), requires_grad=config.train_skill_token)
    policy.set_skill_token(token)
    mark_only_lora_trainable(policy, extra=[token] if config.train_skill_token else [])
    trainable = count_parameters(policy)["trainable"]
    result: dict[str, Any] = {"env_id": env_id, "execution_horizon": horizon, "trainable_params": trainable}
    if eval_episodes:
        result["before"] = _evaluate_adapter(base, skill, env_id, eval_episodes, eval_seed, device)

    env = make_rl_env(env_id, horizon, config)
    t0 = time.perf_counter()
    try:
        model = build_ppo(policy, env, config, horizon)
        monitor = _Monitor(config.critic_warmup_rollouts, progress)
        decisions = math.ceil(steps / horizon)
        if decisions:
            model.learn(total_timesteps=decisions, callback=monitor)
    finally:
        env.close()
    result.update(monitor.metrics(), **{"rl/wall_s": time.perf_counter() - t0})
    if steps and not result["rl/actor_rollouts"]:
        logger.warning("all %d rollouts were critic warm-up (critic_warmup_rollouts=%d): the actor did not change; "
                       "raise steps", result["rl/rollouts"], config.critic_warmup_rollouts)
    if base_fingerprint(policy) != fingerprint:
        raise RuntimeError("the base weights changed during RL fine-tuning (a bug: only LoRA may train)")
    logger.info("RL fine-tuned %s on %s: %d env steps, %d episodes in %.0f s", source.skill, env_id,
                monitor.env_steps, monitor.episodes, result["rl/wall_s"])

    record = {"config": config.to_dict(), "env_id": env_id, "steps_requested": steps, "source": str(skill),
              "trainable_params": trainable,
              **{k[len("rl/"):]: v for k, v in result.items() if k.startswith("rl/")}}
    metadata = {**{k: v for k, v in source.metadata.items() if k != "eval"}, "rl": record}
    adapter = adapter_from_policy(policy.cpu(), source.skill, metadata=metadata)
    out = save_adapter(adapter, Path(out_dir) / ADAPTER_DIR)
    result["out"] = str(out)
    if eval_episodes:
        result["after"] = _evaluate_adapter(base, out, env_id, eval_episodes, eval_seed, device)
        adapter.metadata["eval"] = {k: v for k, v in result["after"].items() if k != "episodes"}
        save_adapter(adapter, out)
    return result


def _evaluate_adapter(base: Path, skill: str | Path, env_id: str, episodes: int, seed: int,
                      device: str) -> dict[str, Any]:
    # one env: results do not depend on num_envs, and spawning workers costs more than 2 cores give back
    policy = load_policy(base, device=device)
    attach_for_eval(policy, skill)
    t0 = time.perf_counter()
    metrics = evaluate(policy, env_id, episodes, seed=seed)
    return {**metrics, "eval/wall_s": time.perf_counter() - t0}
