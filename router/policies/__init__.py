"""Example router policies, shipped as package data (`default.yaml` is the packaged default)."""
