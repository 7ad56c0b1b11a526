"""Training recipes built on the one BC loop (robolora.train): pretraining the base, and a new skill by LoRA
(base frozen), full fine-tuning, or from scratch (the baselines of the skill table).

A recipe turns dataset folders into a :class:`~robolora.data.BCDataset` with task-balanced sampling (docs/design.md §5:
reach episodes are 8 steps, so uniform sampling starves it), builds or loads the policy, decides which
parameters train, calls :func:`robolora.train.train` and saves the result as safetensors + JSON.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from robolora.adapters import adapter_from_policy, save_adapter, validate_execution
from robolora.config import LoRAConfig
from robolora.data import BCDataset, load_manifest
from robolora.envs import BASE_TASKS, TASKS
from robolora.inject import count_parameters, inject_lora, mark_only_lora_trainable, set_active_adapter
from robolora.policies import base_fingerprint, load_policy, save_policy
from robolora.policies.checkpoint import POLICY_KINDS, SHIPPED_DIR
from robolora.stats import VALIDATION_SEED
from robolora.train import TrainConfig, resolve_device, train

logger = logging.getLogger(__name__)

POLICY_DIR = "policy"
ADAPTER_DIR = "adapter"
BEST_FILE = "best_state.safetensors"
SKILL_METHODS = ("lora", "full", "scratch")


def shipped_base() -> Path:
    """The pretrained base shipped inside the package (``policies/pretrained/base``; ``load_policy("base")``)."""
    return SHIPPED_DIR / "base"


def task_of(data_dir: str | Path) -> str:
    """The task name recorded in a dataset folder's manifest."""
    manifest = load_manifest(data_dir)
    env_id = manifest["env_id"]
    return next((name for name, gid in TASKS.items() if gid == env_id), manifest.get("task", env_id))


def balanced_weights(data_dirs: Sequence[str | Path], task_weights: Mapping[str, float] | None = None) -> torch.Tensor:
    """Per-sample weights so every dataset folder (task) contributes equally many samples in expectation.

    ``task_weights`` ({task: w}, default 1 each) scales a task's share: ``{"push": 2}`` draws push samples twice as
    often as any other task's. Assumes BCDataset concatenates the folders' samples in the given order, one sample
    per recorded step.
    """
    task_weights = dict(task_weights or {})
    tasks = [task_of(d) for d in data_dirs]
    unknown = sorted(set(task_weights) - set(tasks))
    if unknown:
        raise ValueError(f"task weights for {unknown}, which no data folder holds; the folders hold {tasks}")
    bad = {t: w for t, w in task_weights.items() if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0)}
    if bad:
        raise ValueError(f"task weights must be finite numbers > 0, got {bad}")
    weights = []
    for d, task in zip(data_dirs, tasks):
        n = sum(e["length"] for e in load_manifest(d)["episodes"])
        weights.append(torch.full((n,), float(task_weights.get(task, 1.0)) / n))
    return torch.cat(weights)


def trained_config(config: TrainConfig) -> dict[str, Any]:
    """The training config as recorded in a checkpoint or adapter: ``device`` is the one it ran on (auto resolved)."""
    return {**config.to_dict(), "device": str(resolve_device(config.device))}


def pretrain(
    data_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    policy: str = "visuomotor",
    preset: str = "base",
    config: TrainConfig = TrainConfig(),
    policy_overrides: dict[str, Any] | None = None,
    resume: bool = False,
    eval_episodes: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    init_from: str | Path | None = None,
    task_weights: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Multi-task BC of a fresh policy on base-task datasets; the policy is saved to ``out_dir/policy``.

    ``policy`` is the architecture (``robolora.policies.checkpoint.POLICY_KINDS``: ``visuomotor`` or ``act``) and
    ``preset`` its size.
    Each folder's task (from its manifest) must be a base task; its index in ``BASE_TASKS`` is the task id.
    ``init_from`` starts from the weights of a saved policy of the same architecture (continued pretraining, e.g.
    on more demos); the normalisation statistics are re-computed from ``data_dirs``. ``task_weights`` ({task: w})
    samples a task w times as often as the others (default: every task equally often).
    ``eval_episodes > 0`` runs that many rollouts per task every ``config.eval_every`` steps.
    """
    tasks = [task_of(d) for d in data_dirs]
    unknown = [t for t in tasks if t not in BASE_TASKS]
    if unknown:
        raise ValueError(f"pretraining uses base tasks {list(BASE_TASKS)}; {unknown} are not (train skills with "
                         "`robolora train-skill`)")
    first = load_manifest(data_dirs[0])
    if policy not in POLICY_KINDS:
        raise ValueError(f"policy={policy!r}: use one of {sorted(POLICY_KINDS)}")
    config_cls, policy_cls = POLICY_KINDS[policy]
    policy_config = config_cls.preset(preset, image_size=int(first["image_size"]),
                                      cameras=tuple(first["cameras"]), **(policy_overrides or {}))
    task_ids = {t: BASE_TASKS.index(t) for t in tasks}
    dataset = BCDataset(list(data_dirs), chunk_size=policy_config.chunk_size, task_ids=task_ids)
    weights = balanced_weights(data_dirs, task_weights)
    if len(weights) != len(dataset):
        raise RuntimeError(f"manifests count {len(weights)} samples but the dataset has {len(dataset)}: "
                           "re-run `robolora collect` on the folders to repair their manifests")
    torch.manual_seed(config.seed)
    kind, policy = policy, policy_cls(policy_config)
    if init_from is not None:
        start = load_policy(init_from)
        if type(start) is not policy_cls or start.config != policy_config:
            raise ValueError(f"init_from={str(init_from)!r} is a {start.config} policy but these data and "
                             f"preset={preset!r} build {policy_config}; continue from a policy of the same config")
        policy.load_state_dict(start.state_dict(), strict=True)
        logger.info("continuing from the weights of %s", init_from)
    policy.set_normalization(dataset.stats)
    eval_fn = None
    if eval_episodes:
        from robolora.evaluate import evaluate

        def eval_fn(p: torch.nn.Module, step: int) -> dict[str, float]:
            rates = {f"eval/{t}": evaluate(p, TASKS[t], eval_episodes, task_id=task_ids[t])["eval/success_rate"]
                     for t in task_ids}
            return {**rates, "eval/mean_success": sum(rates.values()) / len(rates)}

    logger.info("pretraining %s %s (%d params) on %s: %d samples", kind, preset,
                sum(p.numel() for p in policy.parameters()), tasks, len(dataset))
    metrics = train(policy, dataset, config, out_dir, sample_weights=weights, resume=resume,
                    eval_fn=eval_fn, on_step=on_step)
    save_policy(policy.cpu(), Path(out_dir) / POLICY_DIR, metadata={
        "kind": "base", "tasks": task_ids, "data": [str(d) for d in data_dirs],
        "init_from": str(init_from) if init_from is not None else None,
        "task_weights": dict(task_weights) if task_weights else None,
        "train_config": trained_config(config), "train_metrics": metrics,
        "samples": len(dataset)})
    return metrics


def _skill_token(policy: torch.nn.Module) -> torch.nn.Parameter:
    # Start the new skill's identity at the centre of the base tasks' embeddings: a fresh adapter then behaves like
    # an "average" base task instead of an arbitrary one.
    start = policy.task_embed.weight.detach().mean(0).clone()
    return torch.nn.Parameter(start)


class KeepBest:
    """Checkpoint selection on validation rollouts (robomimic's practice): called as the training loop's
    ``eval_fn``, it rolls the policy out on ``episodes`` validation seeds (from ``VALIDATION_SEED``, disjoint from the
    demos and the held-out seeds) and keeps the trainable weights of the best step so far in ``out_dir/BEST_FILE``.

    Ties go to the later step. The file holds its step and success as safetensors metadata and is replaced
    atomically, so a killed and resumed run still knows its best step.
    """

    def __init__(self, policy: torch.nn.Module, env_id: str, out_dir: str | Path, episodes: int,
                 env_kwargs: dict[str, Any] | None = None) -> None:
        if episodes < 1:
            raise ValueError(f"select_episodes={episodes}: must be >= 1 validation episodes (0 turns selection off)")
        self.env_id, self.episodes, self.path = env_id, episodes, Path(out_dir) / BEST_FILE
        self.env_kwargs = env_kwargs  # what the env renders for this policy (a LeRobot policy's image size)
        self.names = [n for n, p in policy.named_parameters() if p.requires_grad]
        self.best: dict[str, float] | None = None
        if self.path.exists():
            from safetensors import safe_open

            with safe_open(str(self.path), "pt") as f:
                meta = f.metadata()
            self.best = {"step": int(meta["step"]), "success_rate": float(meta["success_rate"])}

    def __call__(self, policy: torch.nn.Module, step: int) -> dict[str, float]:
        from robolora.evaluate import evaluate

        rate = float(evaluate(policy, self.env_id, self.episodes, seed=VALIDATION_SEED,
                              env_kwargs=self.env_kwargs)["eval/success_rate"])
        if self.best is None or rate >= self.best["success_rate"]:
            self.best = {"step": step, "success_rate": rate}
            if int(os.environ.get("RANK", "0")) == 0:
                params = dict(policy.named_parameters())
                tensors = {n: params[n].detach().float().cpu().contiguous() for n in self.names}
                tmp = self.path.with_name(f".{BEST_FILE}.tmp")
                save_file(tensors, str(tmp), metadata={k: str(v) for k, v in self.best.items()})
                os.replace(tmp, self.path)
        logger.info("step %d: validation success %.2f (best %.2f at step %d)", step, rate,
                    self.best["success_rate"], self.best["step"])
        return {"val/success_rate": rate, "val/best_success_rate": self.best["success_rate"]}

    def restore(self, policy: torch.nn.Module) -> dict[str, Any]:
        """Load the best step's weights into ``policy``; returns what was selected (for the adapter's metadata)."""
        if self.best is None:
            raise RuntimeError("no validation evaluation ran: set TrainConfig.eval_every <= steps")
        tensors = load_file(str(self.path))
        params = dict(policy.named_parameters())
        with torch.no_grad():
            for name in self.names:
                params[name].copy_(tensors[name].to(params[name].device, params[name].dtype))
        return {**self.best, "episodes": self.episodes, "seed": VALIDATION_SEED}


def train_skill(
    base: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    method: str = "lora",
    lora: LoRAConfig = LoRAConfig(),
    config: TrainConfig = TrainConfig(steps=3000, lr=1e-3, weight_decay=0.0, warmup_steps=100),
    demos: int | None = None,
    resume: bool = False,
    eval_episodes: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    execution: dict[str, Any] | None = None,
    select_episodes: int = 0,
) -> dict[str, Any]:
    """Behaviour-clone a new skill from ``data_dir`` on top of the base checkpoint ``base``.

    ``method``: ``lora`` freezes the base and trains LoRA A/B (``lora.targets``) plus the skill token, saving an
    adapter to ``out_dir/adapter``; ``full`` fine-tunes every base weight plus the token and ``scratch`` trains a
    fresh policy of the base's architecture, both saving a policy to ``out_dir/policy``. ``demos`` limits the data
    to the first N episodes. ``eval_episodes > 0`` evaluates the result on held-out seeds of the skill's task.
    ``execution`` (e.g. ``{"n_action_steps": 8}``) is how the skill's chunks are executed: used by that evaluation,
    saved in the adapter (``adapter.json`` "execution", applied whenever the skill is active) or the policy config.
    ``select_episodes > 0`` evaluates every ``config.eval_every`` steps (and at the end) on that many validation
    episodes and keeps the best step's weights (:class:`KeepBest`); the choice is recorded as "selection".
    Returns training metrics, parameter counts, output path and size, and evaluation metrics.
    """
    if method not in SKILL_METHODS:
        raise ValueError(f"method={method!r}: use one of {SKILL_METHODS}")
    skill = task_of(data_dir)
    if skill in BASE_TASKS:
        logger.warning("%s is a base task; training it as a new skill anyway", skill)
    policy = load_policy(base)
    execution = validate_execution(execution, policy.config)
    fingerprint = base_fingerprint(policy)
    total_base = sum(p.numel() for p in policy.parameters())
    dataset = BCDataset([data_dir], chunk_size=policy.config.chunk_size, task_ids={skill: 0}, max_episodes=demos)
    manifest = load_manifest(data_dir)
    torch.manual_seed(config.seed)
    if method == "scratch":
        policy = type(policy)(policy.config)
        policy.set_normalization(dataset.stats)
    policy.set_skill_token(_skill_token(policy))
    if method == "lora":
        inject_lora(policy, lora, skill, generator=torch.Generator().manual_seed(config.seed))
        mark_only_lora_trainable(policy, extra=[policy.skill_token])
        set_active_adapter(policy, skill)
    else:
        policy.requires_grad_(True)
    counts = count_parameters(policy)
    logger.info("train-skill %s (%s): %d trainable parameters (%.2f%% of the base), %d samples", skill, method,
                counts["trainable"], 100 * counts["trainable"] / total_base, len(dataset))
    if execution:
        policy.set_execution(**execution)
    keeper = KeepBest(policy, TASKS[skill], out_dir, select_episodes) if select_episodes else None
    if keeper is not None and not config.eval_every:
        config = dataclasses.replace(config, eval_every=config.steps)  # at least the last step is evaluated
    metrics = train(policy, dataset, config, out_dir, resume=resume, on_step=on_step, eval_fn=keeper)
    policy.cpu().eval()
    selection = keeper.restore(policy) if keeper is not None else None
    info = {"skill": skill, "method": method, "demos": len(dataset.files), "samples": len(dataset),
            "trainable_params": counts["trainable"], "trainable_percent_of_base": 100 * counts["trainable"] / total_base,
            "base": str(base), "base_fingerprint": fingerprint, "data": str(data_dir),
            "data_noise": manifest.get("noise"), "data_quiet_phases": manifest.get("quiet_phases"),
            "train_config": trained_config(config),
            "train_metrics": metrics}
    if selection is not None:
        info["selection"] = selection
    if execution:
        info["execution"] = execution
    if eval_episodes:
        from robolora.evaluate import evaluate

        m = evaluate(policy, TASKS[skill], eval_episodes)
        info["eval"] = {k: v for k, v in m.items() if k != "episodes"}
    if method == "lora":
        adapter = adapter_from_policy(policy, skill, metadata={k: v for k, v in info.items()
                                                               if k not in ("skill", "base_fingerprint")})
        out = save_adapter(adapter, Path(out_dir) / ADAPTER_DIR)
        info["size_bytes"] = (out / "adapter.safetensors").stat().st_size
    else:
        out = save_policy(policy, Path(out_dir) / POLICY_DIR, metadata=info)
        info["size_bytes"] = (Path(out) / "model.safetensors").stat().st_size
    info["out"] = str(out)
    return info
