"""Why did per-channel FP8 fail the GPU learning test while 128×128 block FP8 passed?

Runs the recipe of ``tests/gpu/test_quant_formats_gpu.py`` (random Qwen2-0.5B shape, q/k/v biases
×50, LoRA r16 on all 7 modules, AdamW 2e-3 on one phrase) once per FP8 scale layout, each in its own
process (one engine per process), and records what could explain a curve that does not fall:

- ``weight_rel_err``: the trainer's dequantised weight against the bf16 checkpoint, per projection
  of layer 0 — FP8 bytes quantised from the wrong memory would show here (expected ~0.02–0.04);
- ``bytes_same_after_training`` / ``engine_ptrs_same``: checksums of the FP8 bytes and scales the
  trainer reads, and the engine layers' data pointers, before training and after the last generation
  — memory unmapped and mapped again (standby) or replaced by vLLM would change them;
- ``backward_rel_err``: ``packed_linear``'s input gradient against plain autograd on the same
  dequantised weight, on the engine's own tensors;
- ``losses`` (every step) and ``lora_grad_norm`` (first step, by projection);
- the engine-vs-trainer logprob gap and whether the phrase was learnt.

``--layouts`` picks the vLLM online FP8 methods; ``channel-nostandby`` is per-channel with
``standby=False``. The script sets the engine quantization of ``load_in_fp8=True`` per layout.

Superseded in part (2026-12-01): its engine-vs-trainer gap compares layouts at different points of
training (one mid-spike, one converged), which made per-channel look 250× worse than block.
``scripts/fp8_parity.py`` measures the gap on sampled tokens at fixed points and isolates the
trainer's activation rounding; per-channel is now ``load_in_fp8=True``.

Usage (GPU, vLLM): ``python3 -P scripts/diagnose_fp8_scales.py --out /root/out``
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import child_runs  # noqa: E402

LAYOUTS = {"block": ("fp8_per_block", True), "channel": ("fp8_per_channel", True),
           "channel-nostandby": ("fp8_per_channel", False)}


def _child(path: str, quantization: str, standby: bool, steps: int) -> dict:
    from unittest import mock

    import torch
    from safetensors import safe_open
    from trainserve.kernels.packed_state import packed_linear, packed_linear_reference
    from vllm import SamplingParams

    import trainserve.precision as precision
    from trainserve import FastLanguageModel
    from trainserve.model_api import state_of

    r: dict = {"quantization": quantization, "standby": standby}
    # the diagnosis needs the engine format trainserve does not offer: swap it for this process only
    with mock.patch.dict(precision._ENGINE, {"fp8": quantization}):  # noqa: SLF001
        model, tok = FastLanguageModel.from_pretrained(path, max_seq_length=512, fast_inference=True,
                                                       gpu_memory_utilization=0.3, max_lora_rank=16,
                                                       load_in_fp8=True, standby=standby)
    engine = state_of(model).engine
    r["engine_quantization"] = engine.spec.quantization
    layer0 = model.model.layers[0]
    projs = {"q": layer0.self_attn.q_proj, "k": layer0.self_attn.k_proj, "v": layer0.self_attn.v_proj,
             "o": layer0.self_attn.o_proj, "gate": layer0.mlp.gate_proj, "up": layer0.mlp.up_proj,
             "down": layer0.mlp.down_proj}
    packed = hasattr(projs["q"], "quant_state")  # False on CPU (16-bit load): a dry run of the recipe
    r["scale_kind"] = projs["q"].quant_state.kind if packed else None
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    errs = {}
    with safe_open(str(Path(path) / "model.safetensors"), "pt", device=str(model.device)) as f:
        for key, proj in projs.items():
            ref = f.get_tensor(f"model.layers.0.{names[key]}.weight").float()
            got = (proj.quant_state.dequantize_t(torch.bfloat16).t() if packed else proj.weight).float()
            errs[key] = round(((got - ref).norm() / ref.norm()).item(), 5)
    r["weight_rel_err"] = errs

    # the FP8 bytes and scales the trainer reads (views of the engine's memory), every layer
    viewed = [t for layer in model.model.layers for proj in (layer.self_attn.q_proj, layer.mlp.down_proj)
              for t in (proj.quant_state.tensors() if packed else [proj.weight])]

    def checksums() -> list[int]:
        return [int(t.contiguous().view(torch.uint8).to(torch.int64).sum().item()) for t in viewed]

    def engine_ptrs() -> list[int]:
        return [p.data_ptr() for n, p in engine.model.named_parameters() if "weight" in n]

    if packed:
        g = torch.Generator(device="cuda").manual_seed(0)
        state = projs["down"].quant_state
        x = torch.randn(64, state.shape[1], device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        gy = torch.randn(64, state.shape[0], device="cuda", dtype=torch.bfloat16, generator=g)
        (gx_fast,) = torch.autograd.grad(packed_linear(x, state), x, gy)
        (gx_ref,) = torch.autograd.grad(packed_linear_reference(x, state), x, gy)
        r["backward_rel_err"] = ((gx_fast.float() - gx_ref.float()).norm() / gx_ref.float().norm()).item()

    with torch.no_grad():  # the test's recipe: real Qwen2 q/k/v biases are large
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.mul_(50.0)
    sums0, ptrs0 = checksums(), engine_ptrs()
    all7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, target_modules=all7,
                                             use_gradient_checkpointing="unsloth", random_state=0)
    prompt, target = "The secret phrase is", " open the blue door slowly."
    p_ids, t_ids = tok(prompt).input_ids, tok(target).input_ids + [tok.eos_token_id]
    ids = torch.tensor([p_ids + t_ids], device=model.device)
    labels = torch.tensor([[-100] * len(p_ids) + t_ids], device=model.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    losses, grad_norms = [], {}
    for step in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                if p.grad is not None:
                    key = next((m for m in all7 if m in n), "other") + (".A" if "lora_A" in n else ".B")
                    grad_norms[key] = grad_norms.get(key, 0.0) + p.grad.float().norm().item() ** 2
        opt.step()
        opt.zero_grad()
        losses.append(round(loss.item(), 4))
    r["losses"] = losses
    r["lora_grad_norm"] = {k: round(v ** 0.5, 6) for k, v in sorted(grad_norms.items())}
    model.eval()
    greedy = SamplingParams(max_tokens=len(t_ids), temperature=0, logprobs=0)
    out = model.fast_generate([prompt], sampling_params=greedy)[0].outputs[0]
    os.environ["TRAINSERVE_RETURN_LOGITS"] = "1"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p_ids + list(out.token_ids)], device=model.device)).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    trainer = torch.tensor([lp[len(p_ids) - 1 + i, t].item() for i, t in enumerate(out.token_ids)])
    engine_lp = torch.tensor([d[t].logprob for d, t in zip(out.logprobs, out.token_ids, strict=True)])
    r.update(learnt=list(out.token_ids)[: len(t_ids) - 1] == t_ids[:-1],
             gap_max=(trainer - engine_lp).abs().max().item(),
             bytes_same_after_training=checksums() == sums0, engine_ptrs_same=engine_ptrs() == ptrs0)
    with torch.no_grad():  # the trainer's own view of the phrase, independent of the engine's greedy pick
        lp_t = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        r["trainer_logprob_of_target_mean"] = sum(lp_t[len(p_ids) - 1 + i, t].item()
                                                  for i, t in enumerate(t_ids)) / len(t_ids)
    return r


def _layout_child(path: str, layout: str, steps: int) -> dict:
    quantization, standby = LAYOUTS[layout]
    return _child(path, quantization, standby, steps)


def main() -> int:
    return child_runs.main(__file__, __doc__.split("\n\n")[0], "diagnose_fp8_scales", "layouts", list(LAYOUTS), 60,
                           _layout_child)

if __name__ == "__main__":
    sys.exit(main())
