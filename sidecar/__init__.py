"""The sidecar: a gRPC service hosting EGTP/PLP length heads, writing predictions to Redis."""
