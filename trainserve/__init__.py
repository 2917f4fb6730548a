"""trainserve: train LoRA adapters while a colocated vLLM engine serves the same base weights.

``FastLanguageModel.from_pretrained(..., fast_inference=True)`` starts the process's vLLM engine
and builds the training model around its tensors; ``model.fast_generate`` generates with the
adapter as the trainer has it now. ``SamplingParams`` and ``LoRARequest`` are vLLM's own.
"""

from trainserve._env import apply_env_defaults

apply_env_defaults()

__all__ = ["FastLanguageModel", "FastLlamaModel", "FastMistralModel", "FastQwen2Model", "FastQwen3Model",
           "GRPOTrainer", "LoRARequest", "SamplingParams", "add_new_tokens", "shutdown_engine", "tiny_model"]
__version__ = "0.1.0"
_ARCHITECTURE_CLASSES = ("FastLlamaModel", "FastMistralModel", "FastQwen2Model", "FastQwen3Model")


def shutdown_engine() -> None:
    """Stop the process's vLLM engine (see :func:`trainserve.engine.launch.shutdown_engine`)."""
    from trainserve.engine.launch import shutdown_engine as _shutdown

    _shutdown()


def __getattr__(name: str):
    # torch and the loader are imported on first use, so the ``trainserve`` command can say what it
    # is doing (and answer --help) before they load.
    if name == "FastLanguageModel":
        from trainserve.loader import FastLanguageModel

        return FastLanguageModel
    if name == "add_new_tokens":  # Unsloth's helper: new tokens in tokenizer and model (trainserve.vocab)
        from trainserve.vocab import add_new_tokens

        return add_new_tokens
    if name == "tiny_model":
        from trainserve.tiny import tiny_model

        return tiny_model
    # vLLM is imported lazily: it is slow to import and not needed for fast_inference=False.
    if name == "SamplingParams":
        from vllm import SamplingParams

        return SamplingParams
    if name == "GRPOTrainer":
        from trainserve.rl.trainer import GRPOTrainer

        return GRPOTrainer
    if name in _ARCHITECTURE_CLASSES:  # lazy: they import the training kernels
        from trainserve import fast_models

        return getattr(fast_models, name)
    if name == "LoRARequest":
        from vllm.lora.request import LoRARequest

        return LoRARequest
    raise AttributeError(f"module 'trainserve' has no attribute {name!r}")
