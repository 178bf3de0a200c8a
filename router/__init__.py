"""lenpred router: an OpenAI-compatible, length-aware front door over SGLang replicas (see README.md)."""
