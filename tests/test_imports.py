"""Layering rules, checked in fresh interpreters: the runtime never imports the demo, the CLI, plotting or scripts,
and the deploy-side controller never imports torch."""

from __future__ import annotations

import subprocess
import sys

RUNTIME = ["robolora.skills", "robolora.policy", "robolora.inject", "robolora.lora_mha", "robolora.adapters",
           "robolora.train", "robolora.export", "robolora.evaluate", "robolora.rollout", "robolora.episodes",
           "robolora.policies"]


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"MUJOCO_GL": "egl", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    return set(done.stdout.split())


def test_runtime_modules_import_no_demo_cli_plotting_or_scripts():
    # one interpreter for all: what they import together is a superset of what each imports alone
    modules = imported_after("; ".join(f"import {m}" for m in RUNTIME))
    assert set(RUNTIME) <= modules
    forbidden = {m for m in modules if m in ("robolora.demo", "robolora.cli", "matplotlib")
                 or m.startswith(("scripts", "matplotlib."))}
    assert not forbidden, f"the runtime pulls in {sorted(forbidden)}"


def test_controller_imports_without_torch():
    modules = imported_after("sys.modules['torch'] = None; import robolora.controller")
    assert "robolora.controller" in modules and not any(m.startswith("torch.") for m in modules)
