"""RL fine-tuning of a skill in simulation: PPO (stable-baselines3) on the skill's residual action head (docs/rl.md).

Starting point: a behaviour-cloned skill adapter on the frozen base. RL trains only a small residual head that is
part of the skill (``robolora.residual``: zero at start, so RL starts exactly at the BC skill), plus a value head
and an exploration std that are dropped afterwards. The base and the adapter's LoRA weights stay bit-identical;
the result is an ordinary adapter folder whose ``residual.safetensors`` attaches, switches and exports like the rest.

Why a residual and not PPO on the LoRA weights: PPO on the LoRA weights with a sparse success reward drifted away
from the BC solution (0.30 -> 0.08 on an older base). A residual on a frozen chunked BC policy (ResiP, Ankile et
al., 2024; Policy Decorator, Yuan et al., 2024) keeps the BC behaviour as the mean until the gradient says
otherwise. The stabilisers, each a config field:

- regularisation to the BC policy: ``bc_weight`` x KL(pi || pi_BC) per decision (same std, so sum(delta^2)/2std^2);
- critic warm-up: the first ``critic_warmup_rollouts`` rollouts train only the value head;
- dense reward: potential-based shaping with the env's own ``reward/*`` terms (``shaped_weight``; holding a
  rewarding state earns nothing, ``robolora.sb3.ExecuteSkill``), plus ``success_reward`` on success;
- chunk-aware actions: one decision is one chunk, executed by robolora's ``ChunkExecutor`` exactly as the skill
  executes when deployed (its chunks of h, or temporal ensembling with a query every step);
- validation rollouts every ``val_every`` env steps on validation seeds (30,000,000+), keeping the best head (the
  BC skill at step 0 included, so the result is never worse than BC on validation);
- a checkpoint after each validation (safetensors + JSON, written atomically) and ``resume=True`` after a kill;
- ``n_envs`` vector envs (DummyVecEnv, or SubprocVecEnv with ``subproc``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import stable_baselines3
import torch
from safetensors.torch import load_file, save_file
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv

from robolora.adapters import attach_active, check_skill_budget, load_adapter, save_adapter
from robolora.atomic import atomic_dir, write_json
from robolora.config import check_ints
from robolora.envs import TASKS
from robolora.evaluate import evaluate, make_env
from robolora.policies import base_fingerprint, load_policy
from robolora.policy import Execution
from robolora.recipes import shipped_base
from robolora.residual import ResidualHead
from robolora.sb3 import ExecuteSkill, ResidualActorCritic, SkillFeaturesVecEnv
from robolora.stats import EVAL_SEED, VALIDATION_SEED
from robolora.train import resolve_device

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoint"


def _field(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RLConfig:
    """Residual PPO fine-tuning of a skill; each field's ``help`` metadata is its CLI help text.

    A "decision" is one RL action: one chunk, running h env steps (chunked skills) or one (temporal ensembling).
    """

    n_envs: int = _field(8, "parallel environments")
    subproc: bool = _field(False, "one process per environment (SubprocVecEnv) instead of DummyVecEnv")
    n_steps: int = _field(64, "decisions per environment per PPO rollout")
    batch_size: int = _field(128, "PPO minibatch size (decisions)")
    n_epochs: int = _field(5, "PPO epochs over each rollout")
    actor_lr: float = _field(3e-4, "Adam learning rate of the residual head and the log-std")
    critic_lr: float = _field(1e-3, "Adam learning rate of the value head")
    critic_warmup_rollouts: int = _field(3, "first rollouts that train only the value head (actor frozen)")
    gamma: float = _field(0.99, "discount per decision")
    gae_lambda: float = _field(0.95, "GAE lambda")
    clip_range: float = _field(0.2, "PPO ratio clip")
    target_kl: float | None = _field(0.03, "stop a PPO update early past 1.5x this KL (None: never)")
    max_grad_norm: float = _field(0.5, "gradient clipping norm")
    normalize_advantage: bool = _field(True, "normalise advantages per minibatch")
    init_std: float = _field(0.05, "initial exploration std per action dimension (actions live in [-1, 1])")
    bc_weight: float = _field(0.05, "weight of KL(pi || pi_BC), the regularisation to the behaviour-cloned skill")
    residual_hidden: int = _field(8, "width of the residual head's hidden layer (it counts against the 2% budget)")
    value_hidden: int = _field(64, "width of the value head's two hidden layers")
    success_reward: float = _field(1.0, "reward on each step where info['success'] is true")
    shaped_weight: float = _field(1.0, "weight of the potential-based shaping from the env's reward/* terms (0: off)")
    val_every: int = _field(20_000, "env steps between validation rollouts (and checkpoints)")
    val_episodes: int = _field(20, "validation episodes (seeds 30,000,000 ...) per validation")
    seed: int = _field(0, "PPO seed; training env i is seeded seed + i at its first reset")
    device: str = _field("auto", "auto (CUDA when present), cpu or cuda")

    def __post_init__(self) -> None:
        check_ints("RLConfig", self, ((name, 1) for name in ("n_envs", "n_steps", "batch_size", "n_epochs",
                                                             "value_hidden", "residual_hidden", "val_every",
                                                             "val_episodes")))
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
        for name in ("critic_warmup_rollouts", "bc_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"RLConfig.{name}={getattr(self, name)!r}: must be >= 0")
        if self.success_reward < 0 or self.shaped_weight < 0 or self.success_reward + self.shaped_weight == 0:
            raise ValueError(f"RLConfig: success_reward={self.success_reward}, shaped_weight={self.shaped_weight}; "
                             "both must be >= 0 and not both 0 (there would be no reward)")
        resolve_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shaping_terms(env_id: str) -> list[str]:
    """The env's ``reward/*`` terms used as the shaping potential: all but ``success`` (rewarded on its own)."""
    env = make_env(env_id, {})
    try:
        env.reset(seed=0)
        _, _, _, _, info = env.step(np.zeros(env.action_space.shape, dtype=np.float32))
    finally:
        env.close()
    return sorted(k.split("/", 1)[1] for k in info if k.startswith("reward/") and k != "reward/success")


def _make_skill_env(env_id: str, execution: Execution, chunk_size: int, config: RLConfig,
                    terms: list[str]) -> gym.Env:
    return ExecuteSkill(make_env(env_id, {}), execution, chunk_size, config.success_reward, config.shaped_weight,
                        terms)


def make_rl_env(env_id: str, policy: torch.nn.Module, config: RLConfig, terms: list[str]) -> VecEnv:
    """``config.n_envs`` :class:`ExecuteSkill` copies of ``env_id`` executing like ``policy``'s active skill, seen
    through the frozen skill (:class:`SkillFeaturesVecEnv`); PPO seeds env i with ``config.seed + i``."""
    spec = policy.spec
    fns = [functools.partial(_make_skill_env, env_id, spec.execution, spec.chunk_size, config, terms)] * config.n_envs
    return SkillFeaturesVecEnv((SubprocVecEnv if config.subproc else DummyVecEnv)(fns), policy)


def build_ppo(policy: torch.nn.Module, residual: ResidualHead, env: VecEnv, config: RLConfig) -> PPO:
    """PPO over ``env`` (an :class:`ExecuteSkill` VecEnv) whose actor is ``policy``'s chunk plus ``residual``."""
    n = env.action_space.shape[0] // policy.spec.action_dim
    return PPO(ResidualActorCritic, env, learning_rate=config.actor_lr, n_steps=config.n_steps,
               batch_size=config.batch_size, n_epochs=config.n_epochs, gamma=config.gamma,
               gae_lambda=config.gae_lambda, clip_range=config.clip_range,
               normalize_advantage=config.normalize_advantage, ent_coef=1.0, vf_coef=0.5,
               max_grad_norm=config.max_grad_norm, target_kl=config.target_kl, seed=config.seed,
               device=resolve_device(config.device), verbose=0,
               policy_kwargs={"skill_policy": policy, "residual": residual, "n": n, "init_std": config.init_std,
                              "value_hidden": config.value_hidden, "bc_weight": config.bc_weight,
                              "critic_lr_scale": config.critic_lr / config.actor_lr})


# ------------------------------------------------------------------------------------------------ checkpoints
def _flat_state(model: PPO, best: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    policy = model.policy
    tensors = {f"residual.{k}": v for k, v in policy.residual.state_dict().items()}
    tensors.update({f"value.{k}": v for k, v in policy.value_net.state_dict().items()})
    tensors["log_std"] = policy.log_std.detach()
    for index, state in policy.optimizer.state_dict()["state"].items():
        tensors.update({f"opt.{index}.{k}": torch.as_tensor(v) for k, v in state.items()})
    tensors.update({f"best.{k}": v for k, v in best.items()})
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def _load_state(model: PPO, tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    policy = model.policy
    take = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    policy.residual.load_state_dict(take("residual."))
    policy.value_net.load_state_dict(take("value."))
    with torch.no_grad():
        policy.log_std.copy_(tensors["log_std"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in take("opt.").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    policy.optimizer.load_state_dict({"state": state, "param_groups": groups})
    return take("best.")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Trainer(BaseCallback):
    """Counts env steps and episodes, freezes the actor during critic warm-up, validates, keeps the best head,
    checkpoints, reports progress, and stops once ``steps`` env steps have run."""

    def __init__(self, steps: int, config: RLConfig, validate: Callable[[], float], save: Callable[[], None],
                 progress: Callable[[int, dict[str, float]], None] | None, state: dict[str, Any]) -> None:
        super().__init__()
        self.steps, self.config, self.validate, self.save, self.progress = steps, config, validate, save, progress
        self.state = state  # env_steps, episodes, successes, rollouts, curve, best_success, best_step, ...
        self.window: list[bool] = []

    def _on_rollout_start(self) -> None:
        frozen = self.state["rollouts"] < self.config.critic_warmup_rollouts
        for p in self.model.policy.actor_parameters():
            p.requires_grad_(not frozen)
        self.window = []

    def _on_step(self) -> bool:
        for info, done in zip(self.locals["infos"], self.locals["dones"]):
            self.state["env_steps"] += int(info.get("env_steps", 1))
            if done:
                self.state["episodes"] += 1
                self.window.append(bool(info.get("success", False)))
        return self.state["env_steps"] < self.steps

    def _on_rollout_end(self) -> None:
        self.state["rollouts"] += 1
        self.state["last_rollout_success"] = float(np.mean(self.window)) if self.window else None
        for k, v in self.model.logger.name_to_value.items():
            if k.startswith("train/"):
                self.state.setdefault("train", {})[k.split("/", 1)[1]] = float(v)
        if self.state["env_steps"] - self.state["last_val_step"] >= self.config.val_every:
            self.validate()
            self.save()
        if self.progress is not None:
            metrics = {"val": self.state["curve"][-1][1], "best": self.state["best_success"]}
            if self.state["last_rollout_success"] is not None:
                metrics["train"] = self.state["last_rollout_success"]
            self.progress(min(self.state["env_steps"], self.steps), metrics)


# ------------------------------------------------------------------------------------------------ the recipe
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
    resume: bool = False,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune the skill adapter folder ``skill`` with residual PPO for ``steps`` env steps; the adapter with the
    best validation head goes to ``out_dir/adapter``.

    ``base`` defaults to the shipped base, ``env_id`` to the skill's task. ``resume=True`` continues from
    ``out_dir/checkpoint`` (written after every validation); a finished run then only writes the adapter.
    ``eval_episodes > 0`` evaluates the result on held-out seeds ``eval_seed ...`` (``robolora.evaluate``).
    ``progress(env_steps, metrics)`` is called after every rollout. Returns ``out``, ``env_id``, the RL record
    (also saved as adapter.json's ``"rl"``) and, when evaluated, ``eval``.
    """
    if steps < 0:
        raise ValueError(f"steps={steps}: must be >= 0 env steps")
    out_dir = Path(out_dir)
    ckpt = out_dir / CHECKPOINT_DIR
    if resume and not (ckpt / "state.json").is_file():
        raise FileNotFoundError(f"--resume: {ckpt}/state.json does not exist; start without --resume")
    if not resume and ckpt.exists():
        raise FileExistsError(f"{ckpt} holds an earlier run; pass --resume to continue it or choose another --out")
    base = Path(base) if base is not None else shipped_base()
    skill = Path(skill)
    device = str(resolve_device(config.device))
    source = load_adapter(skill)
    policy = load_policy(base, device=device)
    base_params = sum(p.numel() for p in policy.parameters())  # as train-skill counts the base
    attach_active(policy, source)
    policy.eval().requires_grad_(False)
    for hook in ("raw_chunk_and_features", "set_action_residual"):
        if not callable(getattr(policy, hook, None)):
            raise TypeError(f"{type(policy).__name__} has no {hook}(); residual RL needs the policy hooks of "
                            "docs/policy.md (the shipped policies have them)")
    env_id = env_id or TASKS.get(source.skill)
    if env_id is None:
        raise ValueError(f"adapter skill {source.skill!r} is not a task ({sorted(TASKS)}); pass env_id")
    spec = policy.spec
    execution = spec.execution
    fingerprint = base_fingerprint(policy)
    torch.manual_seed(config.seed)
    residual = ResidualHead(spec.feature_dim, spec.chunk_size, spec.action_dim, config.residual_hidden).to(device)
    if source.residual is not None:  # continue from the adapter's own head: RL starts at the source's behaviour
        if source.residual.hidden != config.residual_hidden:
            raise ValueError(f"adapter {skill} already has a residual head of width {source.residual.hidden}; "
                             f"pass --residual-hidden {source.residual.hidden} to continue training it")
        residual.load_state_dict(source.residual.state_dict())
    policy.set_action_residual(None)  # the head being trained is applied by the RL actor, not by predict_chunk
    try:
        counts = check_skill_budget(dataclasses.replace(source, residual=residual), base_params)
    except ValueError as e:
        raise ValueError(f"{e}; lower --residual-hidden") from None
    percent = counts["percent_of_base"]
    terms = shaping_terms(env_id) if config.shaped_weight > 0 else []
    source_sha = _sha256(skill / "adapter.safetensors")

    run = {"source_sha256": source_sha, "base_fingerprint": fingerprint, "env_id": env_id,
           "config": _jsonable(config.to_dict())}
    saved = _read_json(ckpt / "state.json") if resume else None
    if saved is not None:
        differ = [k for k in run if saved.get(k) != run[k]]
        if differ:
            raise ValueError(f"{ckpt} was written by another run: its {', '.join(differ)} differ (see its "
                             "state.json); resume with the same --skill, --base, --env and flags, or start a new --out")

    env = make_rl_env(env_id, policy, config, terms)
    state: dict[str, Any] = {"env_steps": 0, "episodes": 0, "rollouts": 0, "curve": [], "best_success": -1.0,
                             "best_step": 0, "last_val_step": 0, "wall_s": 0.0, "num_timesteps": 0}
    best: dict[str, torch.Tensor] = {}
    try:
        model = build_ppo(policy, residual, env, config)
        if saved is not None:
            state.update(saved["state"])
            best = _load_state(model, load_file(str(ckpt / "state.safetensors"), device=device),
                               saved["param_groups"])
            model.num_timesteps = state["num_timesteps"]
            logger.info("resumed %s at %d env steps (best validation %.2f at %d)", ckpt, state["env_steps"],
                        state["best_success"], state["best_step"])
    except BaseException:
        env.close()
        raise

    def validate() -> float:
        residual.eval()
        policy.set_action_residual(residual)
        try:
            with torch.no_grad():
                m = evaluate(policy, env_id, config.val_episodes, seed=VALIDATION_SEED)
        finally:
            policy.set_action_residual(None)
        rate = float(m["eval/success_rate"])
        state["curve"].append([state["env_steps"], rate])
        state["last_val_step"] = state["env_steps"]
        if rate > state["best_success"]:
            state["best_success"], state["best_step"] = rate, state["env_steps"]
            best.clear()
            best.update({k: v.detach().clone() for k, v in residual.state_dict().items()})
        logger.info("%s: validation success %.2f at %d env steps (best %.2f at %d)", env_id, rate,
                    state["env_steps"], state["best_success"], state["best_step"])
        return rate

    t0 = time.perf_counter() - state["wall_s"]

    def save() -> None:
        state["wall_s"] = time.perf_counter() - t0
        state["num_timesteps"] = model.num_timesteps
        groups = model.policy.optimizer.state_dict()["param_groups"]  # hyper-parameters; "params" are indices
        with atomic_dir(ckpt) as tmp:
            save_file(_flat_state(model, best), str(tmp / "state.safetensors"))
            write_json(tmp / "state.json", {**run, "state": state, "param_groups": _jsonable(groups)})

    try:
        if not state["curve"]:
            validate()  # step 0: the BC skill itself
            save()
        trainer = _Trainer(steps, config, validate, save, progress, state)
        if state["env_steps"] < steps:
            model.learn(total_timesteps=10**12, callback=trainer, reset_num_timesteps=False)
            if state["curve"][-1][0] != state["env_steps"]:
                validate()
            save()
            if progress is not None:  # SB3 ends the last rollout early, before the trainer's report
                progress(min(state["env_steps"], steps), {"val": state["curve"][-1][1], "best": state["best_success"]})
    finally:
        env.close()
    if base_fingerprint(policy) != fingerprint:
        raise RuntimeError("the base weights changed during RL fine-tuning (a bug: only the residual may train)")

    residual.load_state_dict(best)
    residual.eval().requires_grad_(False)
    record = {"algorithm": f"PPO (stable-baselines3 {stable_baselines3.__version__})", "method": "residual head",
              "env_id": env_id, "env_steps": state["env_steps"], "episodes": state["episodes"],
              "wall_s": round(state["wall_s"], 1), "reward": {"success": config.success_reward,
                                                               "shaping_weight": config.shaped_weight,
                                                               "shaping_terms": terms, "shaping": "potential-based"},
              "source": str(skill), "source_sha256": source_sha, "execution": execution.to_dict(),
              "validation": {"seed": VALIDATION_SEED, "episodes": config.val_episodes, "curve": state["curve"],
                             "best_success": state["best_success"], "best_step": state["best_step"]},
              "residual_params": residual.num_parameters(), "skill_percent_of_base": round(percent, 3),
              "config": config.to_dict()}
    metadata = {**{k: v for k, v in source.metadata.items() if k != "eval"}, "rl": record}
    adapter = dataclasses.replace(source, metadata=metadata, residual=residual.cpu())
    out = save_adapter(adapter, out_dir / ADAPTER_DIR)
    result: dict[str, Any] = {"out": str(out), "env_id": env_id, **{f"rl/{k}": v for k, v in record.items()
                                                                      if k not in ("config", "validation")},
                              "rl/best_validation_success": state["best_success"], "rl/best_step": state["best_step"]}
    if eval_episodes:
        evaluated = load_policy(base, device=device)
        attach_active(evaluated, load_adapter(out))
        t1 = time.perf_counter()
        with torch.no_grad():
            m = evaluate(evaluated, env_id, eval_episodes, seed=eval_seed)
        result["eval"] = {**m, "eval/wall_s": time.perf_counter() - t1}
        adapter.metadata["eval"] = {k: v for k, v in m.items() if k != "episodes"}
        save_adapter(adapter, out)
    logger.info("RL fine-tuned %s on %s: %d env steps in %.0f s, best validation %.2f at %d -> %s", source.skill,
                env_id, state["env_steps"], state["wall_s"], state["best_success"], state["best_step"], out)
    return result


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text())
