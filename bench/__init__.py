"""Benchmarks and the SGLang emulator (`lenpred.bench.*`)."""
