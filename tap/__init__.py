"""The engine-side tap: pooling maths and the non-blocking sender (engine-independent),
plus engine adapters (sglang_plugin)."""
