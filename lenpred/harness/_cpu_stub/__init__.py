"""DEV/TEST ONLY: holds the sitecustomize.py that lenpred.harness.engine puts on PYTHONPATH (see it)."""
