"""Ordering plugins: the order of the router queue and the SGLang `priority` sent along."""
