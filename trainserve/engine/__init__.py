"""The colocated vLLM engine: one loop, shared base weights, a live LoRA adapter."""
