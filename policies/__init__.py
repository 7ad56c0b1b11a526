"""Visuomotor transformer policy and shipped checkpoints (installed as ``robolora.policies``; docs/design.md §3)."""

from .act import ACTConfig, ACTPolicy
from .checkpoint import base_fingerprint, load_policy, read_policy_header, save_policy
from .config import PolicyConfig
from .transformer import VisuomotorPolicy

__all__ = [
    "ACTConfig",
    "ACTPolicy",
    "PolicyConfig",
    "VisuomotorPolicy",
    "base_fingerprint",
    "load_policy",
    "read_policy_header",
    "save_policy",
]
