"""Training recipes built on the one BC loop (robolora.train): pretraining the multi-task base policy.

A recipe turns dataset folders into a :class:`~robolora.data.BCDataset` with task-balanced sampling (TRAINING.md:
reach episodes are 8 steps, so uniform sampling starves it), builds or loads the policy, decides which
parameters train, calls :func:`robolora.train.train` and saves the result as safetensors + JSON.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from robolora.data import BCDataset, load_manifest
from robolora.envs import BASE_TASKS, TASKS
from robolora.policies import PolicyConfig, VisuomotorPolicy, save_policy
from robolora.train import TrainConfig, train

logger = logging.getLogger(__name__)

POLICY_DIR = "policy"


def shipped_base() -> Path:
    """The pretrained base shipped inside the package (``policies/pretrained/base``)."""
    return Path(str(resources.files("robolora.policies"))) / "pretrained" / "base"


def task_of(data_dir: str | Path) -> str:
    """The task name recorded in a dataset folder's manifest."""
    manifest = load_manifest(data_dir)
    env_id = manifest["env_id"]
    return next((name for name, gid in TASKS.items() if gid == env_id), manifest.get("task", env_id))


def balanced_weights(data_dirs: Sequence[str | Path]) -> torch.Tensor:
    """Per-sample weights so every dataset folder (task) contributes equally many samples in expectation.

    Assumes BCDataset concatenates the folders' samples in the given order, one sample per recorded step.
    """
    weights = []
    for d in data_dirs:
        n = sum(e["length"] for e in load_manifest(d)["episodes"])
        weights.append(torch.full((n,), 1.0 / n))
    return torch.cat(weights)


def pretrain(
    data_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    preset: str = "base",
    config: TrainConfig = TrainConfig(),
    policy_overrides: dict[str, Any] | None = None,
    resume: bool = False,
    eval_episodes: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Multi-task BC of a fresh policy on base-task datasets; the policy is saved to ``out_dir/policy``.

    Each folder's task (from its manifest) must be a base task; its index in ``BASE_TASKS`` is the task id.
    ``eval_episodes > 0`` runs that many rollouts per task every ``config.eval_every`` steps.
    """
    tasks = [task_of(d) for d in data_dirs]
    unknown = [t for t in tasks if t not in BASE_TASKS]
    if unknown:
        raise ValueError(f"pretraining uses base tasks {list(BASE_TASKS)}; {unknown} are not (train skills with "
                         "`robolora train-skill`)")
    first = load_manifest(data_dirs[0])
    policy_config = PolicyConfig.preset(preset, image_size=int(first["image_size"]),
                                        cameras=tuple(first["cameras"]), **(policy_overrides or {}))
    task_ids = {t: BASE_TASKS.index(t) for t in tasks}
    dataset = BCDataset(list(data_dirs), chunk_size=policy_config.chunk_size, task_ids=task_ids)
    weights = balanced_weights(data_dirs)
    if len(weights) != len(dataset):
        raise RuntimeError(f"manifests count {len(weights)} samples but the dataset has {len(dataset)}: "
                           "re-run `robolora collect` on the folders to repair their manifests")
    torch.manual_seed(config.seed)
    policy = VisuomotorPolicy(policy_config)
    policy.set_normalization(dataset.stats)
    eval_fn = None
    if eval_episodes:
        from robolora.evaluate import evaluate

        def eval_fn(p: torch.nn.Module, step: int) -> dict[str, float]:
            rates = {f"eval/{t}": evaluate(p, TASKS[t], eval_episodes, task_id=task_ids[t])["eval/success_rate"]
                     for t in task_ids}
            return {**rates, "eval/mean_success": sum(rates.values()) / len(rates)}

    logger.info("pretraining %s (%d params) on %s: %d samples", preset,
                sum(p.numel() for p in policy.parameters()), tasks, len(dataset))
    metrics = train(policy, dataset, config, out_dir, sample_weights=weights, resume=resume,
                    eval_fn=eval_fn, on_step=on_step)
    save_policy(policy.cpu(), Path(out_dir) / POLICY_DIR, metadata={
        "kind": "base", "tasks": task_ids, "data": [str(d) for d in data_dirs],
        "train_config": config.to_dict(), "train_metrics": metrics,
        "samples": len(dataset)})
    return metrics
