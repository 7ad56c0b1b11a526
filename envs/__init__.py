"""MuJoCo tabletop tasks and their scripted experts (installed as ``robolora.envs``)."""
