"""DEV/TEST ONLY: holds the sitecustomize.py that lenpred.engine puts on PYTHONPATH (see it)."""
