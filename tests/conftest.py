"""Shared test set-up: headless MuJoCo rendering through EGL, chosen before anything imports mujoco."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
