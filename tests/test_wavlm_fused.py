"""``attention.wavlm_fused``, WavLM's gated relative-position attention in Triton kernels, against the same function
computed in float32 (fp64 on the CPU) with autograd and the same dropout mask (``keep_mask``).

On the CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, in a process of its own, since Triton
reads it at import) with small tiles, so that the tile loops, the padded-key skip, the diagonal sums and the dropout
replay all run on a few dozen frames; on the GPU the compiled kernels at WavLM's sizes, in bf16.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from espnet_flashcompat.attention import wavlm_fused, wavlm_kernel

pytestmark = pytest.mark.skipif(wavlm_fused.available() is not None, reason=f"no Triton: {wavlm_fused.available()}")


def errors(device, dtype, batch, heads, time, head_dim, padded, dropout_p, seed=3, flat=0):
    """Relative max errors of the output and the five gradients, and the kept share of the dropout mask. ``flat``:
    the distance table is looked up from one of 2 flat + 1 entries per head, distances at or beyond +-flat sharing
    the last ones (as WavLM's buckets end), and the table's gradient is that of those entries."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(time, batch, heads, head_dim, generator=g).permute(1, 2, 0, 3) for _ in range(3))
    gate = 0.5 + torch.rand(batch, heads, time, generator=g)
    entries = torch.randn(heads, 2 * flat + 1 if flat else 2 * time - 1, generator=g)
    lookup = torch.arange(-(time - 1), time).clamp(-flat, flat) + flat if flat else torch.arange(2 * time - 1)
    lengths = [time - i * padded for i in range(batch)]
    pad = (torch.arange(time)[None, :] >= torch.tensor(lengths)[:, None]).view(batch, 1, 1, time).to(device)
    go = torch.randn(batch, heads, time, head_dim, generator=g).to(device)
    ins = [t.to(device, dtype if t.dim() == 4 else torch.float32).requires_grad_() for t in (q, k, v, gate, entries)]
    exact = torch.float64 if device == "cpu" else torch.float32
    ref_in = [t.detach().to(exact).requires_grad_() for t in ins]
    lookup = lookup.to(device)
    torch.manual_seed(seed)
    prepared = wavlm_fused.prepare(ins[4][:, lookup], pad, batch, (-flat, flat) if flat else None)
    out = wavlm_fused.attend(*ins[:4], ins[4][:, lookup], pad, dropout_p, prepared)
    got = [out, *torch.autograd.grad(out, ins, go.to(dtype))]
    torch.manual_seed(seed)  # the seed the call drew
    draw = torch.randint(2 ** 62, (1,), device=device, dtype=torch.int64)
    keep = wavlm_fused.keep_mask(draw, batch * heads, time, dropout_p).view(batch, heads, time, time)
    q, k, v, gate, entries = ref_in
    bias = (gate.unsqueeze(-1) * wavlm_kernel.toeplitz(entries[:, lookup], time)).masked_fill(pad, float("-inf"))
    probs = torch.softmax(q @ k.transpose(-1, -2) / head_dim ** 0.5 + bias, -1)
    ref = (probs * keep * wavlm_fused.dropout_threshold(dropout_p)[1] if dropout_p else probs) @ v
    want = [ref, *torch.autograd.grad(ref, ref_in, go.to(exact))]
    names = ("out", "q", "k", "v", "gate", "rel")
    result = {n: ((a.to(exact) - b).abs().max() / b.abs().max()).item() for n, a, b in zip(names, got, want)}
    result["kept"] = keep.float().mean().item()
    return result


def _interpreted(dropout_p: float, padded: int, flat: int, default: bool = True) -> dict:
    """``errors`` on the CPU under Triton's interpreter, with tiles of 16 and 32, in a process of its own; not
    ``default``: the backward draws the dropout mask again, shears its tiles (key tiles wider than query tiles) and
    sums the flat tiles' diagonals one by one."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import test_wavlm_fused as t; "
        "from espnet_flashcompat.attention import wavlm_fused as f; "
        f"f.STORE_KEEP_MASK = f.ROTATE_TILES = f.FLAT_TILES = {default}; "
        "f.FORWARD = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1); "
        f"f.BACKWARD_KV = dict(BLOCK_M=16, BLOCK_N={16 if default else 32}, num_warps=4, num_stages=1); "
        "f.BACKWARD_Q = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1); "
        f"print(json.dumps(t.errors('cpu', torch.float32, 3, 2, 45, 16, {padded}, {dropout_p}, flat={flat})))"
    ).replace("; print", "; import torch; print")
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("dropout_p, padded, flat, default", [(0.0, 7, 0, True), (0.3, 20, 5, True),
                                                              (0.3, 20, 5, False)],
                         ids=["no_dropout", "dropout_long_padding_flat_ends", "mask_drawn_again_tiles_sheared"])
def test_the_kernels_compute_the_function_and_its_gradients(dropout_p, padded, flat, default):
    """45 frames in tiles of 16 and 32 (a partial last tile), three utterances 45, 45 - padded, 45 - 2 padded
    frames long (at 20, whole key tiles past the end are skipped): the output and the gradients of q, k, v, the
    gate and the table agree with fp64 to fp32 rounding, with the dropout mask ``keep_mask`` gives. With a table
    whose distances beyond +-5 share entries, the backward's key tiles of 16 meet tiles all beyond 5 on both sides
    (one sum each) beside tiles across it; also where the backward draws the mask again and shears its tiles."""
    err = _interpreted(dropout_p, padded, flat, default)
    assert max(v for n, v in err.items() if n != "kept") < 1e-5, err
    if dropout_p:
        assert abs(err["kept"] - (1 - dropout_p)) < 0.03, err  # 3 x 2 x 45 x 45 draws: 0.03 is 7 standard errors


def test_the_dropout_threshold_keeps_the_expectation():
    for p in (0.0, 0.1, 0.3):
        threshold, rescale = wavlm_fused.dropout_threshold(p)
        keep = (65536 - threshold) / 65536
        assert abs(keep - (1 - p)) <= 2 ** -17 and keep * rescale == pytest.approx(1.0, abs=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("time, flat", [(299, 0), (1500, 400)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_gpu_the_kernels_match_float32_in_bf16(time, flat, dropout_p):
    """WavLM large's heads (16 of 64), 4 ragged utterances, bf16: within 2e-2 of float32 (bf16 inputs, float32
    accumulation); the dropout mask keeps 1 - p of the probabilities. At 1500 frames distances beyond +-400 share
    their table entries, as WavLM's far ones do."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    err = errors("cuda", torch.bfloat16, 4, 16, time, 64, time // 8, dropout_p, flat=flat)
    assert max(v for n, v in err.items() if n != "kept") < 2e-2, err
    if dropout_p:
        assert abs(err["kept"] - (1 - dropout_p)) < 1e-3, err


@pytest.mark.gpu
def test_gpu_the_seed_comes_from_torch_and_nothing_time_by_time_is_kept():
    """Two calls after the same ``torch.manual_seed`` give the same output, another seed another one; autograd keeps
    no (.., time, time) tensor."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    t = 600
    q, k, v = (torch.randn(2, 16, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    gate = torch.rand(2, 16, t, device="cuda", requires_grad=True)
    rel = torch.randn(16, 2 * t - 1, device="cuda", requires_grad=True)
    shapes = []
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        with torch.autograd.graph.saved_tensors_hooks(lambda x: shapes.append(tuple(x.shape)) or x, lambda x: x):
            outs.append(wavlm_fused.attend(q, k, v, gate, rel, None, 0.1))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert shapes and not [s for s in shapes if s[-2:] == (t, t)], shapes
