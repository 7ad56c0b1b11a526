"""robolora demo folders as LeRobotDataset v3, and local v3 folders as robolora training data (docs/lerobot.md).

``to_lerobot_dataset(demo_dirs, out_dir)`` writes robolora's demos (``robolora collect``: safetensors episodes and a
manifest) with LeRobot's own writer: ``LeRobotDataset.create``, one ``add_frame`` per step, ``save_episode`` per
episode and ``finalize()``. Each robolora task becomes a LeRobot task string; features:

| LeRobot feature               | from robolora          | dtype, shape                          |
| ----------------------------- | ---------------------- | ------------------------------------- |
| ``observation.images.<cam>``  | ``obs.rgb_<cam>``      | video (H, W, 3) mp4, or image (PNG)   |
| ``observation.state``         | ``obs.proprio``        | float32 (10,)                         |
| ``action``                    | ``action`` (the clean DART label) | float32 (4,)               |
| ``next.success``              | ``success``            | bool (1,)                             |

The executed (noisy) action is not written: LeRobot would read any ``action*`` key as an action target.
``LeRobotDataset(repo_id, root=out_dir)`` reads the result and ``lerobot-train --dataset.root=out_dir`` trains on it.

``LeRobotFrames(root, policy)`` is the other direction: a local v3 folder read through ``LeRobotDataset`` (K-step
action chunks through ``delta_timestamps``, frames as uint8), each sample in robolora's batch format for a
``LeRobotPolicy``, so ``robolora.train.train`` trains a skill on it. Its features are checked against the policy's
before anything is read (``check_dataset_features``). lerobot decodes the videos (torchcodec with a system FFmpeg,
else PyAV). ``train_lerobot_skill(policy_folder, dataset_folder, out_dir)`` is the whole recipe: a LoRA skill on a
frozen LeRobot policy from a local LeRobotDataset, saved as a robolora adapter; ``robolora train-skill`` runs it when
``--base`` is a LeRobot policy folder or ``--data`` a LeRobotDataset (``lerobot_dataset_version``). Before lerobot is
imported, ``check_training_inputs`` refuses what the two folders' JSON files already rule out (an unsupported policy
type, a dataset that is not v3, features that do not fit the policy).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.numpy import load_file
from torch.utils.data import Dataset

from robolora.config import LoRAConfig
from robolora.integrations.lerobot import (ACTION_KEY, IMAGE_PREFIX, STATE_KEY, LeRobotFeatures, LeRobotPolicy,
                                           load_lerobot_policy, read_lerobot_features, require_lerobot,
                                           resolve_lerobot_policy_folder)

if TYPE_CHECKING:
    from robolora.train import TrainConfig

logger = logging.getLogger(__name__)

FPS = 20  # robolora's envs step at 20 Hz (envs.base: render_fps)
ROBOT_TYPE = "robolora_mujoco_gripper"
SUCCESS_KEY = "next.success"
INFO_FILE = Path("meta") / "info.json"
V21_TO_V30 = "python -m lerobot.scripts.convert_dataset_v21_to_v30 --repo-id=<repo_id>"  # LeRobot's own converter


def lerobot_features(cameras: Sequence[str], image_size: int, proprio_dim: int = 10, action_dim: int = 4,
                     videos: bool = True) -> dict[str, dict[str, Any]]:
    """The LeRobotDataset feature spec of robolora demos (module docstring's table)."""
    features: dict[str, dict[str, Any]] = {
        f"{IMAGE_PREFIX}{cam}": {"dtype": "video" if videos else "image", "shape": (image_size, image_size, 3),
                                 "names": ["height", "width", "channels"]} for cam in cameras}
    features[STATE_KEY] = {"dtype": "float32", "shape": (proprio_dim,), "names": [f"proprio_{i}" for i in
                                                                                 range(proprio_dim)]}
    features[ACTION_KEY] = {"dtype": "float32", "shape": (action_dim,), "names": ["dx", "dy", "dz", "gripper"]
                            if action_dim == 4 else [f"action_{i}" for i in range(action_dim)]}
    features[SUCCESS_KEY] = {"dtype": "bool", "shape": (1,), "names": None}
    return features


def to_lerobot_dataset(demo_dirs: str | Path | Sequence[str | Path], out_dir: str | Path, *,
                       repo_id: str | None = None, fps: int = FPS, videos: bool = True,
                       max_episodes: int | None = None, keep_post_success: bool = False,
                       progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write robolora demo folders (one task each) as one LeRobotDataset v3 at ``out_dir`` (which must not exist).

    ``repo_id`` names the dataset (default ``robolora/<task>[_<task>...]``; nothing is pushed anywhere).
    ``videos=True`` stores camera frames as LeRobot's mp4 videos (lossy: about 2/255 mean absolute error per pixel
    at 32 px); ``videos=False`` as PNG images inside the parquet files (lossless, larger).
    ``max_episodes`` keeps the first N episodes of each folder (a demo budget). Episodes collected with
    ``post_success`` (for completion heads) end at their first success step unless ``keep_post_success``, as in
    robolora's own ``BCDataset``: the expert's moves after the goal are not the skill.
    ``progress(n)`` is called with the number of episodes written. Returns what was written.
    """
    from robolora.data import episode_filename, load_manifest

    dirs = [Path(demo_dirs)] if isinstance(demo_dirs, (str, Path)) else [Path(d) for d in demo_dirs]
    if max_episodes is not None and (isinstance(max_episodes, bool) or max_episodes < 1):
        raise ValueError(f"max_episodes={max_episodes!r}: give a number of episodes >= 1 per folder, or None for all")
    if not dirs:
        raise ValueError("demo_dirs is empty; pass robolora demo folders (robolora collect)")
    manifests = [load_manifest(d) for d in dirs]
    first = manifests[0]
    for folder, m in zip(dirs, manifests):
        if (m["image_size"], m["cameras"]) != (first["image_size"], first["cameras"]):
            raise ValueError(f"{folder} has image_size={m['image_size']}, cameras={m['cameras']} but {dirs[0]} has "
                             f"image_size={first['image_size']}, cameras={first['cameras']}; one dataset holds one "
                             "camera layout")
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; LeRobotDataset.create writes a new folder, choose another --out")
    require_lerobot()
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    cameras, started = list(first["cameras"]), time.perf_counter()
    repo_id = repo_id or "robolora/" + "_".join(m["task"] for m in manifests)
    dataset = LeRobotDataset.create(repo_id, fps, lerobot_features(cameras, first["image_size"],
                                                                        videos=videos),
                                    root=out, robot_type=ROBOT_TYPE, use_videos=videos)
    episodes = frames = 0
    try:
        for folder, manifest in zip(dirs, manifests):
            for index, entry in enumerate(manifest["episodes"][:max_episodes]):
                arrays = load_file(str(folder / episode_filename(index)))
                length = int(entry["length"])
                if manifest.get("post_success") and not keep_post_success:
                    hits = arrays["success"].nonzero()[0]
                    if len(hits):
                        length = int(hits[0]) + 1  # the step whose action reached the goal is the last kept
                for t in range(length):
                    frame = {f"{IMAGE_PREFIX}{cam}": arrays[f"obs.rgb_{cam}"][t] for cam in cameras}
                    frame.update({STATE_KEY: arrays["obs.proprio"][t], ACTION_KEY: arrays["action"][t],
                                  SUCCESS_KEY: arrays["success"][t:t + 1].astype(bool), "task": manifest["task"]})
                    dataset.add_frame(frame)
                dataset.save_episode()
                episodes, frames = episodes + 1, frames + length
                if progress is not None:
                    progress(episodes)
    finally:
        dataset.finalize()  # required: it writes the parquet footers (an unfinalized dataset is unreadable)
    seconds = time.perf_counter() - started
    logger.info("wrote %d episodes (%d frames) of %s to %s in %.1f s", episodes, frames, repo_id, out, seconds)
    return {"out": str(out), "repo_id": repo_id, "episodes": episodes, "frames": frames, "fps": fps,
            "tasks": [m["task"] for m in manifests], "videos": videos, "wall_s": seconds}


def check_dataset_features(dataset_features: Mapping[str, Mapping[str, Any]], features: LeRobotFeatures,
                           where: str = "the dataset") -> None:
    """Raise naming the missing or misshapen key unless a LeRobotDataset's features (``meta/info.json``
    "features": images (H, W, 3) with names height/width/channels) hold every input and the action of a policy."""
    wanted = {f.lerobot_key: f.robolora_shape if f.type == "VISUAL" else f.shape for f in features.inputs}
    wanted[ACTION_KEY] = (features.action_dim,)
    missing = [k for k in wanted if k not in dataset_features]
    if missing:
        raise ValueError(f"{where} lacks the feature(s) {missing} the policy reads (it has {sorted(dataset_features)})")
    for key, shape in wanted.items():
        got = tuple(int(s) for s in dataset_features[key]["shape"])
        names = dataset_features[key].get("names") or []
        if len(got) == 3 and len(names) == 3 and names[0] in ("channel", "channels"):
            got = (got[1], got[2], got[0])  # stored channel-first
        if got != shape:
            raise ValueError(f"{where}: feature {key!r} has shape {list(got)}, the policy reads {list(shape)}")


def lerobot_dataset_version(root: str | Path) -> str | None:
    """The ``codebase_version`` of a LeRobotDataset folder (``"v3.0"``), read from ``meta/info.json`` without
    lerobot; None when ``root`` holds no ``meta/info.json`` (not a LeRobotDataset), ``"unknown"`` when it names none."""
    path = Path(root) / INFO_FILE
    if not path.is_file():
        return None
    version = _read_info(path).get("codebase_version")
    return version if isinstance(version, str) and version else "unknown"


def _read_info(path: Path) -> dict[str, Any]:
    import json

    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the dataset's metadata is corrupt") from err
    if not isinstance(info, dict):
        raise ValueError(f"{path} must hold a JSON object; the dataset's metadata is corrupt")
    return info


def check_training_inputs(policy_folder: str | Path, dataset_folder: str | Path) -> LeRobotFeatures:
    """Refuse, before lerobot is imported or anything is written, a LeRobot policy folder and a dataset that cannot
    train a skill together: the policy folder incomplete or of an unsupported type, the dataset not a LeRobotDataset
    v3 (a v2.x one names LeRobot's converter), or its features not holding every input and the action the policy
    reads at the policy's shapes (the missing or misshapen key is named). Returns the policy's features."""
    features = read_lerobot_features(resolve_lerobot_policy_folder(policy_folder))
    root = Path(dataset_folder)
    version = lerobot_dataset_version(root)
    if version is None:
        raise FileNotFoundError(f"{root} is not a LeRobotDataset v3 folder (no {INFO_FILE}); write one with "
                                "`robolora convert --to lerobot DEMOS --out OUT` or LeRobot's recorder")
    if not version.startswith("v3."):
        hint = f"; convert it with LeRobot's `{V21_TO_V30}`" if version.startswith("v2") else ""
        raise ValueError(f"{root} is a LeRobotDataset {version}; robolora reads LeRobotDataset v3.x (the layout "
                         f"lerobot >= 0.4 writes){hint}")
    info = _read_info(root / INFO_FILE)
    if not isinstance(info.get("features"), Mapping):
        raise ValueError(f"{root / INFO_FILE} has no \"features\" object; the dataset's metadata is corrupt")
    check_dataset_features(info["features"], features, str(root))
    return features


class LeRobotFrames(Dataset):
    """Samples of a local LeRobotDataset v3 folder in a ``LeRobotPolicy``'s robolora batch format.

    Item: each image ``rgb_<cam>`` uint8 (H, W, 3), ``proprio`` / ``env_state`` float32, ``action`` float32 (K, A)
    = the actions t..t+K-1 in dataset units, and ``action_is_pad`` bool (K,) for steps past the episode's end.
    """

    def __init__(self, root: str | Path, policy: LeRobotPolicy, repo_id: str | None = None,
                 episodes: int | None = None) -> None:
        require_lerobot()
        from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata

        root = Path(root)
        if not (root / "meta" / "info.json").is_file():
            raise FileNotFoundError(f"{root} is not a LeRobotDataset v3 folder (no meta/info.json); write one with "
                                    "`robolora convert --to lerobot DEMOS OUT` or LeRobot's recorder")
        repo_id = repo_id or f"local/{root.name}"
        self.features = policy.features
        meta = LeRobotDatasetMetadata(repo_id, root=root)
        check_dataset_features(meta.features, self.features, str(root))
        if episodes is not None and not 1 <= episodes <= meta.total_episodes:
            raise ValueError(f"demos={episodes}: {root} holds {meta.total_episodes} episodes; choose 1 to "
                             f"{meta.total_episodes} (or all, by leaving it out)")
        steps = [i / meta.fps for i in range(self.features.chunk_size)]
        self.dataset = LeRobotDataset(repo_id, root=root, delta_timestamps={ACTION_KEY: steps}, return_uint8=True,
                                      episodes=None if episodes is None else list(range(episodes)))
        logger.info("LeRobotFrames: %d frames, %d episodes from %s", len(self.dataset),
                    self.dataset.meta.total_episodes, root)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.dataset[int(index)]
        out = {}
        for f in self.features.inputs:
            value = item[f.lerobot_key]
            if f.type != "VISUAL":
                out[f.key] = value.float()
                continue
            if value.dtype != torch.uint8:  # image (not video) features decode as float in [0, 1]
                value = (value * 255.0).round().to(torch.uint8)
            out[f.key] = value.permute(1, 2, 0).contiguous()  # (H, W, 3)
        out["action"] = item[ACTION_KEY].float()  # (K, A)
        out["action_is_pad"] = item[f"{ACTION_KEY}_is_pad"].bool()  # (K,)
        return out


def _task_env(name: str) -> str:
    """The robolora env that rolls out a skill named like a robolora task (for validation / evaluation)."""
    from robolora.envs import TASKS

    if name not in TASKS:
        raise ValueError(f"validation and evaluation roll the skill out in a robolora env, and skill {name!r} is not "
                         f"a robolora task ({', '.join(sorted(TASKS))}): name the env (env_id=...) or the skill "
                         "(--skill TASK), or drop --select-episodes / --eval-episodes")
    return TASKS[name]


def _dataset_task(root: str | Path) -> str:
    """The one task of a LeRobotDataset (its skill when none is named)."""
    require_lerobot()
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    tasks = list(LeRobotDatasetMetadata(f"local/{Path(root).name}", root=Path(root)).tasks.index)
    if len(tasks) != 1:
        raise ValueError(f"{root} holds the tasks {tasks}; name the skill (skill=..., or robolora train-skill "
                         "--skill NAME)")
    return str(tasks[0])


def train_lerobot_skill(policy_folder: str | Path, dataset_folder: str | Path, out_dir: str | Path, *,
                        skill: str | None = None, lora: LoRAConfig | None = None, config: TrainConfig | None = None,
                        action_bounds: tuple[float, float] | None = None,
                        execution: Mapping[str, Any] | None = None, resume: bool = False,
                        on_step: Callable[[int, dict[str, float]], None] | None = None,
                        demos: int | None = None, select_episodes: int = 0, eval_episodes: int = 0,
                        env_id: str | None = None) -> dict[str, Any]:
    """Train a LoRA skill on the frozen LeRobot policy in ``policy_folder`` from the local LeRobotDataset v3 in
    ``dataset_folder`` with robolora's loop (``robolora.train.train``); the adapter goes to ``out_dir/adapter``.

    ``skill`` defaults to the dataset's task when it has one. ``lora`` defaults to rank 4 on every attention
    projection of ACT's encoder and decoder (``LeRobotPolicy.lora_targets``). ``execution`` (``n_action_steps``,
    ``temporal_ensemble``) is the skill's own chunk execution, saved in adapter.json (default: the policy's).
    ``resume`` continues from the last checkpoint in ``out_dir``. ``demos`` trains on the first N episodes only.

    ``select_episodes > 0`` rolls the skill out on that many validation episodes (seeds from 30,000,000) every
    ``config.eval_every`` steps and keeps the best step (as robolora's own ``train_skill``); ``eval_episodes > 0``
    evaluates the result on held-out seeds. Both run in the robolora env ``env_id`` (default: the env of the robolora
    task named like the skill), rendered as the policy reads it, with actions clamped to the env's bounds unless
    ``action_bounds`` says otherwise. Bad input is refused before lerobot is imported and before anything is written
    (:func:`check_training_inputs`). Returns what was trained and where.
    """
    from robolora.adapters import adapter_from_policy, save_adapter, validate_execution
    from robolora.evaluate import env_action_bounds
    from robolora.inject import count_parameters, inject_lora, mark_only_lora_trainable, set_active_adapter
    from robolora.policies import base_fingerprint
    from robolora.policy import Execution
    from robolora.recipes import KeepBest
    from robolora.train import TrainConfig, train

    features = check_training_inputs(policy_folder, dataset_folder)
    execution = validate_execution(execution, features.execution)
    if execution:
        Execution(**{**features.execution.to_dict(), **execution}).check(features.chunk_size)
    config = config or TrainConfig(steps=3000, lr=1e-3, weight_decay=0.0, warmup_steps=100)
    lora = lora or LoRAConfig(rank=4, alpha=8.0, targets=LeRobotPolicy.lora_targets)
    if demos is not None and (isinstance(demos, bool) or not isinstance(demos, int) or demos < 1):
        raise ValueError(f"demos={demos!r} (--demos): must be an int >= 1, or left out to train on every episode")
    rollouts = select_episodes > 0 or eval_episodes > 0
    if rollouts and env_id is None and skill is not None:
        env_id = _task_env(skill)  # refused here, before lerobot is imported
    if rollouts and env_id is None:  # the skill is the dataset's task
        env_id = _task_env(_dataset_task(dataset_folder))
    if rollouts and action_bounds is None:
        action_bounds = env_action_bounds(env_id)
    policy = load_lerobot_policy(policy_folder, action_bounds=action_bounds)
    frames = LeRobotFrames(dataset_folder, policy, episodes=demos)
    tasks = list(frames.dataset.meta.tasks.index)
    if skill is None and len(tasks) != 1:
        raise ValueError(f"{dataset_folder} holds the tasks {tasks}; name the skill (skill=..., or robolora train-skill --skill NAME)")
    skill = skill or str(tasks[0])
    fingerprint = base_fingerprint(policy)
    inject_lora(policy, lora, skill, generator=torch.Generator().manual_seed(config.seed))
    mark_only_lora_trainable(policy)
    set_active_adapter(policy, skill)
    counts = count_parameters(policy)
    if execution:
        policy.set_execution(**execution)  # validation and evaluation rollouts execute as deployed
    env_kwargs = policy.spec.env_kwargs()
    keeper = KeepBest(policy, env_id, out_dir, select_episodes, env_kwargs=env_kwargs) if select_episodes else None
    if keeper is not None and not config.eval_every:
        config = dataclasses.replace(config, eval_every=config.steps)  # at least the last step is evaluated
    metrics = train(policy, frames, config, out_dir, resume=resume, on_step=on_step, eval_fn=keeper)
    policy.cpu().eval()
    selection = keeper.restore(policy) if keeper is not None else None
    info = {"skill": skill, "lerobot_policy": str(policy_folder), "data": str(dataset_folder),
            "demos": frames.dataset.meta.total_episodes if demos is None else demos,
            "samples": len(frames), "trainable_params": counts["trainable"],
            "trainable_percent_of_base": 100.0 * counts["trainable"] / (counts["total"] - counts["trainable"]),
            "train_config": config.to_dict(), "train_metrics": metrics}
    if selection is not None:
        info["selection"] = selection
    if execution:
        info["execution"] = execution
    if eval_episodes:
        from robolora.evaluate import evaluate

        m = evaluate(policy, env_id, eval_episodes, env_kwargs=env_kwargs)
        info["eval"] = {k: v for k, v in m.items() if k != "episodes"}
    adapter = adapter_from_policy(policy.cpu(), skill, metadata={k: v for k, v in info.items() if k != "skill"})
    if adapter.base_fingerprint != fingerprint:
        raise RuntimeError("the base weights moved during LoRA training (robolora.inject bug)")
    info["out"] = str(save_adapter(adapter, Path(out_dir) / "adapter"))
    return info
