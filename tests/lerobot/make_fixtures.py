"""Tiny LeRobot artifacts for the tests: a small ACT built from its config (no pretrained backbone, nothing
downloaded) saved as a LeRobot policy folder, and the golden files the default (lerobot-free) tests read.

Regenerate the golden files in ``tests/lerobot/fixtures/`` with lerobot installed (they are what lerobot 0.6.1
writes; ``test_fixtures_have_the_layout_lerobot_writes`` says when they drift):

    MUJOCO_GL=egl .venv-lerobot/bin/python tests/lerobot/make_fixtures.py
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

FIXTURES = Path(__file__).parent / "fixtures"
IMAGE_SIZE, CHUNK, N_ACTION_STEPS = 32, 8, 4
ACT_SIZES = dict(dim_model=64, n_heads=2, dim_feedforward=128, n_encoder_layers=1, n_decoder_layers=1,
                 n_vae_encoder_layers=1, latent_dim=8)


def collect_demos(out: Path, task: str = "reach", episodes: int = 3) -> Path:
    """robolora demos of ``task`` at 32 px (a few seconds)."""
    from robolora.data import collect
    from robolora.envs import TASKS

    collect(TASKS[task], episodes, out, image_size=IMAGE_SIZE)
    return out


def save_tiny_act(folder: Path, dataset_meta: Any, seed: int = 0, **changes: Any) -> Path:
    """A LeRobot ACT (dim 64, 1 encoder + 1 decoder layer, resnet18 without pretrained weights) for the features of
    a LeRobotDataset, its processors normalising with the dataset's statistics, saved as LeRobot saves a policy."""
    from lerobot.configs.types import FeatureType
    from lerobot.policies.act.configuration_act import ACTConfig
    from lerobot.policies.act.modeling_act import ACTPolicy
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.utils.feature_utils import dataset_to_policy_features

    features = dataset_to_policy_features(dataset_meta.features)
    config = ACTConfig(input_features={k: f for k, f in features.items() if f.type is not FeatureType.ACTION},
                       output_features={k: f for k, f in features.items() if f.type is FeatureType.ACTION},
                       chunk_size=CHUNK, n_action_steps=N_ACTION_STEPS, pretrained_backbone_weights=None,
                       device="cpu", **{**ACT_SIZES, **changes})
    torch.manual_seed(seed)
    policy = ACTPolicy(config)
    preprocessor, postprocessor = make_pre_post_processors(config, dataset_stats=dataset_meta.stats)
    policy.save_pretrained(folder)
    preprocessor.save_pretrained(folder)
    postprocessor.save_pretrained(folder)
    return folder


def main() -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    from robolora.integrations.lerobot_data import to_lerobot_dataset

    work = Path(tempfile.mkdtemp())
    try:
        info = to_lerobot_dataset(collect_demos(work / "demos"), work / "lerobot")
        meta = LeRobotDatasetMetadata(info["repo_id"], root=work / "lerobot")
        act = save_tiny_act(work / "act", meta)
        FIXTURES.mkdir(exist_ok=True)
        for name in ("config.json", "policy_preprocessor.json", "policy_postprocessor.json",
                     "policy_preprocessor_step_3_normalizer_processor.safetensors",
                     "policy_postprocessor_step_0_unnormalizer_processor.safetensors"):
            shutil.copy(act / name, FIXTURES / ("act_" + name))
        shutil.copy(work / "lerobot" / "meta" / "info.json", FIXTURES / "dataset_info.json")
        print(json.dumps(sorted(p.name for p in FIXTURES.iterdir()), indent=1))
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    sys.exit(main())
