"""Triton kernels with a torch reference beside each (shipped as ``trainserve.kernels``).

One kernel per module, each with its ``*_reference`` in torch, an autograd Function where training
needs one, and a dispatcher that runs Triton on CUDA tensors and the reference elsewhere (or when
Triton cannot be imported, or ``TRAINSERVE_DISABLE_TRITON=1`` is set):

* :mod:`.rms_norm` - RMSNorm (``rms_norm``).
* :mod:`.rope` - rotary embedding in place on q/k, GQA (``apply_rope``, ``rope_inplace_``).
* :mod:`.swiglu` - ``silu(gate) * up`` and its fused backward (``swiglu``, ``swiglu_backward``).
* :mod:`.swiglu_lora` - the same over a base gate|up product, with the LoRA MLP's rank-r terms added
  inside the kernels (``swiglu_lora_forward``, ``swiglu_lora_backward``; used by ``lora_mlp``).
* :mod:`.fused_linear_ce` - lm_head matmul + cross-entropy, chunked over rows
  (``fused_linear_cross_entropy``).
* :mod:`.nf4` - bitsandbytes-layout NF4 dequantisation and a torch quantiser
  (``dequantize_nf4``, ``quantize_nf4_reference``).
* :mod:`.lora_fused` / :mod:`.lora_params` - LoRA projections with hand-written backward
  (``lora_projections`` for q/k/v and o, ``lora_mlp``, ``get_lora_parameters``).
"""
