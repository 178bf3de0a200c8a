"""Online-learning settings (one typed model; `lenpred sidecar --learn-dir DIR` turns learning on)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LearnConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dir: str
    """Store root: one folder per model (segments, heads, serving.json, state.json, control.json)."""
    min_finished: int = Field(500, ge=10)
    """Cold start: the first head is trained once this many finished requests are recorded."""
    retrain_every: int = Field(500, ge=10)
    """Retrain after this many new finished requests..."""
    retrain_interval_s: float = Field(900.0, gt=0)
    """...or after this long, when anything new arrived."""
    max_requests: int = Field(20_000, ge=100)
    """Disk bound per model: the oldest segments are deleted beyond this many requests."""
    max_inflight: int = Field(20_000, ge=10)
    """Memory bound: requests waiting for their finished event (oldest dropped first); each holds
    its prompt vectors and kept decode states (d=4096: ~8 KB + 8 KB per kept step)."""
    queue: int = Field(4096, ge=10)
    """Hook calls buffered for the recorder thread (each holds one message's rows); beyond it
    calls are dropped and counted."""
    segment_requests: int = Field(256, ge=1)
    """A segment file is written per this many finished requests..."""
    flush_s: float = Field(5.0, gt=0)
    """...or after this long, whichever comes first (the learner sees fresh data)."""
    keep_steps: list[int] = Field(default_factory=lambda: [8, 16, 32, 64, 128, 256, 384, 512, 768, 1024])
    """Decode steps whose states are stored (PLP training rows); others are dropped on arrival."""
    default_cap: int = Field(2048, ge=1)
    """Output cap assumed when a request's max_new_tokens is unknown."""
    split_seed: int = 0
    split_frac: tuple[float, float, float] = (0.7, 0.15, 0.15)
    simhash_bits: int = Field(0, ge=0, le=32)
    """Split group = prompt tokens + this many sign bits of the last prompt state (see split.py)."""
    coverage_band: tuple[float, float] = (0.85, 0.95)
    """A candidate is promoted only if its p90 coverage on the test slice lies in this band."""
    calib_window: int = Field(400, ge=20)
    """Quantile recalibration: the most recent finished requests the serving head never saw."""
    calib_every: int = Field(50, ge=1)
    """Recalibrate after this many new finished requests."""
    epochs: int = Field(40, ge=1)
    plp_epochs: int = Field(25, ge=1)
    threads: int = Field(1, ge=1)
    """torch threads of the learner process (its own budget, apart from the sidecar's)."""
    learner_nice: int = Field(10, ge=0, le=19)
    """The learner process runs at this nice level, so training yields the CPU to ingest."""
    poll_s: float = Field(1.0, gt=0)
    """How often the learner looks for new data and the sidecar for new heads/calibration."""
    live_window: int = Field(500, ge=10)
    """Finished requests behind the live MAE / coverage gauges."""
    reference_heads: list[str] = Field(default_factory=list)
    """Head folders the sidecar loaded (shipped heads): a model that has one is served by it until
    a learned candidate beats it on the live test slice (the sidecar fills this in)."""
    spawn_learner: bool = True
    """Start the learner process with the sidecar (False: run `lenpred learn run` yourself)."""

    @model_validator(mode="after")
    def _check(self):
        if abs(sum(self.split_frac) - 1) > 1e-6 or min(self.split_frac) <= 0:
            raise ValueError(f"split_frac must be three positive fractions summing to 1, got {self.split_frac}")
        lo, hi = self.coverage_band
        if not 0 < lo < hi <= 1:
            raise ValueError(f"coverage_band must satisfy 0 < lo < hi <= 1, got {self.coverage_band}")
        return self
