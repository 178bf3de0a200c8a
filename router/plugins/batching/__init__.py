"""Batchers: group a known set of requests into micro-batches and assign them to replicas."""
