"""The s3prl_flashcompat frontend on CPU: parity with ESPnet's stock frontend, clear errors, runtime fallback."""

import logging

import pytest
import torch

from espnet_flashcompat import import_s3prl
from espnet_flashcompat.attention import policy
from espnet_flashcompat.frontend import S3prlFlashCompatFrontend
from stacks import only_on


@pytest.fixture()
def hf_conf(tiny_wav2vec2):
    return {"upstream": "hf_wav2vec2_custom", "path_or_url": str(tiny_wav2vec2)}


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 24000, generator=g), torch.tensor([24000, 17000, 9000])


@pytest.mark.parametrize("multilayer_feature,layer", [(True, -1), (False, -1), (False, 1)])
def test_outputs_equal_stock_frontend(hf_conf, multilayer_feature, layer):
    import_s3prl()  # the stock constructor's `from s3prl.nn import ...` fails on torchaudio >= 2.9 without it
    from espnet2.asr.frontend.s3prl import S3prlFrontend

    kwargs = dict(frontend_conf=hf_conf, multilayer_feature=multilayer_feature, layer=layer)
    stock, ours = S3prlFrontend(**kwargs).eval(), S3prlFlashCompatFrontend(**kwargs).eval()
    x, lengths = _batch()
    with torch.no_grad():
        (ys, ys_len), (yo, yo_len) = stock(x, lengths), ours(x, lengths)
    assert torch.equal(ys, yo) and torch.equal(ys_len, yo_len)
    assert ours.output_size() == stock.output_size() and ours.hop_length == stock.hop_length == 320
    assert ours.frontend_type == "s3prl" and ours.pretrained_params.keys() == stock.pretrained_params.keys()


def test_fbank_shapes_and_native_decision():
    frontend = S3prlFlashCompatFrontend(fs="16k", frontend_conf={"upstream": "fbank"})
    x, lengths = _batch()
    feats, feats_len = frontend(x, lengths)
    assert feats.shape == (3, 150, 240) and feats_len.tolist() == [150, 107, 57]
    assert frontend.attn_decision.implementation == policy.NO_ATTENTION


def test_hf_upstream_trains_and_reloads(hf_conf):
    frontend = S3prlFlashCompatFrontend(frontend_conf=hf_conf, multilayer_feature=True).train()
    x, lengths = _batch()
    feats, feats_len = frontend(x, lengths)
    assert feats.shape == (3, 75, 32) and feats_len.tolist() == [75, 54, 29]
    assert frontend.attn_decision.implementation == policy.SDPA
    feats.sum().backward()
    weight = next(frontend.upstream.parameters())
    assert weight.grad is not None
    with torch.no_grad():
        weight.add_(1.0)
    frontend.reload_pretrained_parameters()
    assert torch.equal(weight, frontend.pretrained_params[next(iter(frontend.pretrained_params))])


def test_env_var_overrides_yaml(hf_conf, monkeypatch):
    monkeypatch.setenv(policy.ENV_VAR, "eager")
    frontend = S3prlFlashCompatFrontend(frontend_conf=hf_conf, attn_implementation="sdpa")
    assert (frontend.attn_decision.requested, frontend.attn_decision.source) == ("eager", "env")
    assert policy.hf_model(frontend.upstream).config._attn_implementation == "eager"


def test_strict_explicit_request_that_cannot_run_raises(hf_conf):
    with pytest.raises(policy.AttentionUnavailableError, match="flash_attention_2"):
        S3prlFlashCompatFrontend(frontend_conf=hf_conf, attn_implementation="flash_attention_2", strict=True)


def test_explicit_request_downgrades_with_one_warning(hf_conf, caplog):
    with caplog.at_level(logging.WARNING):
        frontend = S3prlFlashCompatFrontend(frontend_conf=hf_conf, attn_implementation="flash_attention_2")
        for _ in range(3):
            frontend(*_batch())
    warnings = [r for r in caplog.records if r.name == "espnet_flashcompat.frontend"]
    assert len(warnings) == 1 and "flash_attention_2" in warnings[0].getMessage()
    assert frontend.attn_decision.implementation == policy.SDPA


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(frontend_conf={"upstream": "hubert_larg"}), r"not an S3PRL upstream\. Did you mean: .*hubert_large_ll60k"),
        (dict(frontend_conf={"upstream": "fbank"}, attn_implementation="flash2"),
         r"'flash2' is not one of auto, flash_attention_2, sdpa, eager"),
        (dict(frontend_conf={"upstream": "fbank"}, layer=3), r"layer=3 is out of range.*1 hidden states"),
        pytest.param(dict(frontend_conf={"upstream": "byol_s_default"}), r"byol_s.*set_audio_backend",
                     marks=only_on("legacy", "byol_s is broken by torchaudio >= 2.9 in s3prl 0.4.18 only")),
    ],
)
def test_bad_configuration_gets_a_clear_error(kwargs, error):
    with pytest.raises((ValueError, ImportError), match=error):
        S3prlFlashCompatFrontend(**kwargs)


def test_bad_batches_get_a_clear_error():
    frontend = S3prlFlashCompatFrontend(frontend_conf={"upstream": "fbank"})
    with pytest.raises(ValueError, match="non-empty"):
        frontend(torch.zeros(0, 16000), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"zero-length utterance\(s\) at batch index \[1\]"):
        frontend(torch.randn(2, 16000), torch.tensor([16000, 0]))


def test_other_sampling_rate_warns_like_stock(caplog):
    with caplog.at_level(logging.WARNING):
        S3prlFlashCompatFrontend(fs="8k", frontend_conf={"upstream": "fbank"})
    assert "only support 16 kHz" in caplog.text


class _FlashKernel:
    """Stands in for the flash-attn kernel on CPU: raises its real error text, counting calls."""

    def __init__(self, message):
        self.message, self.calls = message, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        raise RuntimeError(self.message)


@pytest.mark.parametrize("message", [
    "FlashAttention only support fp16 and bf16 data type",
    "FlashAttention only supports Ampere GPUs or newer.",
])
@pytest.mark.parametrize("strict", [False, True])
def test_runtime_kernel_error_falls_back_and_reruns_the_batch(hf_conf, monkeypatch, caplog, message, strict):
    """CPU cannot run flash kernels: let flash pass the policy, make its kernel raise flash-attn's exact text."""
    from transformers import PreTrainedModel
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    kernel = _FlashKernel(message)
    real_rejection = policy._rejection
    monkeypatch.setattr(policy, "_rejection", lambda b, *a: None if b == policy.FLASH else real_rejection(b, *a))
    monkeypatch.setattr(PreTrainedModel, "_check_and_adjust_attn_implementation", lambda self, impl, **k: impl)
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, policy.FLASH, kernel)

    def loss_of(frontend):
        torch.manual_seed(0)
        feats, _ = frontend(*_batch())
        return (feats ** 2).mean()

    reference = loss_of(S3prlFlashCompatFrontend(frontend_conf=hf_conf, attn_implementation="sdpa").train())
    frontend = S3prlFlashCompatFrontend(frontend_conf=hf_conf, attn_implementation="flash_attention_2", strict=strict)
    frontend.train()
    assert frontend.attn_decision.implementation == policy.FLASH
    if strict:
        with pytest.raises(policy.AttentionUnavailableError, match=message.split(" only")[0]):
            loss_of(frontend)
        return
    with caplog.at_level(logging.WARNING):
        loss = loss_of(frontend)
        loss.backward()
        assert torch.equal(loss, reference)
        loss_of(frontend)  # stays on sdpa: the kernel is not tried again, nothing more is logged
    assert kernel.calls == 1 and frontend.attn_decision.implementation == policy.SDPA
    assert [r.getMessage() for r in caplog.records if message in r.getMessage()].__len__() == 1


def test_other_runtime_errors_propagate_untouched(hf_conf, monkeypatch):
    frontend = S3prlFlashCompatFrontend(frontend_conf=hf_conf)
    boom = RuntimeError("CUDA out of memory")
    monkeypatch.setattr(frontend.featurizer, "forward", lambda *a: (_ for _ in ()).throw(boom))
    with pytest.raises(RuntimeError) as info:
        frontend(*_batch())
    assert info.value is boom
