"""Scoring plugins: rate each candidate replica in [0, 1] for one request."""
