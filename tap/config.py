"""Tap configuration, read from the environment of each engine process (SGLang spawns its
scheduler processes, so the environment is the one channel that reaches all of them)."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

from lenpred.contract.grpctls import ClientTLS


@dataclass(frozen=True)
class TapConfig:
    enabled: bool = True
    """LENPRED_TAP_ENABLED: 0 turns the tap into a no-op without uninstalling the plugin."""
    sidecar: str = "127.0.0.1:50061"
    """LENPRED_SIDECAR: host:port of the sidecar's gRPC server."""
    pool: bool = True
    """LENPRED_TAP_POOL: 0 skips the entropy-weighted pool (and its per-token entropies): only the
    last prompt token's state is shipped at prefill, and SGLang can run with
    `--return-hidden-states-mode last`. The shipped SmolLM2 heads (last-token prefill head, PLP over
    [h_last ; h_t]) need nothing more."""
    entropy_vocab: int = 16384
    """LENPRED_TAP_ENTROPY_VOCAB: the pool's entropies are computed over the first N token ids of
    the vocabulary (0 = the whole vocabulary, exact): ~8x cheaper on a 128k vocabulary, pooled
    vector at cosine >= 0.997 to the exact one (docs/TAP.md)."""
    every: int = 8
    """LENPRED_TAP_EVERY: ship the decode hidden states of every running request on every k-th
    decode step of the engine (k=1 allowed), so each request is sampled every k tokens."""
    layer: int = -1
    """LENPRED_TAP_LAYER: which layer's states are pooled; -1 = last layer after the final norm."""
    tau: float = 1.0
    """LENPRED_TAP_TAU: entropy softmax temperature."""
    model_id: str = ""
    """LENPRED_MODEL_ID: model id sent to the sidecar to pick heads; default = served model name."""
    queue: int = 1024
    """LENPRED_TAP_QUEUE: max engine steps buffered before the tap drops (and counts) batches."""
    dtype: str = "float16"
    """LENPRED_TAP_DTYPE: wire dtype of vectors: float32, float16 or bfloat16."""
    prefix_store_tokens: int = 65536
    """LENPRED_TAP_PREFIX_TOKENS: prompt tokens whose block summaries are kept (host RAM, LRU) to
    restore radix-cache hits; 0 turns restore off (cached prefixes are then left out of the pool).
    Used only with the pool on and SGLang's radix cache enabled."""
    prefix_block: int = 32
    """LENPRED_TAP_PREFIX_BLOCK: tokens per stored block; a cache hit restores whole blocks, so at
    most block-1 tokens of a cached prefix are left out of the pool."""
    tls_ca: str = ""
    """LENPRED_SIDECAR_TLS_CA: CA bundle (path) that verifies the sidecar; set = TLS on the stream."""
    tls_server_name: str = ""
    """LENPRED_SIDECAR_TLS_SERVER_NAME: name expected in the sidecar's certificate (default: the
    host of LENPRED_SIDECAR)."""
    tls_cert: str = ""
    """LENPRED_SIDECAR_TLS_CERT: client certificate (path) for mTLS; with LENPRED_SIDECAR_TLS_KEY."""
    tls_key: str = ""
    """LENPRED_SIDECAR_TLS_KEY: the client certificate's private key (path)."""

    @property
    def tls(self) -> ClientTLS:
        """The stream's TLS settings (lenpred/contract/grpctls.py); off when none is set."""
        return ClientTLS(self.tls_ca, self.tls_server_name, self.tls_cert, self.tls_key)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "TapConfig":
        env = os.environ if env is None else env
        kw = {}
        names = {"enabled": "LENPRED_TAP_ENABLED", "pool": "LENPRED_TAP_POOL", "sidecar": "LENPRED_SIDECAR", "every": "LENPRED_TAP_EVERY",
                 "layer": "LENPRED_TAP_LAYER", "tau": "LENPRED_TAP_TAU", "model_id": "LENPRED_MODEL_ID",
                 "queue": "LENPRED_TAP_QUEUE", "dtype": "LENPRED_TAP_DTYPE",
                 "prefix_store_tokens": "LENPRED_TAP_PREFIX_TOKENS",
                 "entropy_vocab": "LENPRED_TAP_ENTROPY_VOCAB", "prefix_block": "LENPRED_TAP_PREFIX_BLOCK",
                 "tls_ca": "LENPRED_SIDECAR_TLS_CA", "tls_server_name": "LENPRED_SIDECAR_TLS_SERVER_NAME",
                 "tls_cert": "LENPRED_SIDECAR_TLS_CERT", "tls_key": "LENPRED_SIDECAR_TLS_KEY"}
        for f in fields(cls):
            raw = env.get(names[f.name])
            if raw is None or raw == "":
                continue
            if f.type in ("bool", bool):
                kw[f.name] = raw.strip().lower() not in ("0", "false", "no", "off")
            elif f.type in ("int", int):
                kw[f.name] = int(raw)
            elif f.type in ("float", float):
                kw[f.name] = float(raw)
            else:
                kw[f.name] = raw
        cfg = cls(**kw)
        if cfg.prefix_block < 1:
            raise ValueError(f"LENPRED_TAP_PREFIX_BLOCK must be >= 1, got {cfg.prefix_block}")
        if cfg.entropy_vocab < 0:
            raise ValueError(f"LENPRED_TAP_ENTROPY_VOCAB must be >= 0, got {cfg.entropy_vocab}")
        if cfg.every < 1:
            raise ValueError(f"LENPRED_TAP_EVERY must be >= 1, got {cfg.every}")
        if cfg.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"LENPRED_TAP_DTYPE must be float32, float16 or bfloat16, got {cfg.dtype!r}")
        if cfg.enabled:
            cfg.tls.check()  # missing / unreadable / non-PEM files: TLSConfigError (a ValueError) naming the path
        return cfg
