"""robolora: robot skills as LoRA adapters on a frozen visuomotor transformer policy.

One distribution, one import package. The repository's top-level folders ``envs/`` and ``policies/`` are
installed as the subpackages ``robolora.envs`` and ``robolora.policies`` through setuptools' ``package-dir``
mapping (see ``pyproject.toml`` and DESIGN.md §2), so nothing named ``envs`` or ``policies`` lands in
site-packages.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
