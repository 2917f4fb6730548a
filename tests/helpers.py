"""Small training helpers shared by the engine tests."""

from __future__ import annotations

import torch


def sft_batch(tokenizer, prompt: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and labels that teach ``prompt`` → ``target`` + EOS (prompt tokens masked)."""
    p_ids = tokenizer(prompt).input_ids
    t_ids = tokenizer(target).input_ids + [tokenizer.eos_token_id]
    ids = torch.tensor([p_ids + t_ids])
    labels = torch.tensor([[-100] * len(p_ids) + t_ids])
    return ids, labels


def sft(model, tokenizer, prompt: str, target: str, steps: int = 30, lr: float = 3e-3, optimizer=None):
    """Train the adapter on one pair; returns (optimizer, final loss)."""
    ids, labels = sft_batch(tokenizer, prompt, target)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.AdamW(params, lr=lr)
    model.train()
    loss = None
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return opt, float(loss.detach())


def greedy(n: int = 12):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0)


def engine_tokens(model, prompt, n: int = 12, **kwargs) -> list[int]:
    return list(model.fast_generate([prompt], sampling_params=greedy(n), **kwargs)[0].outputs[0].token_ids)


def hf_tokens(model, tokenizer, prompt: str, n: int = 12) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def prompt_logprob_gap(model, tokenizer, text: str) -> float:
    """Max |engine − trainer| logprob over the prompt tokens of ``text`` (the live adapter on both)."""
    from vllm import SamplingParams

    ids = tokenizer(text).input_ids
    out = model.fast_generate([ids], sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    engine = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return max(abs(a - logp[i, t].item()) for i, (a, t) in enumerate(zip(engine, ids[1:], strict=True)))


def train_and_check_live(model, tokenizer, prompt: str, target: str, targets: list[str], gap_text: str,
                         gap: float = 1e-3):
    """Wrap ``model`` with LoRA on ``targets``, teach it ``prompt`` → ``target``, then check that the
    engine's greedy tokens learnt it and equal the trainer's, and that logprobs agree within ``gap``."""
    from trainserve import FastLanguageModel

    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=targets, random_state=3407)
    _, loss = sft(model, tokenizer, prompt, target, steps=30)
    assert loss < 0.2
    live = engine_tokens(model, prompt)
    want = tokenizer(target).input_ids
    assert live[: len(want)] == want and live == hf_tokens(model, tokenizer, prompt)
    assert prompt_logprob_gap(model, tokenizer, gap_text) < gap
    return model


def peft_with_nonzero_b(model, targets: list[str], dropout: float = 0.0):
    """peft LoRA (r=8, alpha=16) on ``targets`` with seeded, non-zero B matrices, so that every LoRA
    gradient is exercised (peft starts B at zero, which leaves A's gradient zero)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=dropout))
    g = torch.Generator().manual_seed(5)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data.copy_(0.05 * torch.randn(p.shape, generator=g))
    return pm
