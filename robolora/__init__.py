"""robolora: robot skills as LoRA adapters on a frozen visuomotor transformer policy.

One distribution, one import package. The repository's top-level folders ``envs/`` and ``policies/`` are
installed as the subpackages ``robolora.envs`` and ``robolora.policies`` through setuptools' ``package-dir``
mapping (see ``pyproject.toml`` and docs/design.md §2), so nothing named ``envs`` or ``policies`` lands in
site-packages.
"""

from __future__ import annotations

__version__ = "0.1.0"

# Names are imported lazily (PEP 562) so that torch-free parts, such as the deploy-side ``robolora.controller``,
# can be imported on a machine without torch.
_EXPORTS = {
    "ATTENTION_TARGETS": "robolora.config",
    "LoRAConfig": "robolora.config",
    "LoRALinear": "robolora.lora",
    "count_parameters": "robolora.inject",
    "inject_lora": "robolora.inject",
    "lora_layers": "robolora.inject",
    "mark_only_lora_trainable": "robolora.inject",
    "merge_adapter": "robolora.inject",
    "remove_adapter": "robolora.inject",
    "set_active_adapter": "robolora.inject",
    "strip_lora": "robolora.inject",
    "unmerge": "robolora.inject",
    "ACTConfig": "robolora.policies",
    "ACTPolicy": "robolora.policies",
    "Execution": "robolora.policy",
    "PolicySpec": "robolora.policy",
    "TensorSpec": "robolora.policy",
    "check_policy": "robolora.policy",
    "PolicyConfig": "robolora.policies",
    "VisuomotorPolicy": "robolora.policies",
    "base_fingerprint": "robolora.policies",
    "load_policy": "robolora.policies",
    "save_policy": "robolora.policies",
    "SkillManager": "robolora.skills",
    "LiveCheck": "robolora.skills",
    "Sequencer": "robolora.sequencer",
    "export_skills": "robolora.export",
    "SkillAdapter": "robolora.adapters",
    "load_adapter": "robolora.adapters",
    "save_adapter": "robolora.adapters",
}


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'robolora' has no attribute {name!r}")


__all__ = [
    "__version__",
    "ACTConfig",
    "ACTPolicy",
    "Execution",
    "PolicySpec",
    "TensorSpec",
    "check_policy",
    "ATTENTION_TARGETS",
    "LoRAConfig",
    "LiveCheck",
    "LoRALinear",
    "PolicyConfig",
    "SkillAdapter",
    "Sequencer",
    "SkillManager",
    "VisuomotorPolicy",
    "base_fingerprint",
    "count_parameters",
    "export_skills",
    "inject_lora",
    "load_adapter",
    "load_policy",
    "lora_layers",
    "mark_only_lora_trainable",
    "merge_adapter",
    "remove_adapter",
    "save_adapter",
    "save_policy",
    "set_active_adapter",
    "strip_lora",
    "unmerge",
]
