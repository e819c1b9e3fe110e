"""SDPA's memory-efficient kernel ops as their contract in plain torch, for the CPU tests of the lean paths that call
them directly (``relpos_sdpa._LeanBias``, ``wavlm_kernel._GatedBias``): CPU has no such kernel. Attention dropout 0.

``forward`` and ``backward`` take the ops' arguments; the bias must start its rows on 16-element boundaries, as the
kernel wants, and its gradient comes back as the kernel returns it: in a buffer of aligned rows whose extra columns
are left unwritten (NaN here, so that a reader of them shows).
"""

import torch

ALIGN = 16


def forward(q, k, v, bias, compute_log_sumexp, dropout_p, is_causal=False, *, scale=None):
    assert bias.stride(-2) % ALIGN == 0 and dropout_p == 0 and not is_causal
    scores = q @ k.transpose(-2, -1) * (scale or q.size(-1) ** -0.5) + bias
    lse = scores.logsumexp(-1)
    return (scores - lse[..., None]).exp() @ v, lse, torch.empty(0), torch.empty(0)


def backward(grad_out, q, k, v, bias, out, lse, seed, offset, dropout_p, grad_input_mask, is_causal=False, *,
             scale=None):
    leaves = [t.detach().requires_grad_() for t in (q, k, v, bias)]
    with torch.enable_grad():
        recomputed = forward(*leaves, True, dropout_p, is_causal, scale=scale)[0]
    assert torch.equal(recomputed, out)  # the bias rebuilt for the backward is the forward's
    grads = torch.autograd.grad(recomputed, leaves, grad_out)
    time = bias.size(-1)
    grad_bias = torch.full((*bias.shape[:-1], time + -time % ALIGN), float("nan"), dtype=bias.dtype)[..., :time]
    return (*grads[:3], grad_bias.copy_(grads[3]))
