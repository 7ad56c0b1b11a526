"""Visuomotor transformer policy and shipped checkpoints (installed as ``robolora.policies``)."""
