"""stable-baselines3 bridge (docs/design.md §5, last bullet): a robolora skill policy inside SB3, for evaluation
(``SB3SkillPolicy``, seeded VecEnvs, :func:`evaluate_sb3`) and for PPO training (``ExecuteChunk``,
``SkillActorCritic``; the recipe and its design choices are in ``robolora.rl``).

``SB3SkillPolicy`` wraps anything robolora can roll out (a ``VisuomotorPolicy`` with a skill attached, a
``SkillManager``): ``predict(obs, state, episode_start, deterministic)`` takes a batched observation dict from any
SB3 VecEnv (``DummyVecEnv``, ``SubprocVecEnv``, ``VecTransposeImage``'d channels-first images included) and resets
the action-chunk queue of exactly the environments whose ``episode_start`` is set, so chunked execution stays
per-environment when episodes end at different times.

Seeding. ``VecEnv.seed(s)`` seeds env i with ``s + i`` at its first reset only; episodes after an autoreset
continue that env's random stream, so a 10-episode ``evaluate_policy`` on 2 envs would not see scenes
``s .. s + 9``. Instead each env of :func:`make_seeded_vec_env` is wrapped in :class:`EpisodeSeeds`, which resets
with the next seed of its own fixed list. The lists follow ``evaluate_policy``'s static split of episodes over
envs (env i runs ``(n + i) // n_envs`` of them), so the episodes it counts are exactly seeds ``seed .. seed + n - 1``,
the same scenes :func:`robolora.evaluate.evaluate` runs. :func:`evaluate_sb3` runs ``evaluate_policy`` on such an
env and returns robolora's metrics, success counted from ``info["success"]`` in its callback.

Training. One PPO action is the first h actions of a chunk, executed open-loop by :class:`ExecuteChunk`;
:class:`SkillActorCritic` is an SB3 ``ActorCriticPolicy`` whose Gaussian mean is the robolora policy's own action
head (so the deterministic SB3 action equals ``predict_chunk`` bit for bit) and whose value head is fresh.
"""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv
from torch import nn

from robolora.episodes import episode_metrics
from robolora.evaluate import make_env
from robolora.policies import VisuomotorPolicy
from robolora.stats import EVAL_SEED

logger = logging.getLogger(__name__)

IMAGE_PREFIX = "rgb_"


# ------------------------------------------------------------------------------------------------ evaluation
class SB3SkillPolicy:
    """A robolora policy (base + active skill) behind SB3's ``predict`` interface.

    ``policy`` needs ``reset(indices=None)`` and ``select_action(batched_obs)`` (``VisuomotorPolicy``,
    ``SkillManager``). It is deterministic: ``predict``'s ``deterministic`` flag is accepted and ignored.
    ``task_id`` is fed to every observation for base tasks (None for a skill adapter, whose skill token replaces it).
    """

    def __init__(self, policy: Any, task_id: int | None = None) -> None:
        for method in ("reset", "select_action"):
            if not callable(getattr(policy, method, None)):
                raise TypeError(f"SB3SkillPolicy wraps a robolora policy with reset() and select_action(); "
                                f"{type(policy).__name__} has no {method}()")
        self.policy = policy
        self.task_id = task_id

    @classmethod
    def from_files(cls, base: str | Path, skill: str | Path | None = None, device: str = "cpu",
                   task_id: int | None = None) -> SB3SkillPolicy:
        """Load a base checkpoint and (optionally) attach and activate a skill adapter folder."""
        from robolora.adapters import attach_for_eval
        from robolora.policies import load_policy

        policy = load_policy(base, device=device)
        if skill is not None:
            attach_for_eval(policy, skill)
        return cls(policy, task_id=task_id)

    def reset(self) -> None:
        """Forget every queued action (a new set of environments follows)."""
        self.policy.reset()

    def predict(
        self,
        observation: Mapping[str, np.ndarray],
        state: tuple[np.ndarray, ...] | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = True,
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """Actions (n_envs, A) for a batched observation dict, or (A,) for one unbatched observation.

        ``episode_start`` (n_envs,) bool marks environments whose episode just began: their chunk queue is
        cleared so they re-query the model. ``state`` is returned unchanged (the policy keeps no recurrent state).
        """
        if not isinstance(observation, Mapping) or "proprio" not in observation:
            raise TypeError(f"SB3SkillPolicy.predict expects the env's Dict observation with 'proprio' and "
                            f"'{IMAGE_PREFIX}<camera>' keys, got {type(observation).__name__}")
        obs = {key: _channels_last(np.asarray(value)) if key.startswith(IMAGE_PREFIX) else np.asarray(value)
               for key, value in observation.items()}
        batched = obs["proprio"].ndim == 2
        n = obs["proprio"].shape[0] if batched else 1
        if episode_start is not None:
            starts = np.asarray(episode_start, dtype=bool).reshape(-1)
            if starts.shape != (n,):
                raise ValueError(f"episode_start has {starts.size} entries for {n} environments")
            if starts.all():
                self.policy.reset()
            elif starts.any():
                self.policy.reset(np.flatnonzero(starts).tolist())
        if self.task_id is not None:
            obs["task_id"] = np.full(n, self.task_id, dtype=np.int64) if batched else np.int64(self.task_id)
        action = np.asarray(self.policy.select_action(obs), dtype=np.float32)
        return action, state


def _channels_last(image: np.ndarray) -> np.ndarray:
    # SB3 algorithms wrap image envs in VecTransposeImage (channels first); robolora policies read (..., H, W, 3).
    if image.shape[-1] != 3 and image.ndim >= 3 and image.shape[-3] == 3:
        return np.moveaxis(image, -3, -1)
    return image


class EpisodeSeeds(gym.Wrapper):
    """Reset with the next seed of a fixed list whenever ``reset`` gets no seed; ``info["episode_seed"]`` on
    every step and reset says which scene is running (None once the list is used up: unseeded episodes follow)."""

    def __init__(self, env: gym.Env, seeds: Sequence[int]) -> None:
        super().__init__(env)
        self.seeds = [int(s) for s in seeds]
        self._next = 0
        self.episode_seed: int | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        if seed is None and self._next < len(self.seeds):
            seed = self.seeds[self._next]
            self._next += 1
        self.episode_seed = seed
        obs, info = self.env.reset(seed=seed, options=options)
        return obs, {**info, "episode_seed": seed}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, {**info, "episode_seed": self.episode_seed}


def split_seeds(seeds: Sequence[int], n_envs: int) -> list[list[int]]:
    """Consecutive blocks of ``seeds``, env i getting ``(len(seeds) + i) // n_envs`` of them: the number of
    episodes ``evaluate_policy`` counts on env i, so every seed is counted exactly once."""
    if n_envs < 1:
        raise ValueError(f"n_envs={n_envs}: must be >= 1")
    blocks, start = [], 0
    for i in range(n_envs):
        count = (len(seeds) + i) // n_envs
        blocks.append(list(seeds[start:start + count]))
        start += count
    return blocks


def _make_seeded_env(env_id: str, seeds: list[int], env_kwargs: dict[str, Any]) -> gym.Env:
    return EpisodeSeeds(make_env(env_id, env_kwargs), seeds)


def make_seeded_vec_env(
    env_id: str,
    seeds: Sequence[int],
    n_envs: int = 1,
    vec_env_cls: type[DummyVecEnv] | type[SubprocVecEnv] = DummyVecEnv,
    env_kwargs: dict[str, Any] | None = None,
    vec_env_kwargs: dict[str, Any] | None = None,
) -> VecEnv:
    """An SB3 VecEnv of ``n_envs`` copies of ``env_id`` whose episodes, run by ``evaluate_policy`` for
    ``len(seeds)`` episodes, are exactly the scenes of ``seeds`` (see the module docstring)."""
    if n_envs > len(seeds):
        raise ValueError(f"n_envs={n_envs} exceeds the {len(seeds)} episodes to run; use n_envs <= episodes")
    fns = [functools.partial(_make_seeded_env, env_id, block, dict(env_kwargs or {}))
           for block in split_seeds(seeds, n_envs)]
    return vec_env_cls(fns, **(vec_env_kwargs or {}))


def evaluate_sb3(
    model: Any,
    env_id: str,
    episodes: int = 50,
    *,
    seed: int = EVAL_SEED,
    n_envs: int = 1,
    vec_env_cls: type[DummyVecEnv] | type[SubprocVecEnv] = DummyVecEnv,
    env_kwargs: dict[str, Any] | None = None,
    deterministic: bool = True,
) -> dict[str, Any]:
    """Evaluate any SB3 predictor (``SB3SkillPolicy``, a PPO model...) with SB3's ``evaluate_policy`` on episodes
    seeded ``seed .. seed + episodes - 1``, the scenes of :func:`robolora.evaluate.evaluate`.

    Returns ``eval/success_rate`` with its 95% Wilson interval (``eval/ci_low``, ``eval/ci_high``),
    ``eval/mean_length``, ``eval/mean_return``, ``eval/episodes`` and the per-episode ``episodes`` list
    (``seed``, ``success``, ``length``, ``return``) sorted by seed.
    """
    if episodes < 1:
        raise ValueError(f"episodes={episodes}: must be >= 1")
    seeds = list(range(seed, seed + episodes))
    env = make_seeded_vec_env(env_id, seeds, n_envs, vec_env_cls, env_kwargs)
    success = np.zeros(env.num_envs, dtype=bool)
    results: list[dict[str, Any]] = []

    def on_step(local: dict[str, Any], _: dict[str, Any]) -> None:
        i, info = local["i"], local["info"]
        success[i] |= bool(info.get("success", False))
        if local["done"]:
            results.append({"seed": info["episode_seed"], "success": bool(success[i]),
                            "length": int(local["current_lengths"][i]), "return": float(local["current_rewards"][i])})
            success[i] = False

    try:
        evaluate_policy(model, env, n_eval_episodes=episodes, deterministic=deterministic, callback=on_step,
                        warn=False)
    finally:
        env.close()
    results.sort(key=lambda r: r["seed"])
    assert [r["seed"] for r in results] == seeds, "evaluate_policy counted other episodes than the seeded ones"
    metrics = episode_metrics("eval", results)
    logger.info("%s (SB3, %d envs): success %.2f over %d episodes", env_id, env.num_envs,
                metrics["eval/success_rate"], episodes)
    return {**metrics, "eval/mean_return": float(np.mean([r["return"] for r in results])), "episodes": results}


# ------------------------------------------------------------------------------------------------ training
class ExecuteChunk(gym.Wrapper):
    """One action = ``horizon`` env actions, flattened (horizon * A,), executed open-loop until the episode ends.

    Reward: the sum over executed steps of ``success_reward * info["success"] + shaped_weight * env reward``.
    ``info["success"]`` is whether any executed step succeeded; ``info["env_steps"]`` how many steps ran.
    """

    def __init__(self, env: gym.Env, horizon: int, success_reward: float = 1.0, shaped_weight: float = 0.0) -> None:
        super().__init__(env)
        box = env.action_space
        if not isinstance(box, spaces.Box) or len(box.shape) != 1:
            raise ValueError(f"ExecuteChunk needs a flat Box action space, got {box}")
        if horizon < 1:
            raise ValueError(f"ExecuteChunk horizon={horizon}: must be >= 1 env step per action")
        self.horizon = horizon
        self.success_reward, self.shaped_weight = success_reward, shaped_weight
        self.action_space = spaces.Box(np.tile(box.low, horizon), np.tile(box.high, horizon), dtype=box.dtype)

    def step(self, action: np.ndarray) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        actions = np.asarray(action, dtype=np.float32).reshape(self.horizon, -1)  # (h, A)
        total, success = 0.0, False
        for k, a in enumerate(actions):
            obs, reward, terminated, truncated, info = self.env.step(a)
            step_success = bool(info.get("success", False))
            success |= step_success
            total += self.success_reward * step_success + self.shaped_weight * float(reward)
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, {**info, "success": success, "env_steps": k + 1}


class SkillFeatures(BaseFeaturesExtractor):
    """The robolora policy as SB3's features extractor: observation dict -> final action-query tokens (B, K, D)."""

    def __init__(self, observation_space: spaces.Dict, policy: VisuomotorPolicy) -> None:
        cfg = policy.config
        super().__init__(observation_space, features_dim=cfg.chunk_size * cfg.d_model)
        self.policy = policy
        # SB3 algorithms transpose image spaces to channels first (VecTransposeImage); the policy reads (H, W, 3).
        # Made contiguous so the stem sees the same memory layout as from env images (bit-equal convolutions).
        self.channels_first = {key: observation_space[key].shape[0] == 3 for key in cfg.image_keys}

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {key: obs[key].permute(0, 2, 3, 1).contiguous() if first else obs[key]
                 for key, first in self.channels_first.items()}
        batch["proprio"] = obs["proprio"]
        return self.policy._action_tokens(batch)  # (B, K, D); skill token set, so no task_id


class SkillActorCritic(ActorCriticPolicy):
    """SB3 actor-critic whose actor is a robolora policy: Gaussian mean = its first ``horizon`` chunk actions."""

    def __init__(self, observation_space: spaces.Dict, action_space: spaces.Box, lr_schedule: Callable[[float], float],
                 *, skill_policy: VisuomotorPolicy, horizon: int, init_std: float = 0.1, value_hidden: int = 64,
                 critic_lr_scale: float = 1.0, **kwargs: Any) -> None:
        expected = (horizon * skill_policy.config.action_dim,)
        if action_space.shape != expected:
            raise ValueError(f"action space {action_space.shape} must be (horizon * action_dim,) = {expected}; "
                             "wrap the env in ExecuteChunk(env, horizon)")
        if skill_policy.skill_token is None:
            raise ValueError("the policy has no skill token: attach and activate a skill adapter first")
        self.horizon, self.value_hidden, self.critic_lr_scale = horizon, value_hidden, critic_lr_scale
        super().__init__(observation_space, action_space, lr_schedule, log_std_init=math.log(init_std),
                         ortho_init=False, features_extractor_class=SkillFeatures,
                         features_extractor_kwargs={"policy": skill_policy}, normalize_images=False,
                         optimizer_class=ScaledAdam, optimizer_kwargs={"eps": 1e-5}, **kwargs)

    @property
    def skill_policy(self) -> VisuomotorPolicy:
        return self.features_extractor.policy

    def _build(self, lr_schedule: Callable[[float], float]) -> None:
        d = self.skill_policy.config.d_model
        self.value_net = nn.Sequential(nn.Linear(d, self.value_hidden), nn.Tanh(),
                                       nn.Linear(self.value_hidden, self.value_hidden), nn.Tanh(),
                                       nn.Linear(self.value_hidden, 1))
        self.log_std = nn.Parameter(torch.full(self.action_space.shape, self.log_std_init))
        actor = [p for p in self.skill_policy.parameters() if p.requires_grad] + [self.log_std]
        self.optimizer = self.optimizer_class(
            [{"params": actor, "lr_scale": 1.0},
             {"params": list(self.value_net.parameters()), "lr_scale": self.critic_lr_scale}],
            lr=lr_schedule(1), **self.optimizer_kwargs)

    def actor_parameters(self) -> list[nn.Parameter]:
        """What the policy gradient trains: the first optimizer group (LoRA A/B, log-std, optional skill token)."""
        return list(self.optimizer.param_groups[0]["params"])

    def _heads(self, obs: dict[str, torch.Tensor]) -> tuple[Any, torch.Tensor]:
        tokens = self.extract_features(obs)  # (B, K, D)
        # the head on all K tokens, then sliced: same matmul shapes as predict_chunk, so bit-equal actions
        mean = self.skill_policy.action_head(tokens)[:, :self.horizon].flatten(1)  # (B, h * A)
        values = self.value_net(tokens.detach().mean(1))  # (B, 1)
        return self.action_dist.proba_distribution(mean, self.log_std), values

    def forward(self, obs: dict[str, torch.Tensor], deterministic: bool = False) -> tuple[torch.Tensor, ...]:
        distribution, values = self._heads(obs)
        actions = distribution.get_actions(deterministic=deterministic)
        return actions, values, distribution.log_prob(actions)

    def evaluate_actions(self, obs: dict[str, torch.Tensor], actions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        distribution, values = self._heads(obs)
        return values, distribution.log_prob(actions), distribution.entropy()

    def get_distribution(self, obs: dict[str, torch.Tensor]) -> Any:
        return self._heads(obs)[0]

    def predict_values(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._heads(obs)[1]

    def set_training_mode(self, mode: bool) -> None:
        super().set_training_mode(mode)
        self.skill_policy.eval()  # no dropout in RL: rollouts and PPO's ratio must see the same network


class ScaledAdam(torch.optim.Adam):
    """Adam with a per-group ``lr_scale``. SB3 overwrites every group's ``lr`` with its schedule before each update,
    so a separate critic learning rate has to be a multiplier applied at step time."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        base = [group["lr"] for group in self.param_groups]
        for group in self.param_groups:
            group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
        try:
            return super().step(closure)
        finally:
            for group, lr in zip(self.param_groups, base):
                group["lr"] = lr
