"""S3PRL's own WavLM under ``attention.wavlm``: the real model built from a tiny random checkpoint in S3PRL's format
(``testing.make_tiny_wavlm_checkpoint``, both layer layouts), stock against lean, on a ragged batch.

On the CPU the lean modules take the plain path: the same SDPA call as stock on the same RNG stream, so outputs and
gradients agree to fp32 rounding with dropout and layer drop on too. The kernel path's autograd function runs on the
CPU with the memory-efficient kernel's two ops replaced by their contract in plain torch (fp64); the GPU tests run
the real ops in fp32 and under bf16 autocast.
"""

import pickle

import numpy as np
import pytest
import torch

import efficient_kernel

from espnet_flashcompat.attention import wavlm, wavlm_fused, wavlm_kernel
from espnet_flashcompat.testing import make_tiny_wavlm_checkpoint

WavLM = pytest.importorskip("s3prl.upstream.wavlm.WavLM")
LENGTHS = (19200, 13000, 7000)  # 1.2 s and two shorter ones: 59, 40 and 21 frames


@pytest.fixture(scope="module", params=[False, True], ids=["base_plus_layout", "large_layout"])
def checkpoint(request, tmp_path_factory):
    return make_tiny_wavlm_checkpoint(tmp_path_factory.mktemp("wavlm") / "tiny.pt", layer_norm_first=request.param)


def build(checkpoint, implementation=None, dtype=torch.float32, device="cpu", **cfg):
    saved = torch.load(checkpoint)
    model = WavLM.WavLM(WavLM.WavLMConfig({**saved["cfg"], **cfg}))
    model.load_state_dict(saved["model"])
    model = model.to(device, dtype).train()
    if implementation:
        assert wavlm.install(model, implementation) == (len(model.encoder.layers) if implementation == wavlm.LEAN
                                                        else 0)
    return model


def batch(dtype=torch.float32, device="cpu", lengths=LENGTHS):
    g = torch.Generator().manual_seed(1)
    wav = torch.randn(len(lengths), max(lengths), generator=g).to(device, dtype)
    padding = torch.arange(max(lengths))[None, :] >= torch.tensor(lengths)[:, None]
    return wav, padding.to(device)


def run(model, wav, padding, seed=0, autocast=None):
    """Output, input gradient and every parameter's gradient of one training step; the tensor shapes autograd saved."""
    torch.manual_seed(seed)
    np.random.seed(seed)  # S3PRL's layer drop
    model.zero_grad(set_to_none=True)
    wav = wav.clone().requires_grad_()
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(wav.device.type, autocast or torch.bfloat16, enabled=autocast is not None):
        out, _ = model.extract_features(wav, padding_mask=padding)
    wide = torch.promote_types(wav.dtype, torch.float32)
    weights = torch.linspace(-1, 1, out.size(-1), device=out.device, dtype=wide)
    (out.to(wide) * weights).sum().backward()
    grads = {"output": out.detach().to(wide), "input": wav.grad.to(wide)}
    grads.update({name: p.grad.to(wide) for name, p in model.named_parameters() if p.grad is not None})
    return grads, shapes


def assert_close(reference, ours, tolerance):
    assert reference.keys() == ours.keys()
    assert "encoder.layers.0.self_attn.relative_attention_bias.weight" in reference
    assert {"encoder.layers.1.self_attn.grep_linear.weight", "encoder.layers.1.self_attn.grep_a"} <= set(reference)
    grads_scale = max(g.abs().max() for name, g in reference.items() if name not in ("output", "input"))
    for name, a in reference.items():
        scale = a.abs().max() if name in ("output", "input") else grads_scale  # k_proj.bias's is 0 but for rounding
        error = ((a - ours[name]).abs().max() / scale).item()
        assert error <= tolerance, (name, error)


def test_the_checkpoint_loads_through_wavlm_local(checkpoint):
    from s3prl.upstream.wavlm.hubconf import wavlm_local

    upstream = wavlm_local(ckpt=str(checkpoint))
    wav, padding = batch()
    torch.manual_seed(0)  # S3PRL leaves the upstream in training mode: dropout on
    with torch.no_grad():
        hidden = upstream([w[~p] for w, p in zip(wav, padding)])["hidden_states"]
    assert len(hidden) == 3 and hidden[0].shape == (3, 59, 32)
    attention = upstream.model.encoder.layers[0].self_attn
    assert attention.has_relative_attention_bias and attention.gru_rel_pos
    assert wavlm.is_wavlm(upstream) and wavlm.implementation_of(upstream) == wavlm.STOCK
    assert wavlm.install(upstream) == 2 and wavlm.implementation_of(upstream) == wavlm.LEAN
    torch.manual_seed(0)
    with torch.no_grad():
        lean = upstream([w[~p] for w, p in zip(wav, padding)])["hidden_states"]
    for a, b in zip(hidden, lean):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()


@pytest.mark.parametrize("attention_dropout,dropout,layerdrop", [(0.0, 0.0, 0.0), (0.1, 0.1, 0.0), (0.1, 0.1, 0.5)],
                         ids=["no_dropout", "dropout", "dropout_and_layerdrop"])
def test_lean_matches_stock_on_cpu(checkpoint, attention_dropout, dropout, layerdrop):
    """Dropout: the plain path's SDPA call is stock's, on the same RNG stream: the same masks, so the same numbers.
    Layer drop is S3PRL's own loop, drawn from numpy. The table's gradient is summed in another order (1e-7)."""
    cfg = dict(attention_dropout=attention_dropout, dropout=dropout, encoder_layerdrop=layerdrop)
    wav, padding = batch()
    stock, _ = run(build(checkpoint, **cfg), wav, padding)
    model = build(checkpoint, wavlm.LEAN, **cfg)
    lean, _ = run(model, wav, padding)
    assert_close(stock, lean, 1e-5)
    if not layerdrop:
        assert wavlm.paths_of(model) == {wavlm_kernel.PLAIN: 2}
        other_seed, _ = run(model, wav, padding, seed=1)
        assert (other_seed["output"] != lean["output"]).any() == (dropout > 0)  # dropout really is on


def test_kernel_path_rebuilds_the_bias_instead_of_keeping_it(checkpoint, monkeypatch):
    """``wavlm_kernel._GatedBias`` on the CPU in fp64, the kernel's ops replaced by their contract: stock's outputs
    and gradients (bias table and gates included) to fp64 rounding, and no (.., time, time) tensor saved, where stock
    saves several per layer."""
    wav, padding = batch(torch.float64)
    cfg = dict(attention_dropout=0.0, dropout=0.1)
    stock, stock_shapes = run(build(checkpoint, dtype=torch.float64, **cfg), wav, padding)
    monkeypatch.setattr(wavlm_kernel, "kernel_possible", lambda q, k, v: True)
    monkeypatch.setattr(wavlm_kernel._GatedBias, "forward_op", efficient_kernel.forward)
    monkeypatch.setattr(wavlm_kernel._GatedBias, "backward_op", efficient_kernel.backward)
    model = build(checkpoint, wavlm.LEAN, dtype=torch.float64, **cfg)
    lean, lean_shapes = run(model, wav, padding)
    assert wavlm.paths_of(model) == {wavlm_kernel.KERNEL: 2}
    time = stock["output"].size(1)
    assert [s for s in stock_shapes if s[-2:] == (time, time)]
    assert not [s for s in lean_shapes if s[-2:] == (time, time)], lean_shapes
    assert_close(stock, lean, 1e-12)
    torch.manual_seed(0)  # the same hidden-layer dropout as run()
    with torch.no_grad():  # frozen: the forward op alone
        frozen, _ = model.extract_features(wav, padding_mask=padding)
    assert (frozen - lean["output"]).abs().max() <= 1e-12 * frozen.abs().max()


def test_parameters_state_dict_and_uninstall(checkpoint):
    stock = build(checkpoint)
    model = build(checkpoint)
    before = {name: p for name, p in model.named_parameters()}
    attention = model.encoder.layers[0].self_attn
    stock_class = type(attention)
    assert wavlm.install(model) == 2 == wavlm.install(model)  # idempotent
    assert type(attention) is not stock_class and isinstance(attention, stock_class)
    assert {name: p for name, p in model.named_parameters()} == before  # the same Parameter objects
    assert list(model.state_dict()) == list(stock.state_dict())
    pickle.loads(pickle.dumps(attention))  # the subclass has a module-level name
    wav, padding = batch()
    model.eval()
    with torch.no_grad():
        lean_out = model.extract_features(wav, padding_mask=padding)[0]
    assert wavlm.uninstall(model) == 2 and type(attention) is stock_class and "_flashcompat_path" not in vars(attention)
    assert wavlm.implementation_of(model) == wavlm.STOCK and wavlm.uninstall(model) == 0
    with torch.no_grad():
        assert torch.equal(model.extract_features(wav, padding_mask=padding)[0],
                           stock.eval().extract_features(wav, padding_mask=padding)[0])
    assert (lean_out - model.extract_features(wav, padding_mask=padding)[0]).abs().max() <= 1e-5
    wavlm.install(model)
    assert wavlm.install(model, wavlm.STOCK) == 0 and type(attention) is stock_class
    with pytest.raises(ValueError, match="expected one of"):
        wavlm.install(model, "flash_attention_2")
    linear = torch.nn.Linear(2, 2)
    assert not wavlm.is_wavlm(linear) and wavlm.implementation_of(linear) is None and wavlm.install(linear) == 0


@pytest.mark.parametrize("buckets, max_distance, time, ends", [(32, 64, 300, (-50, 50)), (320, 800, 1500, (-778, 778)),
                                                              (320, 800, 500, (-491, 491))],
                         ids=["tiny", "large_30s", "large_10s"])
def test_the_distances_that_share_the_last_buckets_are_found_with_s3prls_buckets(buckets, max_distance, time, ends):
    """The runs of distances at both ends that share one bucket (the fused backward adds their tiles as one sum) are
    those of S3PRL's own ``_relative_positions_bucket``: from 778 frames on for WavLM large (its buckets stop
    growing), the last bucket's run within 500 frames; the table's value per distance is the one looked up."""
    attention = WavLM.MultiheadAttention(64, 4, has_relative_attention_bias=True, num_buckets=buckets,
                                         max_distance=max_distance, gru_rel_pos=True)
    wavlm.install(attention)
    rel, (below, above) = attention._flashcompat_rel(time, torch.device("cpu"))
    distances = torch.arange(-(time - 1), time)
    bucket = attention._relative_positions_bucket(distances, bidirectional=True)
    assert torch.equal(rel, attention.relative_attention_bias(bucket).t())
    at = dict(zip(distances.tolist(), bucket.tolist()))
    assert {at[d] for d in range(above, time)} == {at[time - 1]} != {at[above - 1]}
    assert {at[d] for d in range(-(time - 1), below + 1)} == {at[-(time - 1)]} != {at[below + 1]}
    assert (below, above) == ends


def test_what_the_lean_path_leaves_runs_stock(checkpoint):
    """Attention weights asked for: S3PRL's own forward, which makes a stock ``position_bias`` tensor; a lean
    module given one runs stock too. A lean layer 0 passes on a ``RelativePosition`` that expands to stock's."""
    stock, model = build(checkpoint).eval(), build(checkpoint, wavlm.LEAN).eval()
    x = torch.randn(30, 2, 32)
    first, second = stock.encoder.layers[0].self_attn, stock.encoder.layers[1].self_attn
    lean_first, lean_second = model.encoder.layers[0].self_attn, model.encoder.layers[1].self_attn
    with torch.no_grad():
        a, weights, bias = first(x, x, x, need_weights=True)
        b, lean_weights, stock_bias = lean_first(x, x, x, need_weights=True)
        assert torch.equal(a, b) and torch.equal(weights, lean_weights) and torch.equal(stock_bias, bias)
        assert wavlm.paths_of(model) == {wavlm.STOCK: 1}
        reference = second(x, x, x, need_weights=False, position_bias=bias)[0]
        assert torch.equal(lean_second(x, x, x, need_weights=False, position_bias=bias)[0], reference)
        assert wavlm.paths_of(model) == {wavlm.STOCK: 2}
        lean_bias = lean_first(x, x, x, need_weights=False)[2]
        assert isinstance(lean_bias, wavlm.RelativePosition) and torch.equal(lean_bias.stock(2), bias)
        lean = lean_second(x, x, x, need_weights=False, position_bias=lean_bias)[0]
        assert (lean - reference).abs().max() <= 1e-5 * reference.abs().max()
    assert wavlm.paths_of(model) == {wavlm_kernel.PLAIN: 2}


# ----------------------------------------------------------------------------------------------------------- GPU


def _gpu_model(checkpoint_dir, implementation=None, **cfg):
    path = make_tiny_wavlm_checkpoint(checkpoint_dir / "gpu.pt", dim=128, num_heads=4, layer_norm_first=True)
    return build(path, implementation, device="cuda", **cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16_autocast"])
def test_gpu_kernel_path_matches_stock_and_keeps_no_time_by_time_tensor(tmp_path, autocast, monkeypatch):
    """The real memory-efficient kernel ops (the fused Triton kernels set aside): stock's outputs and gradients, with
    attention dropout 0.1 on one seed (stock's bias-carrying SDPA call runs the same kernel: the same philox draws,
    and the backward replays them) and without; no (.., time, time) tensor saved. fp32: 1e-4 of the largest value,
    with cuDNN's TF32 off (the convolutional front end would round the input gradient's tiny differences to TF32
    steps, 5e-4); bf16 autocast: 5e-2."""
    monkeypatch.setattr(wavlm_kernel, "USE_FUSED", False)
    lengths = (96000, 70000, 33333)  # 6 s and two shorter: 299 frames (not a multiple of 16)
    wav, padding = batch(device="cuda", lengths=lengths)
    tolerance = 1e-4 if autocast is None else 5e-2
    for attention_dropout in (0.0, 0.1):
        cfg = dict(attention_dropout=attention_dropout, dropout=0.0)
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=autocast is not None):
            stock, stock_shapes = run(_gpu_model(tmp_path, **cfg), wav, padding, autocast=autocast)
            model = _gpu_model(tmp_path, wavlm.LEAN, **cfg)
            lean, lean_shapes = run(model, wav, padding, autocast=autocast)
        assert wavlm.paths_of(model) == {wavlm_kernel.KERNEL: 2}
        time = stock["output"].size(1)
        assert [s for s in stock_shapes if s[-2:] == (time, time)]
        assert not [s for s in lean_shapes if s[-2:] == (time, time)], lean_shapes
        assert_close(stock, lean, tolerance)
    stock_model = _gpu_model(tmp_path).eval()  # frozen: the forward alone (cuDNN's, where it takes the bias)
    with torch.no_grad(), torch.autocast("cuda", autocast or torch.bfloat16, enabled=autocast is not None):
        a = stock_model.extract_features(wav, padding_mask=padding)[0].float()
        b = model.eval().extract_features(wav, padding_mask=padding)[0].float()
    assert (a - b).abs().max() <= tolerance * a.abs().max()


@pytest.mark.gpu
def test_gpu_fused_path_matches_stock_under_bf16_autocast(tmp_path):
    """Under bf16 autocast the lean modules run the fused Triton kernels: without attention dropout stock's outputs
    and gradients within 5e-2 of the largest value (as the memory-efficient kernel's path), frozen too; with dropout
    0.1 (another draw than stock's: ``wavlm_fused``'s doc) a finite step; no (.., time, time) tensor saved."""
    if wavlm_fused.available():
        pytest.skip(wavlm_fused.available())
    wav, padding = batch(device="cuda", lengths=(96000, 70000, 33333))
    for attention_dropout in (0.0, 0.1):
        cfg = dict(attention_dropout=attention_dropout, dropout=0.0)
        stock, _ = run(_gpu_model(tmp_path, **cfg), wav, padding, autocast=torch.bfloat16)
        model = _gpu_model(tmp_path, wavlm.LEAN, **cfg)
        lean, lean_shapes = run(model, wav, padding, autocast=torch.bfloat16)
        assert wavlm.paths_of(model) == {wavlm_kernel.FUSED: 2}
        time = stock["output"].size(1)
        assert not [s for s in lean_shapes if s[-2:] == (time, time)], lean_shapes
        if attention_dropout:
            assert all(torch.isfinite(g).all() for g in lean.values())
        else:
            assert_close(stock, lean, 5e-2)
    stock_model = _gpu_model(tmp_path).eval()
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        a = stock_model.extract_features(wav, padding_mask=padding)[0].float()
        b = model.eval().extract_features(wav, padding_mask=padding)[0].float()
    assert wavlm.paths_of(model) == {wavlm_kernel.FUSED: 2}
    assert (a - b).abs().max() <= 5e-2 * a.abs().max()


def test_the_half_precision_reduction_agrees_with_the_exact_one():
    """``reduce_bias_grad`` in bf16 (batched matrix products, the CUDA autocast case) against fp64 (elementwise)."""
    g = torch.Generator().manual_seed(0)
    b, h, t = 3, 2, 37
    gate, rel = 1 + torch.rand(b, h, t, generator=g, dtype=torch.float64), torch.randn(h, 2 * t - 1, generator=g,
                                                                                        dtype=torch.float64)
    grad_bias = torch.randn(b, h, t, t, generator=g, dtype=torch.float64)
    exact = wavlm_kernel.reduce_bias_grad(grad_bias.clone(), gate, rel)
    half = wavlm_kernel.reduce_bias_grad(grad_bias.to(torch.bfloat16), gate, rel)
    for a, c in zip(exact, half):
        assert (a - c).abs().max() <= 2e-2 * a.abs().max()


# ------------------------------------------------------------------ through the frontend users build


def _frontends(checkpoint, **ours):
    """(reference, ours): the reference runs S3PRL's own WavLM attention (``attn_implementation: eager``; stock
    ESPnet's ``S3prlFrontend`` cannot import s3prl 0.4.18 on torchaudio >= 2.9, and it runs the same modules)."""
    from espnet_flashcompat.frontend import S3prlFlashCompatFrontend

    conf = {"upstream": "wavlm_local", "path_or_url": str(checkpoint)}
    torch.manual_seed(0)
    stock = S3prlFlashCompatFrontend(frontend_conf=conf, multilayer_feature=True, attn_implementation="eager")
    torch.manual_seed(0)
    return stock, S3prlFlashCompatFrontend(frontend_conf=conf, multilayer_feature=True, **ours)


def test_the_frontend_puts_wavlm_on_the_lean_path_with_stocks_numbers(checkpoint):
    from espnet_flashcompat.attention import policy

    stock, ours = _frontends(checkpoint)
    assert ours.attn_decision.implementation == policy.WAVLM_LEAN and not ours.attn_decision.downgraded
    assert wavlm.implementation_of(ours.upstream) == wavlm.LEAN and wavlm.implementation_of(stock.upstream) == "stock"
    assert list(ours.state_dict()) == list(stock.state_dict())
    ours.load_state_dict(stock.state_dict())
    g = torch.Generator().manual_seed(1)
    x, lengths = torch.randn(3, 12000, generator=g), torch.tensor([12000, 9000, 4000])
    results = []
    for frontend in (stock, ours):
        frontend.eval()  # S3PRL runs its upstream in train mode inside; eval here keeps dropout out of the match
        x_ = x.clone().requires_grad_()
        feats, feats_len = frontend(x_, lengths)
        feats.square().sum().backward()
        results.append((feats.detach(), feats_len, x_.grad, {n: p.grad for n, p in frontend.named_parameters()}))
    (f0, l0, g0, p0), (f1, l1, g1, p1) = results
    assert torch.equal(l0, l1)
    torch.testing.assert_close(f1, f0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-5)
    for name, grad in p0.items():
        if grad is not None:
            torch.testing.assert_close(p1[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_eager_keeps_s3prls_own_attention_and_flash_is_refused_with_its_reason(checkpoint):
    from espnet_flashcompat.attention import policy

    _, eager = _frontends(checkpoint, attn_implementation="eager")
    assert eager.attn_decision.implementation == policy.EAGER and wavlm.implementation_of(eager.upstream) == "stock"
    _, flash = _frontends(checkpoint, attn_implementation="flash_attention_2")
    assert flash.attn_decision.implementation == policy.WAVLM_LEAN and flash.attn_decision.downgraded
    assert "no flash-attn path" in flash.attn_decision.summary()
    with pytest.raises(policy.AttentionUnavailableError, match="no flash-attn path"):
        _frontends(checkpoint, attn_implementation="flash_attention_2", strict=True)
    _, sdpa = _frontends(checkpoint, attn_implementation="sdpa")
    assert sdpa.attn_decision.implementation == policy.WAVLM_LEAN and not sdpa.attn_decision.downgraded
