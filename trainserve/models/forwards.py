"""The patched training forwards shared by every architecture (Llama layout), as named functions.

:class:`trainserve.models.base.FastBaseModel` installs them per instance (``types.MethodType``; the
transformers classes are never touched). The fast path runs when the model forward starts it: it
passes an :class:`~trainserve.models.attention.AttnSpec` down as the attention mask; a layer called
any other way (generation with a KV cache, ``output_attentions``...) runs transformers' own
forward. Projections go through the fused LoRA kernels when :func:`get_lora_parameters` allows
(peft ``LoraLayer``s are recognised at call time, so patching before ``get_peft_model`` works);
otherwise the module is called as usual.

With ``labels`` the head computes the loss with the chunked fused linear cross-entropy and returns
``logits=None``; set ``TRAINSERVE_RETURN_LOGITS=1`` or ``model.trainserve_return_logits = True``
(on the causal-LM module) to get transformers' logits and loss instead. Without labels the logits
come back as usual (``logits_to_keep`` honoured).

Checkpointing (``use_gradient_checkpointing``): ``"unsloth"`` checkpoints each decoder layer and
parks its input in pinned host memory (:mod:`trainserve.models.checkpointing`), ``True`` is plain
per-layer checkpointing, ``False`` none - then the MLP recomputes its gate|up activation in its
own backward instead of saving it, except where a keep budget allows (:mod:`.mlp_memory`).
"""

from __future__ import annotations

import functools
import os
import types
from typing import Any

import torch
from torch import nn

from trainserve.kernels.fused_linear_ce import causal_lm_shift_labels, fused_linear_cross_entropy
from trainserve.kernels.lora_fused import get_lora_parameters, lora_mlp, lora_projections
from trainserve.kernels.rms_norm import rms_norm
from trainserve.kernels.rope import apply_rope
from trainserve.models.attention import AttnSpec, attention, build_attn_spec
from trainserve.models.checkpointing import checkpoint_layer
from trainserve.models.mlp_memory import decide_recompute
from trainserve.models.shared_prefix import plan_shared_prefix

_STATIC_ROPE = {"default", "linear", "llama3", "yarn"}
_FLASH_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _original(self: nn.Module) -> Any:
    """The class's own forward bound to ``self`` (what transformers would run)."""
    return types.MethodType(type(self).forward, self)


def fast_rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """transformers' RMSNorm through the fused kernel (same fp32 statistics)."""
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def fast_rotary_forward(self: nn.Module, x: torch.Tensor, position_ids: torch.Tensor):
    """cos/sin like transformers (fp32 angles, cast to x's dtype); dynamic RoPE types defer."""
    if getattr(self, "rope_type", "default") not in _STATIC_ROPE:
        return _original(self)(x, position_ids)
    inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float32)
    freqs = position_ids[..., None].to(torch.float32) * inv_freq
    cos = freqs.cos() * self.attention_scaling
    sin = freqs.sin() * self.attention_scaling
    return torch.cat((cos, cos), dim=-1).to(x.dtype), torch.cat((sin, sin), dim=-1).to(x.dtype)


def fast_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU MLP through the fused LoRA MLP kernel when all three projections allow it."""
    act = getattr(getattr(self, "config", None), "hidden_act", "silu")
    if act in ("silu", "swish"):
        ps = [get_lora_parameters(self.gate_proj), get_lora_parameters(self.up_proj),
              get_lora_parameters(self.down_proj)]
        if all(p is not None for p in ps):
            recompute = torch.is_grad_enabled() and decide_recompute(
                self, x, ps[0].out_features + ps[1].out_features, ps[0].compute_dtype)
            return lora_mlp(x, *ps, recompute=recompute)
    return _original(self)(x)


def fast_attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: Any = None,
    past_key_values: Any = None,
    **kwargs: Any,
):
    """q/k/v (fused LoRA projections when allowed), per-head q/k RMSNorm when the module has
    ``q_norm``/``k_norm`` (Qwen3: normalised before RoPE, as transformers and vLLM do), RoPE,
    trainserve's attention, o_proj."""
    if not isinstance(attention_mask, AttnSpec) or past_key_values is not None:
        return _original(self)(
            hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
            past_key_values=past_key_values, **kwargs,
        )
    bsz, seq, _ = hidden_states.shape
    dim = self.head_dim
    projs = (self.q_proj, self.k_proj, self.v_proj)
    ps = [get_lora_parameters(m) for m in projs]
    cos, sin = position_embeddings
    q_norm, k_norm = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
    qk_norm = q_norm is not None and k_norm is not None
    if all(p is not None for p in ps):  # without q/k norms the rope is applied inside
        q, k, v = lora_projections(hidden_states, ps, rope=None if qk_norm else (cos, sin, dim))
        q, k, v = q.view(bsz, seq, -1, dim), k.view(bsz, seq, -1, dim), v.view(bsz, seq, -1, dim)
        rotated = not qk_norm
    else:
        q, k, v = (m(hidden_states).view(bsz, seq, -1, dim) for m in projs)
        rotated = False
    if qk_norm:  # cloned: the CUDA RoPE rotates in place, and the RMSNorm kernel returns a view
        q, k = q_norm(q).clone(), k_norm(k).clone()
    if not rotated:
        q, k = apply_rope(q, k, cos, sin)
    dropout = self.attention_dropout if self.training else 0.0
    out = attention(q, k, v, attention_mask, self.scaling, dropout)
    po = get_lora_parameters(self.o_proj)
    out = lora_projections(out, [po])[0] if po is not None else self.o_proj(out)
    return out, None


def fast_decoder_layer_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: Any = None,
    position_ids: torch.Tensor | None = None,
    past_key_values: Any = None,
    use_cache: bool | None = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    if not isinstance(attention_mask, AttnSpec) or past_key_values is not None:
        return _original(self)(
            hidden_states, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache, position_embeddings=position_embeddings,
            **kwargs,
        )
    residual = hidden_states
    h = self.input_layernorm(hidden_states)
    h, _ = self.self_attn(
        hidden_states=h, position_embeddings=position_embeddings, attention_mask=attention_mask
    )
    h = residual + h
    residual = h
    h = self.post_attention_layernorm(h)
    h = self.mlp(h)
    return residual + h


def layer_kinds(config: Any) -> list[str]:
    """The attention kind of each decoder layer, as transformers decides it: ``config.layer_types``
    (Qwen2, Qwen3); without it, every layer is ``"sliding_attention"`` when the config has a
    ``sliding_window`` (Mistral: ``MistralModel`` builds a sliding-window mask for all layers), else
    ``"full_attention"`` (Llama)."""
    n = config.num_hidden_layers
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return list(kinds)
    return ["sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"] * n


def _run_layer(layer: nn.Module, hidden: torch.Tensor, spec: AttnSpec, pos_emb: tuple, position_ids: Any):
    # nn.Module.__call__ keeps hooks but skips GradientCheckpointingLayer's own checkpointing:
    # checkpointing is ours (checkpoint_layer).
    out = nn.Module.__call__(layer, hidden, attention_mask=spec, position_ids=position_ids,
                             position_embeddings=pos_emb)
    return out[0] if isinstance(out, tuple) else out


def fast_model_forward(
    self: nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_values: Any = None,
    inputs_embeds: torch.Tensor | None = None,
    use_cache: bool | None = None,
    **kwargs: Any,
):
    from transformers.modeling_outputs import BaseModelOutputWithPast

    if (
        past_key_values is not None
        or (use_cache and not self.training)
        or kwargs.get("output_attentions")
        or kwargs.get("output_hidden_states")
        or isinstance(attention_mask, dict)
    ):
        return _original(self)(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    flash_kwargs = {k: kwargs[k] for k in _FLASH_KWARGS if kwargs.get(k) is not None}
    config = self.config
    layer_types = layer_kinds(config)
    plan, run_stats = None, None
    if _may_share_prefix(self, input_ids, attention_mask, position_ids, flash_kwargs, layer_types):
        plan, run_stats = plan_shared_prefix(input_ids, attention_mask)
    if plan is not None:  # rows' common prefixes computed once (trainserve.models.shared_prefix)
        hidden = self.embed_tokens(plan.pack(input_ids))
        position_ids = plan.positions
        specs = dict.fromkeys(set(layer_types), plan.spec)
    else:
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        bsz, seq = hidden.shape[:2]
        given_positions = position_ids is not None
        if position_ids is None:
            position_ids = torch.arange(seq, device=hidden.device)[None]
        specs: dict[str, AttnSpec] = {}
        for lt in set(layer_types):
            window = getattr(config, "sliding_window", None) if lt == "sliding_attention" else None
            specs[lt] = build_attn_spec(
                attention_mask, position_ids if given_positions else None, bsz, seq, hidden.device,
                window, flash_kwargs, run_stats,
            )
    pos_emb = self.rotary_emb(hidden, position_ids)
    mode = getattr(self, "_trainserve_gc", False) if (self.training and torch.is_grad_enabled()) else False
    if torch.is_grad_enabled() and (budget := getattr(self, "_trainserve_keep", None)) is not None:
        budget.reset()  # a new micro-batch: the last one's saved activations were freed by its backward
    chain: list = []
    for i, layer in enumerate(self.layers[: config.num_hidden_layers]):
        run = functools.partial(_run_layer, layer)
        hidden = checkpoint_layer(mode, run, chain, hidden, specs[layer_types[i]], pos_emb, position_ids)
    hidden = self.norm(hidden)
    if plan is not None:
        hidden = plan.unpack(hidden)
    return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=None)


def _may_share_prefix(
    model: nn.Module, input_ids: Any, attention_mask: Any, position_ids: Any, flash_kwargs: dict,
    layer_types: list[str],
) -> bool:
    """Whether sharing prefixes cannot change this forward's result (see the module it lives in)."""
    config = model.config
    return (
        input_ids is not None and input_ids.dim() == 2 and input_ids.shape[0] > 1
        and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
        and position_ids is None and not flash_kwargs
        and (getattr(config, "sliding_window", None) is None
             or all(lt != "sliding_attention" for lt in layer_types)
             or config.sliding_window >= input_ids.shape[1])
        and not (model.training and float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0.0)
    )


def _return_logits(self: nn.Module) -> bool:
    flag = os.environ.get("TRAINSERVE_RETURN_LOGITS", "0") not in ("", "0", "false", "False")
    return flag or bool(getattr(self, "trainserve_return_logits", False))


def fast_causal_lm_forward(
    self: nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_values: Any = None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    use_cache: bool | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    **kwargs: Any,
):
    """transformers' causal-LM forward; with labels the loss is the fused, chunked CE and
    ``logits`` is None (unless logits are forced, see the module docstring)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return_dict = kwargs.pop("return_dict", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    outputs = self.model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
    )
    hidden = outputs.last_hidden_state
    head = self.lm_head
    want_loss = labels is not None or shift_labels is not None
    fused = (
        want_loss and not _return_logits(self) and isinstance(logits_to_keep, int) and logits_to_keep == 0
        and type(head) is nn.Linear and not head._forward_hooks and not head._forward_pre_hooks
    )
    loss = logits = None
    if fused:
        if shift_labels is None:
            shift_labels = causal_lm_shift_labels(labels, ignore_index)
        loss = fused_linear_cross_entropy(
            hidden, head.weight, shift_labels.to(hidden.device), bias=head.bias, ignore_index=ignore_index,
            num_items_in_batch=num_items,
        )
    else:
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = head(hidden[:, slice_indices, :])
        if want_loss:
            extra = {"shift_labels": shift_labels} if shift_labels is not None else {}
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                num_items_in_batch=num_items, ignore_index=ignore_index, **extra,
            )
    out = CausalLMOutputWithPast(
        loss=loss, logits=logits, past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states, attentions=outputs.attentions,
    )
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return out if return_dict else out.to_tuple()




ROLE_FORWARDS: dict[str, Any] = {
    "causal_lm": fast_causal_lm_forward,
    "model": fast_model_forward,
    "decoder_layer": fast_decoder_layer_forward,
    "attention": fast_attention_forward,
    "mlp": fast_mlp_forward,
    "rms_norm": fast_rms_norm_forward,
    "rotary": fast_rotary_forward,
}
"""role (see :meth:`trainserve.models.base.FastBaseModel.module_classes`) -> the forward installed."""
