"""trainserve: train LoRA adapters while a colocated vLLM engine serves the same base weights."""
from trainserve.tiny import tiny_model

__all__ = ["tiny_model"]
__version__ = "0.1.0"
