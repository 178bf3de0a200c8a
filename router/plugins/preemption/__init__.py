"""Preemption plugins: move running requests whose predicted length grew off overloaded replicas."""
