"""Cross-entropy fused with the lm_head matmul, chunked over rows.

Full-vocabulary logits (151,936 wide for Qwen2) never exist at once: rows are processed in
chunks of ``chunk_size``; each chunk's logits are computed with one matmul, a row-wise kernel
turns them into the per-row loss and writes ``(softmax - onehot) * scale`` over the same buffer,
and two more matmuls turn that into the chunk's ``d hidden`` (and ``d weight`` if it needs one).
The gradients are therefore ready when the forward returns; the backward only scales them by the
incoming gradient. Semantics follow transformers' ``ForCausalLMLoss``: logits upcast to fp32 for
the loss, ``ignore_index`` rows contribute nothing, the sum is divided by ``num_items_in_batch``
when given and by the number of counted rows otherwise (so a batch with no counted row gives NaN,
as transformers does; its gradients are zero).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from trainserve.kernels._triton_utils import HAS_TRITON, tl, triton, use_triton

DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Materialises the logits: ``cross_entropy(linear(hidden).float(), labels)``."""
    logits = F.linear(hidden, weight, bias).float()
    red = "sum" if (num_items_in_batch is not None or reduction == "sum") else "mean"
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index, reduction=red
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _ce_chunk_torch(
    logits: torch.Tensor, labels: torch.Tensor, loss_out: torch.Tensor, scale: torch.Tensor,
    ignore_index: int, compute_grad: bool,
) -> None:
    """Torch version of the row kernel: loss rows into ``loss_out``, grads over ``logits``."""
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    target = lf.gather(1, safe[:, None]).squeeze(1)
    loss_out.copy_(torch.where(valid, lse - target, torch.zeros_like(lse)))
    if compute_grad:
        grad = torch.exp(lf - lse[:, None])
        grad.scatter_add_(1, safe[:, None], -torch.ones_like(target)[:, None])
        grad.mul_((valid.to(grad.dtype) * scale)[:, None])
        logits.copy_(grad)


if HAS_TRITON:

    @triton.jit
    def _ce_rows_kernel(
        LOGITS, stride_row, LABELS, LOSS, SCALE, n_cols, ignore_index,
        COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        ptr = LOGITS + row * stride_row
        label = tl.load(LABELS + row).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = tl.zeros([], dtype=tl.float32) - float("inf")
        d = tl.zeros([], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            x = tl.load(ptr + offs, mask=offs < n_cols, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        valid = (label != ignore_index) & (label >= 0) & (label < n_cols)
        x_label = tl.load(ptr + label, mask=valid, other=0.0).to(tl.float32)
        tl.store(LOSS + row, tl.where(valid, lse - x_label, 0.0))
        if COMPUTE_GRAD:
            s = tl.where(valid, tl.load(SCALE), 0.0)
            for start in range(0, n_cols, BLOCK):
                offs = start + cols
                mask = offs < n_cols
                x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) * s
                g = tl.where(offs == label, g - s, g)
                tl.store(ptr + offs, g.to(LOGITS.dtype.element_ty), mask=mask)


def _ce_chunk_triton(
    logits: torch.Tensor, labels: torch.Tensor, loss_out: torch.Tensor, scale: torch.Tensor,
    ignore_index: int, compute_grad: bool,
) -> None:
    n_rows, n_cols = logits.shape
    if n_rows:
        _ce_rows_kernel[(n_rows,)](
            logits, logits.stride(0), labels, loss_out, scale, n_cols, ignore_index,
            COMPUTE_GRAD=compute_grad, BLOCK=4096, num_warps=8,
        )


def default_chunk_size(n_rows: int, vocab: int, elem_bytes: int) -> int:
    """Rows per chunk so one chunk's logits take about ``TRAINSERVE_CE_CHUNK_BYTES`` (256 MiB)."""
    budget = int(os.environ.get("TRAINSERVE_CE_CHUNK_BYTES", DEFAULT_CHUNK_BYTES))
    rows = max(1, budget // max(1, vocab * elem_bytes))
    if rows >= 256:
        rows = rows // 128 * 128
    return max(1, min(n_rows, rows))


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Loss in the forward, gradients computed alongside; the backward only rescales them."""

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
        divisor: torch.Tensor, ignore_index: int, chunk_size: int, triton_rows: bool,
    ) -> torch.Tensor:
        n_rows = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        compute_grad = need_h or need_w or need_b
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        loss_rows = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        scale = (1.0 / divisor).to(torch.float32)
        rows_fn = _ce_chunk_triton if triton_rows else _ce_chunk_torch
        w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
        for start in range(0, n_rows, chunk_size):
            end = min(n_rows, start + chunk_size)
            h = hidden[start:end]
            logits = h @ w.t() if bias is None else torch.addmm(bias.to(h.dtype), h, w.t())
            rows_fn(logits, labels[start:end], loss_rows[start:end], scale, ignore_index, compute_grad)
            if need_h:
                torch.mm(logits, w, out=grad_hidden[start:end])
            if need_w:
                grad_weight.add_((logits.t() @ h).float())
            if need_b:
                grad_bias.add_(logits.float().sum(0))
            del logits
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss_rows.sum() / divisor

    @staticmethod
    def backward(ctx, dloss: torch.Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * dloss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * dloss).to(ctx.dtypes[0])
        if grad_bias is not None:
            grad_bias = (grad_bias * dloss).to(ctx.dtypes[1])
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, labels)`` without full logits.

    ``hidden`` is ``(..., H)``, ``labels`` the matching ``(...)``. The row kernel is Triton on CUDA
    and torch elsewhere; the chunked matmuls are torch everywhere. Returns an fp32 scalar.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if h2.dtype != weight.dtype and weight.dtype.is_floating_point:
        h2 = h2.to(weight.dtype)  # cast the (smaller) activations, not the vocabulary-sized weight
    y = labels.reshape(-1).to(device=h2.device)
    if y.shape[0] != h2.shape[0]:
        raise ValueError(f"labels have {y.shape[0]} rows but hidden has {h2.shape[0]}")
    if num_items_in_batch is not None:
        divisor = torch.as_tensor(num_items_in_batch, device=h2.device).to(torch.float32)
    elif reduction == "mean":
        divisor = (y != ignore_index).sum().to(torch.float32)
    else:
        divisor = torch.ones((), dtype=torch.float32, device=h2.device)
    if chunk_size is None:
        chunk_size = default_chunk_size(h2.shape[0], weight.shape[0], h2.element_size())
    triton_rows = use_triton(h2, weight)
    return FusedLinearCrossEntropyFunction.apply(
        h2, weight, bias, y, divisor.reshape(()), ignore_index, max(1, int(chunk_size)), triton_rows
    )


def causal_lm_shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """transformers' shift: position t predicts label t+1; the last position is ignored."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
