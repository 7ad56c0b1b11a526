"""stable-baselines3 bridge (docs/design.md §5, last bullet): a robolora skill policy inside SB3, for evaluation
(``SB3SkillPolicy``, seeded VecEnvs, :func:`evaluate_sb3`) and for residual PPO training (``ExecuteSkill``,
``ResidualActorCritic``; the recipe and its design choices are in ``robolora.rl``).

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

Training. One PPO action is one chunk, executed by :class:`ExecuteSkill` through robolora's ``ChunkExecutor`` the
way the skill executes when deployed; :class:`ResidualActorCritic` is an SB3 ``ActorCriticPolicy`` whose Gaussian
mean is the frozen skill's chunk plus a residual head's correction (so the deterministic SB3 action is the skill's
``predict_chunk`` with the head installed) and whose value head is fresh.
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
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecEnvWrapper
from torch import nn

from robolora.episodes import episode_metrics
from robolora.evaluate import make_env
from robolora.policy import policy_device
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


# ------------------------------------------------------------------------------------ residual RL (robolora.rl)
class ExecuteSkill(gym.Wrapper):
    """One RL action = the first ``n`` actions of a chunk (flattened (n * A,)), executed the way the skill executes
    at deployment by robolora's own ``ChunkExecutor``.

    With chunks (``n_action_steps = h``, no ensembling) ``n = h`` and one action runs h env steps open-loop. With
    temporal ensembling ``n = K`` (every chunk element feeds the ensemble) and one action runs one env step: the
    executed action is the ensemble of this chunk and the earlier ones, exactly as ``select_action`` would do.

    Reward per env step: ``success_reward * info["success"]`` plus ``shaped_weight * (phi(s') - phi(s))``, where phi
    is the sum of the env's ``info["reward/<term>"]`` values for ``terms`` (potential-based shaping, Ng et al.,
    1999: over an episode the shaped part adds up to phi(end) - phi(start), so holding a rewarding state pays
    nothing and the optimal policy is that of the success reward). The first step of an episode has no shaping.
    ``info["env_steps"]`` counts the env steps run, ``info["success"]`` whether any of them succeeded.
    """

    def __init__(self, env: gym.Env, execution: Any, chunk_size: int, success_reward: float = 1.0,
                 shaped_weight: float = 0.0, terms: Sequence[str] = ()) -> None:
        super().__init__(env)
        from robolora.policy import ChunkExecutor

        box = env.action_space
        if not isinstance(box, spaces.Box) or len(box.shape) != 1:
            raise ValueError(f"ExecuteSkill needs a flat Box action space, got {box}")
        self.action_dim, self.chunk_size = box.shape[0], chunk_size
        self.executor = ChunkExecutor(execution, chunk_size, self.action_dim)
        self.ensembled = execution.temporal_ensemble is not None
        self.n = chunk_size if self.ensembled else execution.n_action_steps
        self.steps_per_action = 1 if self.ensembled else execution.n_action_steps
        self.success_reward, self.shaped_weight, self.terms = success_reward, shaped_weight, tuple(terms)
        self.action_space = spaces.Box(np.tile(box.low, self.n), np.tile(box.high, self.n), dtype=box.dtype)
        self._phi: float | None = None
        self._probe = {"x": torch.zeros(1)}

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        self.executor.reset()
        self._phi = None
        return self.env.reset(**kwargs)

    def _potential(self, info: Mapping[str, Any]) -> float:
        return float(sum(float(info.get(f"reward/{t}", 0.0)) for t in self.terms))

    def step(self, action: np.ndarray) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        chunk = torch.zeros(1, self.chunk_size, self.action_dim)
        chunk[0, :self.n] = torch.as_tensor(np.asarray(action, dtype=np.float32).reshape(self.n, self.action_dim))
        chunk = chunk.clamp(-1.0, 1.0)
        total, success = 0.0, False
        for k in range(self.steps_per_action):
            a = self.executor.step(self._probe, lambda _: chunk)[0].numpy()
            obs, _, terminated, truncated, info = self.env.step(a)
            step_success = bool(info.get("success", False))
            success |= step_success
            total += self.success_reward * step_success
            if self.shaped_weight and self.terms:
                phi = self._potential(info)
                if self._phi is not None:
                    total += self.shaped_weight * (phi - self._phi)
                self._phi = phi
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, {**info, "success": success, "env_steps": k + 1}


class SkillFeaturesVecEnv(VecEnvWrapper):
    """Observations become the frozen skill's view of them: [features (F), unclamped chunk (K * A)] float32.

    The skill (base + LoRA + token) is frozen during residual RL, so it runs once per decision here, batched over
    the environments and without gradients, and PPO's rollout buffer and updates see only these vectors (PPO's
    epochs would otherwise re-run the transformer on every stored image). ``terminal_observation`` entries are
    converted too (PPO bootstraps truncated episodes from them).
    """

    def __init__(self, venv: VecEnv, policy: nn.Module) -> None:
        spec = policy.spec
        self.policy, self.feature_dim = policy, spec.feature_dim
        self.keys = [k for k in spec.observation if k in venv.observation_space.spaces]
        missing = sorted(set(spec.observation) - set(self.keys))
        if missing:
            raise ValueError(f"the env's observations lack {missing} that the policy reads")
        size = spec.feature_dim + spec.chunk_size * spec.action_dim
        super().__init__(venv, observation_space=spaces.Box(-np.inf, np.inf, (size,), np.float32))
        self.device = policy_device(policy)

    def encode(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        batch = {k: torch.as_tensor(np.asarray(obs[k])).to(self.device) for k in self.keys}
        with torch.no_grad():
            chunk, features = self.policy.raw_chunk_and_features(batch)
        return torch.cat([features, chunk.flatten(1)], dim=1).float().cpu().numpy()

    def reset(self) -> np.ndarray:
        return self.encode(self.venv.reset())

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        obs, rewards, dones, infos = self.venv.step_wait()
        ends = [i for i, info in enumerate(infos) if "terminal_observation" in info]
        if ends:
            terminal = self.encode({k: np.stack([infos[i]["terminal_observation"][k] for i in ends])
                                    for k in self.keys})
            for row, i in enumerate(ends):
                infos[i]["terminal_observation"] = terminal[row]
        return self.encode(obs), rewards, dones, infos


class ResidualActorCritic(ActorCriticPolicy):
    """SB3 actor-critic for residual RL on a frozen skill (observations from :class:`SkillFeaturesVecEnv`):
    Gaussian mean = the skill's unclamped chunk plus the
    residual head's correction (its first ``n`` actions), so the deterministic action, clipped to the action space,
    is the skill's ``predict_chunk`` with the head installed. The value head reads the features.

    The regularisation to the behaviour-cloned skill is the KL from this policy to the BC policy with the same std,
    ``sum(delta^2) / (2 std^2)`` per decision, weighted ``bc_weight``. SB3's PPO has one auxiliary loss term, the
    entropy bonus, so ``evaluate_actions`` returns ``entropy_coef * entropy - bc_weight * KL`` in its place and PPO
    runs with ``ent_coef=1``: the loss gains ``bc_weight * KL - entropy_coef * entropy``.
    """

    def __init__(self, observation_space: spaces.Dict, action_space: spaces.Box, lr_schedule: Callable[[float], float],
                 *, skill_policy: nn.Module, residual: nn.Module, n: int, init_std: float = 0.05,
                 value_hidden: int = 64, critic_lr_scale: float = 1.0, bc_weight: float = 0.0,
                 entropy_coef: float = 0.0, **kwargs: Any) -> None:
        spec = skill_policy.spec
        if action_space.shape != (n * spec.action_dim,):
            raise ValueError(f"action space {action_space.shape} must be (n * action_dim,) = ({n * spec.action_dim},);"
                             " wrap the env in ExecuteSkill")
        self.n, self.value_hidden, self.critic_lr_scale = n, value_hidden, critic_lr_scale
        self.bc_weight, self.entropy_coef = bc_weight, entropy_coef
        self.chunk_shape = (spec.chunk_size, spec.action_dim)
        self.feature_dim = spec.feature_dim
        if observation_space.shape != (spec.feature_dim + spec.chunk_size * spec.action_dim,):
            raise ValueError(f"observation space {observation_space.shape} is not the skill's [features, chunk]; "
                             "wrap the VecEnv in SkillFeaturesVecEnv")
        self._pending = [residual]  # a Module cannot be assigned before nn.Module.__init__ (run by super())
        super().__init__(observation_space, action_space, lr_schedule, log_std_init=math.log(init_std),
                         ortho_init=False, normalize_images=False, optimizer_class=ScaledAdam,
                         optimizer_kwargs={"eps": 1e-5}, **kwargs)

    def _build(self, lr_schedule: Callable[[float], float]) -> None:
        self.residual = self._pending.pop()
        f = self.feature_dim
        self.value_net = nn.Sequential(nn.Linear(f, self.value_hidden), nn.Tanh(),
                                       nn.Linear(self.value_hidden, self.value_hidden), nn.Tanh(),
                                       nn.Linear(self.value_hidden, 1))
        self.log_std = nn.Parameter(torch.full(self.action_space.shape, self.log_std_init))
        self.optimizer = self.optimizer_class(
            [{"params": list(self.residual.parameters()) + [self.log_std], "lr_scale": 1.0},
             {"params": list(self.value_net.parameters()), "lr_scale": self.critic_lr_scale}],
            lr=lr_schedule(1), **self.optimizer_kwargs)

    def actor_parameters(self) -> list[nn.Parameter]:
        """What the policy gradient trains: the residual head and the log-std."""
        return list(self.optimizer.param_groups[0]["params"])

    def _heads(self, obs: dict[str, torch.Tensor]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        x = obs.float()  # (B, F + K*A): SkillFeaturesVecEnv's frozen features and chunk
        f = self.feature_dim
        features, chunk = x[:, :f], x[:, f:].view(-1, *self.chunk_shape)
        delta = self.residual(features, chunk)[:, :self.n].flatten(1)  # (B, n * A)
        mean = chunk[:, :self.n].flatten(1) + delta
        return self.action_dist.proba_distribution(mean, self.log_std), self.value_net(features), delta

    def forward(self, obs: dict[str, torch.Tensor], deterministic: bool = False) -> tuple[torch.Tensor, ...]:
        distribution, values, _ = self._heads(obs)
        actions = distribution.get_actions(deterministic=deterministic)
        return actions, values, distribution.log_prob(actions)

    def evaluate_actions(self, obs: dict[str, torch.Tensor], actions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        distribution, values, delta = self._heads(obs)
        kl = (delta.pow(2) / (2.0 * torch.exp(2.0 * self.log_std.detach()))).sum(1)  # KL(pi || pi_BC), same std
        aux = self.entropy_coef * distribution.entropy() - self.bc_weight * kl
        return values, distribution.log_prob(actions), aux

    def get_distribution(self, obs: dict[str, torch.Tensor]) -> Any:
        return self._heads(obs)[0]

    def predict_values(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._heads(obs)[1]

