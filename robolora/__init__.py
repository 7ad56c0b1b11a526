"""robolora: robot skills as LoRA adapters on a frozen visuomotor transformer policy.

One distribution, one import package. The repository's top-level folders ``envs/`` and ``policies/`` are
installed as the subpackages ``robolora.envs`` and ``robolora.policies`` through setuptools' ``package-dir``
mapping (see ``pyproject.toml`` and DESIGN.md §2), so nothing named ``envs`` or ``policies`` lands in
site-packages.
"""

from __future__ import annotations

__version__ = "0.1.0"

from robolora.config import ATTENTION_TARGETS, LoRAConfig  # noqa: E402
from robolora.inject import (  # noqa: E402
    count_parameters,
    inject_lora,
    lora_layers,
    mark_only_lora_trainable,
    merge_adapter,
    remove_adapter,
    set_active_adapter,
    strip_lora,
    unmerge,
)
from robolora.lora import LoRALinear  # noqa: E402
from robolora.policies import PolicyConfig, VisuomotorPolicy, base_fingerprint, load_policy, save_policy  # noqa: E402

__all__ = [
    "__version__",
    "ATTENTION_TARGETS",
    "LoRAConfig",
    "LoRALinear",
    "PolicyConfig",
    "VisuomotorPolicy",
    "base_fingerprint",
    "count_parameters",
    "inject_lora",
    "load_policy",
    "lora_layers",
    "mark_only_lora_trainable",
    "merge_adapter",
    "remove_adapter",
    "save_policy",
    "set_active_adapter",
    "strip_lora",
    "unmerge",
]
