"""lenpred: output-length prediction from the serving model's own hidden states."""

__version__ = "0.1.0"
