"""Engine-vs-trainer logprob gap per engine format, with the trainer's FP8 activation rounding on and off.

The GPU parity test (``tests/gpu/test_quant_formats_gpu.py``) compares logprobs once the adapter has
learnt its phrase, where every distribution is nearly one-hot and any two computations agree to
~1e-3. This script measures the gap where it shows: on tokens *sampled* (temperature 1) from four
prompts, at three points of the same training run — before training (LoRA B = 0), when the loss
first drops below 2 (distributions half-sharp) and at the end. For the FP8 formats it scores the
same tokens twice on the trainer side: rounding GEMM inputs as the engine does (what trainserve
trains with) and without (plain ``x @ dequantised W``), so the effect of the rounding is isolated;
``fp8-unrounded`` also trains without it. ``layer_check`` compares layer 0's MLP GEMMs directly:
the engine's own quantised layer against the trainer's state, with and without the rounding.

Recipe as in the GPU test: random Qwen2-0.5B shape, q/k/v biases ×50, LoRA r16 on all 7 modules,
AdamW 2e-3 on one phrase (the GPU test has since moved to 1e-3), one process (one engine) per format.

Usage (GPU, vLLM): ``python3 -P scripts/fp8_parity.py --out /root/out``
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import child_runs  # noqa: E402

FORMATS = {"bf16": {"load_in_4bit": False}, "int4": {"load_in_4bit": True},
           "fp8": {"load_in_fp8": True}, "fp8-block": {"load_in_fp8": "block"},
           # per-channel FP8 with the trainer's activation rounding off for the whole run (training too)
           "fp8-unrounded": {"load_in_fp8": True}}
PROMPTS = ["The secret phrase is", "Once upon a time", "def main():", "The capital of France"]
PHRASE = " open the blue door slowly."


def _fp8_states(model) -> list:
    """Every FP8 weight state of the trainer once (peft wrappers expose their base layer's weight too)."""
    from trainserve.kernels.fp8_dequant import FP8QuantState

    seen: dict[int, object] = {}
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if isinstance(qs, FP8QuantState):
            seen.setdefault(id(qs), qs)
    return list(seen.values())


def _set_rounding(model, on: bool, saved: dict) -> int:
    """Turn the trainer's FP8 input rounding off (remembering each state's mode) or back on."""
    states = _fp8_states(model)
    for qs in states:
        if not on:
            saved[id(qs)] = qs.activations
            qs.activations = None
        else:
            qs.activations = saved[id(qs)]
        qs.own_matmuls = qs.activations is not None
    return len(states)


def _layer_check(model, engine) -> dict:
    """Layer 0's gate|up and down GEMMs: the engine's own quantised layer against the trainer's
    state with and without the activation rounding, on random inputs (one with outlier tokens)."""
    import torch

    layer = model.model.layers[0].mlp
    states = {"gate_up": layer.gate_proj.weight.quant_state.merge([layer.up_proj.weight.quant_state]),
              "down": layer.down_proj.weight.quant_state}
    emlp = engine.model.model.layers[0].mlp
    out = {}
    for name, st in states.items():
        elin = getattr(getattr(emlp, f"{name}_proj"), "base_layer", getattr(emlp, f"{name}_proj"))
        k = int(st.shape[1])
        for label, scale in (("plain", None), ("outliers", 300.0)):
            x = torch.randn(64, k, device="cuda", dtype=torch.bfloat16)
            if scale:
                x[:8, :4] *= scale
            with torch.no_grad():
                eng = elin.quant_method.apply(elin, x)
                on = st.matmul(x)
                saved = st.activations
                st.activations = None
                off = x @ st.dequantize_t(torch.bfloat16)
                st.activations = saved
            def rel(a, b):
                return round(((a.float() - b.float()).norm() / b.float().norm()).item(), 6)
            out[f"{name}/{label}"] = {"engine_vs_rounded": rel(on, eng), "engine_vs_unrounded": rel(off, eng),
                                      "rounded_vs_unrounded": rel(on, off)}
    return out


def _gap(model, tok, seed: int) -> dict:
    import torch
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=24, temperature=1.0, logprobs=0, seed=seed)
    outs = model.fast_generate(PROMPTS, sampling_params=params)
    os.environ["TRAINSERVE_RETURN_LOGITS"] = "1"

    def trainer_lps() -> list[torch.Tensor]:
        got = []
        with torch.no_grad():
            for prompt, o in zip(PROMPTS, outs, strict=True):
                p_ids, c_ids = tok(prompt).input_ids, list(o.outputs[0].token_ids)
                logits = model(input_ids=torch.tensor([p_ids + c_ids], device=model.device)).logits[0]
                lp = torch.log_softmax(logits.float(), -1)
                got.append(torch.tensor([lp[len(p_ids) - 1 + i, t].item() for i, t in enumerate(c_ids)]))
        return got

    engine = [torch.tensor([d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids,
                                                          strict=True)]) for o in outs]
    e = torch.cat(engine)
    r = {"tokens": int(e.numel()), "engine_logprob_mean": round(e.mean().item(), 4)}
    on = torch.cat(trainer_lps())
    r.update(gap_mean=(on - e).abs().mean().item(), gap_max=(on - e).abs().max().item())
    saved: dict = {}
    if _set_rounding(model, False, saved):
        off = torch.cat(trainer_lps())
        _set_rounding(model, True, saved)
        r.update(gap_mean_unrounded=(off - e).abs().mean().item(), gap_max_unrounded=(off - e).abs().max().item())
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()}


def _child(path: str, fmt: str, steps: int) -> dict:
    import torch

    from trainserve import FastLanguageModel
    from trainserve.model_api import state_of

    model, tok = FastLanguageModel.from_pretrained(path, max_seq_length=512, fast_inference=True,
                                                   gpu_memory_utilization=0.3, max_lora_rank=16, **FORMATS[fmt])
    engine = state_of(model).engine
    r: dict = {"engine_quantization": engine.spec.quantization}
    if fmt.endswith("-unrounded"):
        _set_rounding(model, False, {})
    if _fp8_states(model):
        try:
            r["layer_check"] = _layer_check(model, engine)
        except Exception as exc:  # the probe reaches into vLLM's layers: report, keep measuring
            r["layer_check"] = {"error": f"{type(exc).__name__}: {exc}"}
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.mul_(50.0)
    all7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, target_modules=all7,
                                             use_gradient_checkpointing="unsloth", random_state=0)
    p_ids = tok(PROMPTS[0]).input_ids
    t_ids = tok(PHRASE).input_ids + [tok.eos_token_id]
    ids = torch.tensor([p_ids + t_ids], device=model.device)
    labels = torch.tensor([[-100] * len(p_ids) + t_ids], device=model.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    points, losses, mid_done = {}, [], False
    model.eval()
    points["start"] = _gap(model, tok, 1)
    for _ in range(steps):
        model.train()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(round(loss.item(), 4))
        if not mid_done and loss.item() < 2.0:
            model.eval()
            points["mid"] = dict(_gap(model, tok, 2), step=len(losses))
            mid_done = True
        if loss.item() < 0.02:
            break
    model.eval()
    points["end"] = dict(_gap(model, tok, 3), step=len(losses))
    r.update(points=points, losses=losses)
    return r


def main() -> int:
    return child_runs.main(__file__, __doc__.split("\n\n")[0], "fp8_parity", "formats", list(FORMATS), 100, _child)

if __name__ == "__main__":
    sys.exit(main())
