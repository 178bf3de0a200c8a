"""Picking plugins: choose one replica from the weighted total scores."""
