"""Built-in plugin implementations, one module per type, grouped by stage."""
