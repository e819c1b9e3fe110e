"""An attention switch keeps the model: its parameters (and the optimizer that holds them), adapters, frozen layers
and hooks, and its outputs.

Each scenario is a ``check_*`` function run on the installed transformers (5.x) in-process and on transformers 4.46,
where the switch re-points the attention classes, in a fresh interpreter. The frontend switches the way it does in
training: ``policy.apply`` (the call the frontend makes at construction, per forward, when calibrating and when
flash-attn fails at run time), then its own forward, which switches back to the backend it decided on.
"""

from pathlib import Path
from unittest import mock

import pytest
import torch
from espnet2.asr.frontend.s3prl import S3prlFrontend

from espnet_flashcompat.attention import policy, transformers_compat
from espnet_flashcompat.frontend import S3prlFlashCompatFrontend
from faults import run_python

TESTS = Path(__file__).resolve().parent
# fp32 is exact to ~1.2e-7 relative. Eager and SDPA compute the same softmax(QK^T / sqrt(d) + mask) V, but SDPA's CPU
# kernel scales and sums in another order, so each attention output differs by a few ulps; through two layers of layer
# norm and feed-forward the gap measures <= 1e-6 on features of magnitude up to ~3. 1e-5 leaves 10x headroom and is
# far below what a real mistake does (ignoring the padding mask moves the valid frames by ~4e-2).
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _frontend(tiny, request=policy.SDPA, upstream="hf_wav2vec2_custom"):
    conf = {"upstream": upstream, "path_or_url": str(tiny)}
    return S3prlFlashCompatFrontend(frontend_conf=conf, attn_implementation=request)


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 24000, generator=g), torch.tensor([24000, 17000, 9000])


def _switch_and_train(frontend, optimizer):
    """Switch to eager, then one training step: the frontend's forward switches back to sdpa first."""
    policy.apply(frontend.upstream, policy.EAGER)
    assert policy.hf_model(frontend.upstream).config._attn_implementation == policy.EAGER
    optimizer.zero_grad()
    feats, _ = frontend(*_batch())
    (feats ** 2).mean().backward()
    optimizer.step()
    assert policy.hf_model(frontend.upstream).config._attn_implementation == policy.SDPA


def _moved(named_before, module):
    return {n for n, p in module.named_parameters() if not torch.equal(p, named_before[n])}


def check_optimizer_keeps_training(tiny):
    frontend = _frontend(tiny).train()
    model = policy.hf_model(frontend.upstream)
    ids = [id(p) for p in model.parameters()]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(frontend.parameters(), lr=0.1)
    _switch_and_train(frontend, optimizer)
    live = policy.hf_model(frontend.upstream)  # the model the forward ran
    trained = {n for n, p in live.named_parameters() if p.grad is not None and p.grad.any()}
    assert any(".attention.q_proj." in n for n in trained)
    assert _moved(before, live) == trained
    assert live is model and [id(p) for p in live.parameters()] == ids


def check_houlsby_adapter_survives_and_trains(tiny):
    from espnet2.layers.create_adapter_fn import create_houlsby_adapter

    frontend = _frontend(tiny).train()
    create_houlsby_adapter(torch.nn.ModuleDict({"frontend": frontend}), bottleneck=8)  # wants an ESPnet model
    layers = policy.hf_model(frontend.upstream).encoder.layers
    adapters = [layer.adapter_layer for layer in layers]
    assert all(type(a).__name__ == "Houlsby_Adapter" for a in adapters)
    before = [{n: p.detach().clone() for n, p in a.named_parameters()} for a in adapters]
    optimizer = torch.optim.SGD(frontend.parameters(), lr=0.1)
    _switch_and_train(frontend, optimizer)
    assert [layer.adapter_layer for layer in policy.hf_model(frontend.upstream).encoder.layers] == adapters
    for adapter, weights in zip(adapters, before):
        assert _moved(weights, adapter) == set(weights)


def check_frozen_layer_and_hook_survive(tiny):
    frontend = _frontend(tiny).train()
    model = policy.hf_model(frontend.upstream)
    frozen = model.encoder.layers[0].requires_grad_(False)
    before = {n: p.detach().clone() for n, p in frozen.named_parameters()}
    hooked, seen = model.encoder.layers[1].attention, []
    hooked.register_forward_hook(lambda module, args, out: seen.append(module))
    optimizer = torch.optim.SGD(frontend.parameters(), lr=0.1)  # as ESPnet: all parameters, the frozen ones idle
    _switch_and_train(frontend, optimizer)
    frozen = policy.hf_model(frontend.upstream).encoder.layers[0]
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not _moved(before, frozen)
    assert seen == [hooked]


def check_outputs_equal_after_switch(tiny, upstream):
    """Eager (chosen at construction) against sdpa (switched to, then the forward that calibration times)."""
    frontend = _frontend(tiny, policy.EAGER, upstream).eval()
    layers = policy.hf_model(frontend.upstream).encoder.layers
    outputs = []
    for layer in layers:
        layer.attention.register_forward_hook(lambda module, args, out: outputs.append(out[0]))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad(), mock.patch("torch.nn.functional.scaled_dot_product_attention", wraps=sdpa) as kernel:
        eager, eager_lengths = frontend(*_batch())
        assert kernel.call_count == 0 and len(outputs) == len(layers)
        eager_outputs, outputs[:] = outputs[:], []
        policy.apply(frontend.upstream, policy.SDPA)
        switched, switched_lengths = S3prlFrontend.forward(frontend, *_batch())
        assert kernel.call_count == len(layers) == len(outputs)
    assert torch.equal(switched_lengths, eager_lengths)
    torch.testing.assert_close(switched, eager, **TOLERANCE)
    for after, before in zip(outputs, eager_outputs):
        torch.testing.assert_close(after, before, **TOLERANCE)


def check_legacy_switch_matches_a_model_built_for_the_backend(tiny):
    """transformers 4.4x: after each switch the model holds exactly the state of one built for that backend."""
    frontend = _frontend(tiny, policy.EAGER)
    model = policy.hf_model(frontend.upstream)
    # CPU has no flash-attn, and transformers' availability check says so: this checks the switch, not the kernel.
    type(model)._check_and_enable_flash_attn_2 = classmethod(lambda cls, config, **kwargs: config)
    for implementation in (policy.FLASH, policy.SDPA, policy.EAGER):
        policy.apply(frontend.upstream, implementation)
        built = type(model)._from_config(model.config, attn_implementation=implementation)
        assert policy.hf_model(frontend.upstream) is model
        assert model.config._attn_implementation == implementation
        for ours, theirs in zip(model.modules(), built.modules()):
            assert type(ours).__name__ == type(theirs).__name__  # weight norm makes a class per instance
            assert _plain_state(ours) == _plain_state(theirs), type(ours).__name__


def _plain_state(module):
    return {k: v for k, v in vars(module).items() if k != "training" and isinstance(v, (bool, int, float, str))}


def check_legacy_switch_refuses_what_it_cannot_keep(tiny):
    """transformers 4.4x: an attention class it does not know is refused, and the model is left as it was."""
    frontend = _frontend(tiny, policy.EAGER)
    model = policy.hf_model(frontend.upstream)
    attention_module = model.encoder.layers[1].attention
    attention_module.__class__ = type("MyAttention", (type(attention_module),), {})
    classes = [type(m) for m in model.modules()]
    with pytest.raises(transformers_compat.InPlaceSwitchError, match="MyAttention subclasses a transformers"):
        policy.apply(frontend.upstream, policy.SDPA)
    assert policy.hf_model(frontend.upstream) is model and model.config._attn_implementation == policy.EAGER
    assert [type(m) for m in model.modules()] == classes


def _in_fresh_interpreter(old_transformers, check, *args):
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
            "import transformers, test_switch\n"
            "assert transformers.__version__ == '4.46.3', transformers.__version__\n"
            f"test_switch.{check.__name__}(*{args!r})\n"
            "print('PASSED')")
    proc = run_python(code, pythonpath=[old_transformers])
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1:] == ["PASSED"], proc.stdout + proc.stderr[-6000:]


@pytest.fixture(params=["installed", pytest.param("4.46", marks=pytest.mark.slow)])
def on_stack(request):
    """``on_stack(check, *args)``: on the installed transformers in-process, or on 4.46 in a fresh interpreter."""
    if request.param == "installed":
        return lambda check, *args: check(*args)
    old_transformers = request.getfixturevalue("old_transformers")
    return lambda check, *args: _in_fresh_interpreter(old_transformers, check, *args)


def test_optimizer_built_before_a_switch_keeps_training_the_same_parameters(on_stack, tiny_wav2vec2):
    on_stack(check_optimizer_keeps_training, str(tiny_wav2vec2))


def test_houlsby_adapter_added_before_a_switch_survives_and_trains(on_stack, tiny_wav2vec2):
    on_stack(check_houlsby_adapter_survives_and_trains, str(tiny_wav2vec2))


def test_frozen_layer_stays_frozen_and_hook_still_fires(on_stack, tiny_wav2vec2):
    on_stack(check_frozen_layer_and_hook_survive, str(tiny_wav2vec2))


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert"])
def test_outputs_after_eager_to_sdpa_switch_equal_eager(on_stack, request, kind):
    tiny = request.getfixturevalue(f"tiny_{kind}")
    on_stack(check_outputs_equal_after_switch, str(tiny), f"hf_{kind}_custom")


@pytest.mark.slow
def test_legacy_switch_matches_a_model_built_for_the_backend(old_transformers, tiny_wav2vec2):
    _in_fresh_interpreter(old_transformers, check_legacy_switch_matches_a_model_built_for_the_backend,
                          str(tiny_wav2vec2))


@pytest.mark.slow
def test_legacy_switch_refuses_what_it_cannot_keep(old_transformers, tiny_wav2vec2):
    _in_fresh_interpreter(old_transformers, check_legacy_switch_refuses_what_it_cannot_keep, str(tiny_wav2vec2))
