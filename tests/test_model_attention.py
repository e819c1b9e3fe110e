"""The opt-in model-wide attention policy (``model_attention``, ``optin``, ``relpos_sdpa``) on real ESPnet modules.

In-process: the decisions and their reasons, how the request is read, the task option, the policy put on a model
built by ESPnet's own ``ASRTask.build_model``, a flash path forced on the CPU so that ESPnet's own flash code fails
for real (dropout must survive the fallback), and relative-position SDPA parity with the stock modules. In fresh
interpreters (slow): a build without the opt-in against stock ESPnet (our hook disabled), stock
``python -m espnet2.bin.asr_train`` / ``asr_inference`` runs with the opt-in from the YAML and from the
environment (with a really broken flash-attn), and ESPnet3's model builder. GPU-marked: the real kernels.
"""

import argparse
import copy
import json
import logging
import sys

import numpy as np
import pytest
import soundfile
import torch
import yaml

import efficient_kernel

from espnet_flashcompat.attention import policy
from espnet_flashcompat.espnet import espnet_compat
from espnet_flashcompat.s3prl import guard
from espnet_flashcompat.espnet import model_attention, model_policy, optin
from espnet_flashcompat.attention import relpos_sdpa
from espnet_flashcompat.attention.policy import FLASH, SDPA, AttentionUnavailableError, AttnDecision, Rejection
from espnet_models import MODEL, SCRIPT, TOKENS, build, run_script
from faults import run
from stacks import only_on

CLASSES = {c.__name__: c for c in espnet_compat.attention_classes()}
MHA = CLASSES["MultiHeadedAttention"]
CPU, F32 = torch.device("cpu"), torch.float32
ESPNET_FALLBACK = "Flash Attention failed, falling back"


@pytest.fixture(autouse=True)
def _no_env_request(monkeypatch):
    for name in (optin.ENV_VAR, optin.STRICT_ENV, policy.ENV_VAR):
        monkeypatch.delenv(name, raising=False)


# ------------------------------------------------------------------------------------------- decisions


def test_decisions_name_their_reasons():
    flash_here = policy.flash_rejection(CPU, F32)
    assert flash_here  # the tests' CPU-only machines: whatever else, flash-attn cannot run on its CPU
    auto = model_policy.decide("auto", model_attention.SELF, CPU, F32)
    assert (auto.implementation, auto.rejected, auto.downgraded) == (SDPA, (Rejection(FLASH, flash_here),), False)
    rel = model_policy.decide(FLASH, model_attention.REL)  # before the device is known
    assert rel.implementation == SDPA and rel.downgraded
    assert [r.backend for r in rel.rejected] == [FLASH] and "relative-position" in rel.rejected[0].reason
    for request in ("sdpa", "eager"):
        for kind in (model_attention.SELF, model_attention.REL):
            decision = model_policy.decide(request, kind, CPU, F32)
            assert (decision.implementation, decision.rejected) == (request, ())
    with pytest.raises(AttentionUnavailableError, match="strict: rel_selfattn attention sdpa .*relative-position"):
        model_policy.decide(FLASH, model_attention.REL, strict=True)
    assert model_policy.decide("auto", model_attention.REL, strict=True).implementation == SDPA  # auto never refuses
    assert "(requested auto by ESPNET_FLASHCOMPAT_MODEL_ATTN)" in model_policy.describe(
        model_policy.decide("auto", model_attention.SELF, CPU, F32, source=optin.MODEL_ENV))



def test_on_cuda_sdpa_contends_as_torch_chooses_and_as_each_kernel(monkeypatch):
    """``auto`` on CUDA (the policy alone, without a GPU: ``sdpa_kernels.candidates`` stands in for the device's
    answer): ESPnet's attention times SDPA unpinned (torch's own choice, no pin to pay: a decode step's calls are
    launch-bound) beside each of its kernels, and eager; relative-position attention SDPA and eager; one kernel
    only: SDPA unpinned, once."""
    from espnet_flashcompat.attention import sdpa_kernels

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(sdpa_kernels, "candidates", lambda device, dtype: ("sdpa:cudnn", "sdpa:efficient"))
    decision = model_policy.decide("auto", model_attention.SELF, cuda, torch.bfloat16)
    assert decision.contenders == (SDPA, "sdpa:cudnn", "sdpa:efficient", "eager"), decision
    assert FLASH in {r.backend for r in decision.rejected}  # no working flash-attn in the test venv
    assert model_policy.decide("auto", model_attention.REL, cuda, torch.bfloat16).contenders == (SDPA, "eager")
    monkeypatch.setattr(sdpa_kernels, "candidates", lambda device, dtype: ("sdpa:efficient",))
    assert model_policy.decide("auto", model_attention.SELF, cuda, torch.float32).contenders == (SDPA, "eager")
    assert model_policy.decide("sdpa", model_attention.SELF, cuda, torch.bfloat16).contenders == ()

def test_request_from_environment_and_config(monkeypatch):
    ns = argparse.Namespace
    assert optin.requested(ns()) is None and optin.requested(None) is None  # not asked: stock
    assert optin.requested(ns(model_attn_implementation="SDPA")) == optin.Request("sdpa", "config", False)
    assert optin.requested(ns(model_attn_implementation="flash_attention_2", model_attn_strict=True)).strict
    assert optin.requested(ns(model_attn_implementation=yaml.safe_load("off"))) is None  # YAML's `off` is False
    monkeypatch.setenv(policy.ENV_VAR, "eager")
    assert optin.requested(ns()) is None  # the frontend's override alone does not opt the model in
    assert optin.requested(ns(model_attn_implementation="sdpa")) == optin.Request("eager", "env", False)
    monkeypatch.setenv(optin.ENV_VAR, "auto")
    assert optin.requested(ns(model_attn_implementation="sdpa")) == optin.Request("auto", optin.MODEL_ENV, False)
    monkeypatch.setenv(optin.STRICT_ENV, "1")
    assert optin.requested(ns()).strict
    monkeypatch.setenv(optin.ENV_VAR, "off")
    assert optin.requested(ns(model_attn_implementation="sdpa")) is None
    monkeypatch.setenv(optin.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="ESPNET_FLASHCOMPAT_MODEL_ATTN='fast' is not one of auto"):
        optin.requested(ns())
    monkeypatch.delenv(optin.ENV_VAR)
    monkeypatch.delenv(policy.ENV_VAR)
    with pytest.raises(ValueError, match="model_attn_implementation='fast'"):
        optin.requested(ns(model_attn_implementation="fast"))


def test_task_option_exists_only_when_given(tmp_path, monkeypatch):
    from espnet2.tasks.asr import ASRTask

    monkeypatch.setattr(sys, "argv", ["asr_train.py"])  # ESPnet's config parser reads sys.argv when given no args
    parser = ASRTask.get_parser()
    parsed = vars(parser.parse_args([]))
    assert optin.OPTION not in parsed and optin.STRICT_OPTION not in parsed
    assert optin.OPTION not in ASRTask.get_default_config()  # what --print_config prints
    assert vars(parser.parse_args(["--model_attn_implementation", "sdpa", "--model_attn_strict", "true"])) == \
        {**parsed, optin.OPTION: "sdpa", optin.STRICT_OPTION: True}
    config = tmp_path / "c.yaml"
    config.write_text("model_attn_implementation: eager\n")  # config_argparse refuses keys that are no option
    assert parser.parse_args(["--config", str(config)]).model_attn_implementation == "eager"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model_attn_implementation", "fast"])
    assert "espnet2.tasks.asr.ASRTask" in optin.wrapped_tasks()


# ------------------------------------------------------------------------------- applying it to a model


def _speech(device="cpu"):
    g = torch.Generator().manual_seed(0)
    return 0.1 * torch.randn(2, 8000, generator=g).to(device), torch.tensor([8000, 5600], device=device)


def _attention_modules(model):
    return [m for m in model.modules() if isinstance(m, MHA)]


def test_policy_on_a_model_built_by_espnet(tmp_path, caplog):
    stock = build(tmp_path).eval()
    with caplog.at_level(logging.INFO, logger="espnet_flashcompat"):
        ours = build(tmp_path, model_attn_implementation="sdpa").eval()
    assert model_attention.policy_of(stock) is None
    policy = model_attention.policy_of(ours)
    assert policy.request == optin.Request("sdpa", "config") and policy.modules == {"encoder selfattn": 2, "decoder selfattn": 1, "decoder source selfattn": 1}
    assert "model attention policy (requested sdpa by model_attn_implementation) on 1 decoder selfattn, 1 decoder source "\
           "selfattn, 2 encoder selfattn modules" in caplog.text
    for a, b in zip(_attention_modules(stock), _attention_modules(ours)):
        assert type(b).__bases__[1] is type(a)  # ESPnet's class, under ours
        assert isinstance(b.dropout, torch.nn.Dropout) and b.dropout.p == b.dropout_rate
    assert all(torch.equal(p, q) for p, q in zip(stock.state_dict().values(), ours.state_dict().values()))
    with torch.no_grad():
        reference, ref_lengths = stock.encode(*_speech())
        out, lengths = ours.encode(*_speech())
    assert all(m.use_sdpa and not m.use_flash_attn for m in _attention_modules(ours))
    assert not any(m.use_sdpa for m in _attention_modules(stock))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)  # SDPA vs eager: same sums, other order
    assert torch.equal(lengths, ref_lengths)
    assert list(policy.decisions) == [("encoder selfattn", "cpu", "torch.float32")]


def test_attention_plots_still_get_their_weights(tmp_path):
    """ESPnet plots attention after each epoch (num_att_plot: 3) from module.attn, which SDPA never fills."""
    from espnet2.main_funcs.calculate_all_attentions import calculate_all_attentions

    model = build(tmp_path, model_attn_implementation="sdpa").eval()
    batch = _asr_batch("cpu")
    with torch.no_grad():
        model(**batch)  # on the policy's backend first, as training runs before the plots
    weights = calculate_all_attentions(model, batch)
    names = [n for n, m in model.named_modules() if isinstance(m, MHA)]
    assert len(names) == 4 and all(len(weights[n]) == 2 for n in names)
    assert weights[names[0]][0].shape[0] == 2  # heads x frames x frames, per utterance
    with torch.no_grad():
        model(**batch)
    assert all(m.use_sdpa and m.attn is None for m in _attention_modules(model))  # back on the policy's backend


class _ForcedFlash(model_attention.ModelAttentionPolicy):
    """Decides flash everywhere, as the policy does on a GPU that passes its checks: on this CPU ESPnet's own flash
    code then fails for real (flash-attn is not installed in the test venv: its functions are undefined in ESPnet's module)."""

    def rule(self, kind, device=None, dtype=None):
        decision = model_policy.decide(self.request.backend, kind, device, dtype, self.request.source)
        return AttnDecision(decision.requested, FLASH, (), decision.source, decision.context)


def _flash_built_stack():
    """Three MultiHeadedAttention as ESPnet builds them where its flash check passes: use_flash_attn=True, which also
    makes their dropout an nn.Identity."""
    torch.manual_seed(0)
    return torch.nn.ModuleList([MHA(4, 32, 0.5, False, True, False, False) for _ in range(3)]).train()


def _run_stack(stack, x, mask):
    for module in stack:
        x = module(x, x, x, mask)
    return x


def _batch():
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 1, 7, dtype=torch.bool)
    mask[1, :, 5:] = False  # padded: ESPnet's varlen flash path
    return x, mask


def test_flash_failing_at_run_time_keeps_dropout_and_reruns_on_sdpa(caplog):
    stock, ours = _flash_built_stack(), _flash_built_stack()
    assert isinstance(stock[0].dropout, torch.nn.Identity)
    reference = copy.deepcopy(stock)  # ESPnet's own SDPA path with dropout, for the same weights
    for module in reference:
        module.use_flash_attn, module.use_sdpa = False, True
    policy = model_attention.apply(ours, optin.Request(FLASH, "config"), _ForcedFlash(optin.Request(FLASH, "config")))
    x, mask = _batch()
    with caplog.at_level(logging.INFO):
        torch.manual_seed(3)
        first = _run_stack(ours, x, mask)
    ours_warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(ours_warnings) == 1 and ours_warnings[0].name == "espnet_flashcompat.espnet.model_policy"
    message = ours_warnings[0].getMessage()
    assert "flash-attn failed at run time; re-running the call" in message
    assert "rejected flash_attention_2: NameError: name '" in message  # the real exception, type and all
    assert ESPNET_FALLBACK not in caplog.text  # ESPnet's per-module warning was taken, not passed on
    assert policy.decisions[("encoder selfattn", "cpu", "torch.float32")].implementation == SDPA
    for module in ours:
        assert (module.use_flash_attn, module.use_sdpa, module.attn) == (False, True, None)
        assert isinstance(module.dropout, torch.nn.Dropout) and module.dropout.p == 0.5
    torch.manual_seed(3)
    torch.testing.assert_close(first, _run_stack(reference, x, mask))  # the re-run is ESPnet's SDPA, dropout on
    torch.manual_seed(4)
    assert not torch.equal(first, _run_stack(ours, x, mask))  # attention dropout is active
    # stock ESPnet after the same failure: eager attention, its dropout an nn.Identity for good, a warning per module
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        torch.manual_seed(3)
        stock_first = _run_stack(stock, x, mask)
    assert caplog.text.count(ESPNET_FALLBACK) == 3
    torch.manual_seed(4)
    assert torch.equal(stock_first, _run_stack(stock, x, mask))  # no attention dropout left in training


def test_a_call_without_a_mask_never_takes_espnets_flash_path(caplog):
    """Beam search's source attention passes no mask, and ESPnet's flash path reads the keys' padding from the mask:
    such calls run SDPA, said once, without counting as flash-attn failing (calls with a mask keep flash); under
    ``strict`` an explicit flash request refuses them."""
    stack = _flash_built_stack().eval()
    reference = copy.deepcopy(stack)  # ESPnet's own SDPA path, for the same weights
    for module in reference:
        module.use_flash_attn, module.use_sdpa = False, True
    policy = model_attention.apply(stack, optin.Request(FLASH, "config"), _ForcedFlash(optin.Request(FLASH, "config")))
    x, _ = _batch()
    with caplog.at_level(logging.INFO), torch.no_grad():
        out, again = _run_stack(stack, x, None), _run_stack(stack, x, None)
        expected = _run_stack(reference, x, None)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(again, expected)
    assert not policy._failed and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert caplog.text.count(model_policy.MASKLESS) == 1
    assert all(m.use_sdpa and not m.use_flash_attn for m in stack)
    assert policy.static("encoder selfattn", "selfattn", x.device, x.dtype).implementation == FLASH  # masked calls
    strict, request = _flash_built_stack().eval(), optin.Request(FLASH, "config", strict=True)
    model_attention.apply(strict, request, _ForcedFlash(request))
    with pytest.raises(AttentionUnavailableError, match="strict: encoder selfattn flash_attention_2: ESPnet's flash"):
        with torch.no_grad():
            _run_stack(strict, x, None)


def test_strict_refuses_a_flash_failure_at_run_time():
    stack = _flash_built_stack()
    request = optin.Request(FLASH, "config", strict=True)
    model_attention.apply(stack, request, _ForcedFlash(request))
    with pytest.raises(AttentionUnavailableError, match="strict: flash_attention_2 failed at run time on cpu .*"
                                                        "NameError"):
        _run_stack(stack, *_batch())


# --------------------------------------------------------------------------- relative-position attention


@pytest.mark.parametrize("name,zero_triu", [("RelPositionMultiHeadedAttention", False),
                                            ("RelPositionMultiHeadedAttention", True),
                                            ("LegacyRelPositionMultiHeadedAttention", False)])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_relative_position_sdpa_matches_stock(name, zero_triu, dtype, tolerance):
    """Outputs and all gradients (inputs, positions, parameters) against the stock eager module, each difference
    relative to the largest magnitude of its kind. The two compute the same sums in another order: measured 2e-7
    (fp32) and 5e-16 (fp64); a wrong scale, positional term or mask is off by O(1). d_k = 24: sqrt(d_k) is not a
    power of two, so the scaling is not exact either."""
    torch.manual_seed(0)
    stock = CLASSES[name](4, 96, 0.1, zero_triu).to(dtype).eval()
    ours = copy.deepcopy(stock)
    model_attention.apply(ours, optin.Request("sdpa", "config"))
    T = 40
    x = torch.randn(3, T, 96, dtype=dtype)
    pos = torch.randn(1, 2 * T - 1 if name.startswith("Rel") else T, 96, dtype=dtype)
    mask = torch.ones(3, 1, T, dtype=torch.bool)
    mask[1, :, 25:] = mask[2, :, 9:] = False
    results = []
    for module in (stock, ours):
        xi, pi = x.clone().requires_grad_(), pos.clone().requires_grad_()
        out = module(xi, xi, xi, pi, mask)
        (out * torch.linspace(-1, 1, 96, dtype=dtype)).sum().backward()
        results.append([out.detach(), xi.grad, pi.grad, *[p.grad for p in module.parameters()]])
    assert ours.use_sdpa
    grads_scale = max(g.abs().max() for g in results[0][3:])
    for i, (a, b) in enumerate(zip(*results)):
        scale = grads_scale if i >= 3 else b.abs().max()
        assert (a - b).abs().max() <= tolerance * scale, (i, ((a - b).abs().max() / scale).item())


def _saved_shapes(module, *args):
    """Shapes of every tensor autograd keeps from ``module(*args)`` for the backward."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(*args)
    return out, shapes


def test_the_lean_path_serves_the_rel_shift_that_is_a_view():
    """``_LeanBias`` builds the bias as a strided view: only where the module's own rel_shift is exactly that."""
    latest, legacy = CLASSES["RelPositionMultiHeadedAttention"], CLASSES["LegacyRelPositionMultiHeadedAttention"]
    assert relpos_sdpa._shift_is_view(latest(4, 96, 0.0))
    assert not relpos_sdpa._shift_is_view(latest(4, 96, 0.0, zero_triu=True))
    assert not relpos_sdpa._shift_is_view(legacy(4, 96, 0.0))


def test_relative_position_bias_is_rebuilt_in_the_backward_not_kept(monkeypatch):
    """``relpos_sdpa._LeanBias`` (the CUDA path) on CPU, with the memory-efficient kernel's two ops replaced by their
    contract in plain torch: the same outputs and gradients as the stock module (fp64), and, unlike the plain SDPA
    path, no (batch, head, time, time) tensor kept for the backward. tests/test_model_attention.py's GPU tests run
    the real kernels."""
    torch.manual_seed(0)
    dtype, T = torch.float64, 40
    stock = CLASSES["RelPositionMultiHeadedAttention"](4, 96, 0.0).to(dtype).train()
    ours = copy.deepcopy(stock)
    model_attention.apply(ours, optin.Request("sdpa", "config"))
    x = torch.randn(3, T, 96, dtype=dtype)
    pos = torch.randn(1, 2 * T - 1, 96, dtype=dtype)
    mask = torch.ones(3, 1, T, dtype=torch.bool)
    mask[1, :, 25:] = False

    def run(module):
        xi, pi = x.clone().requires_grad_(), pos.clone().requires_grad_()
        out, shapes = _saved_shapes(module, xi, xi, xi, pi, mask)
        (out * torch.linspace(-1, 1, 96, dtype=dtype)).sum().backward()
        return [out.detach(), xi.grad, pi.grad, *[p.grad for p in module.parameters()]], shapes

    plain, plain_shapes = run(copy.deepcopy(ours))
    assert (3, 4, T, T) in plain_shapes  # SDPA keeps the bias it was given
    monkeypatch.setattr(relpos_sdpa, "_lean_possible", lambda module, *tensors: relpos_sdpa._shift_is_view(module))
    monkeypatch.setattr(relpos_sdpa._LeanBias, "forward_op", efficient_kernel.forward)
    monkeypatch.setattr(relpos_sdpa._LeanBias, "backward_op", efficient_kernel.backward)
    lean, lean_shapes = run(ours)
    assert not [s for s in lean_shapes if s[-2:] == (T, T)], lean_shapes
    reference, _ = run(stock)
    grads_scale = max(g.abs().max() for g in reference[3:])
    for i, (a, b) in enumerate(zip(reference, lean)):
        scale = grads_scale if i >= 3 else a.abs().max()
        assert (a - b).abs().max() <= 1e-12 * scale, (i, ((a - b).abs().max() / scale).item())


# ----------------------------------------------------------------------------------------- doctor


def test_doctor_reports_the_opt_in(monkeypatch):
    from espnet_flashcompat.doctor import attention as doctor_attention, report as doctor

    findings = []
    add = lambda level, topic, message, fix="": findings.append((level, topic, message))  # noqa: E731
    state = doctor_attention.model_attention(add, [{"device": "cpu"}])
    assert (state["opted_in_by_env"], state["requested"], findings) == (False, "auto", [])
    assert state["decisions"][0]["selfattn"]["implementation"] == SDPA
    assert state["decisions"][1]["rel_selfattn"]["rejected"][FLASH].startswith("ESPnet's relative-position")
    monkeypatch.setenv(optin.ENV_VAR, "eager")
    state = doctor_attention.model_attention(add, [{"device": "cpu"}])
    assert state["opted_in_by_env"] and state["decisions"][0]["selfattn"]["implementation"] == "eager"
    assert findings[-1][:2] == (doctor.WARNING, "model_attention")
    monkeypatch.setenv(optin.ENV_VAR, "fast")
    assert doctor_attention.model_attention(add, [{"device": "cpu"}])["env_error"]
    assert findings[-1][:2] == (doctor.ERROR, "model_attention")


# ------------------------------------------------------------------------------ fresh interpreters (slow)

_PROBE = SCRIPT + """
torch.manual_seed(1)
out = model.encode(speech, lengths)[0]
printed = io.StringIO()
ASRTask.print_config(printed)
flags = ("use_flash_attn", "use_sdpa", "dropout", "causal", "cross_attn")
attn = lambda m: {k: repr(getattr(m, k, None)) for k in flags}
print(json.dumps(dict(
    wrapped=hasattr(vars(ASRTask)["build_model"].__func__, "_espnet_flashcompat_wrapped"),
    modules=[(n, f"{type(m).__module__}.{type(m).__qualname__}") for n, m in model.named_modules()],
    attention={n: attn(m) for n, m in model.named_modules() if hasattr(m, "use_flash_attn")},
    output=out.detach().double().sum().item(), output_bytes=hashlib.sha256(out.detach().numpy().tobytes()).hexdigest(),
    print_config=printed.getvalue())))
"""


@pytest.mark.slow
def test_without_the_opt_in_a_build_is_stock(tmp_path):
    """Same modules, same flags, same train-mode outputs, same --print_config as ESPnet with our hook disabled."""
    (tmp_path / "tokens.txt").write_text("\n".join(TOKENS) + "\n")
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(MODEL))
    argv = [tmp_path / "model.yaml", tmp_path / "tokens.txt"]
    ours = run([sys.executable, "-c", _PROBE, *argv])
    stock = run([sys.executable, "-c", _PROBE, *argv], env={"ESPNET_FLASHCOMPAT_DISABLE": "1"})
    assert ours.returncode == 0 and stock.returncode == 0, ours.stderr[-3000:] + stock.stderr[-3000:]
    ours, stock = (json.loads(p.stdout.strip().splitlines()[-1]) for p in (ours, stock))
    assert ours.pop("wrapped") and not stock.pop("wrapped")  # the hook was on in one process only
    assert len(ours["attention"]) == 4
    assert ours == stock


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Six one-second utterances with char transcripts, Kaldi style, plus shape files and the token list."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    files = {"wav.scp": [], "text": [], "speech_shape": [], "text_shape": [], "tokens.txt": TOKENS}
    for i in range(6):
        key, words = f"utt{i}", "".join(rng.choice(list("abc"), size=3))
        soundfile.write(root / f"{key}.wav", (0.1 * rng.standard_normal(16000)).astype("float32"), 16000)
        files["wav.scp"].append(f"{key} {root / key}.wav")
        files["text"].append(f"{key} {words}")
        files["speech_shape"].append(f"{key} 16000")
        files["text_shape"].append(f"{key} 3")
    for name, lines in files.items():
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def _train(corpus, tmp_path, out, *extra_argv, config=None, pythonpath=(), env=None):
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump({**MODEL, "optim": "adam", "optim_conf": {"lr": 0.001}, "max_epoch": 1,
                                    "batch_type": "folded", "batch_size": 2, "num_iters_per_epoch": 3,
                                    "num_workers": 0, "keep_nbest_models": 1, **(config or {})}))
    argv = [sys.executable, "-m", "espnet2.bin.asr_train", "--config", path, "--output_dir", tmp_path / out,
            "--ngpu", "0", "--token_type", "char", "--token_list", corpus / "tokens.txt", "--normalize", "none",
            "--use_preprocessor", "true", "--fold_length", "80000", "--fold_length", "150", *extra_argv]
    for split in ("train", "valid"):
        argv += [f"--{split}_data_path_and_name_and_type", f"{corpus}/wav.scp,speech,sound",
                 f"--{split}_data_path_and_name_and_type", f"{corpus}/text,text,text",
                 f"--{split}_shape_file", corpus / "speech_shape", f"--{split}_shape_file", corpus / "text_shape"]
    return run(argv, pythonpath=pythonpath, env=env, timeout=900)


def _decode(corpus, exp, out, env=None, ngpu=0):
    return run([sys.executable, "-m", "espnet2.bin.asr_inference", "--ngpu", str(ngpu),
                "--asr_train_config", exp / "config.yaml", "--asr_model_file", exp / "1epoch.pth", "--beam_size", "2",
                "--output_dir", out,
                "--data_path_and_name_and_type", f"{corpus}/wav.scp,speech,sound"], env=env, timeout=600)


@pytest.mark.slow
def test_asr_train_without_the_opt_in_trains_exactly_as_stock(corpus, tmp_path):
    ours = _train(corpus, tmp_path, "ours")
    stock = _train(corpus, tmp_path, "stock", env={"ESPNET_FLASHCOMPAT_DISABLE": "1"})
    assert ours.returncode == 0 and stock.returncode == 0, ours.stderr[-3000:] + stock.stderr[-3000:]
    assert "model attention" not in ours.stderr
    saved = {name: (tmp_path / name / "config.yaml").read_text().replace(str(tmp_path / name), "EXP")
             .replace(f"{name}.yaml", "CONFIG.yaml") for name in ("ours", "stock")}
    assert optin.OPTION not in saved["ours"] and saved["ours"] == saved["stock"]
    weights = {name: torch.load(tmp_path / name / "1epoch.pth", map_location="cpu") for name in ("ours", "stock")}
    assert list(weights["ours"]) == list(weights["stock"])
    assert all(torch.equal(weights["ours"][k], weights["stock"][k]) for k in weights["stock"])


@pytest.mark.slow
def test_asr_train_and_inference_with_the_yaml_opt_in(corpus, tmp_path):
    proc = _train(corpus, tmp_path, "exp", config={optin.OPTION: "auto"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model attention policy (requested auto by model_attn_implementation) on 1 decoder selfattn, 1 decoder " \
           "source selfattn, 2 encoder selfattn modules" in proc.stderr
    assert "model attention: encoder selfattn attention sdpa on cpu float32 (requested auto by model_attn_implementation); " \
           "rejected flash_attention_2: " in proc.stderr
    assert ESPNET_FALLBACK not in proc.stderr
    assert yaml.safe_load((tmp_path / "exp" / "config.yaml").read_text())[optin.OPTION] == "auto"
    decoded = _decode(corpus, tmp_path / "exp", tmp_path / "dec")  # build_model_from_file reads the key back
    assert decoded.returncode == 0, decoded.stderr[-3000:]
    assert "model attention policy (requested auto by model_attn_implementation)" in decoded.stderr
    # the saved config still loads without us: ESPnet reads it back as a Namespace, no parser involved
    bare = _decode(corpus, tmp_path / "exp", tmp_path / "bare", env={"ESPNET_FLASHCOMPAT_DISABLE": "1"})
    assert bare.returncode == 0, bare.stderr[-3000:]
    assert "model attention" not in bare.stderr
    for out in ("dec", "bare"):
        hyps = (tmp_path / out / "1best_recog" / "text").read_text().splitlines()
        assert sorted(h.split()[0] for h in hyps) == [f"utt{i}" for i in range(6)]


@pytest.mark.slow
def test_asr_train_with_the_env_opt_in_and_a_broken_flash_attn(corpus, tmp_path, broken_flash_attn):
    """flash_attention_2 asked from the environment, flash-attn installed without its kernels: one warning names the
    cause for the whole model, training runs on SDPA; the saved config has no key of ours."""
    proc = _train(corpus, tmp_path, "exp", pythonpath=[broken_flash_attn], env={optin.ENV_VAR: FLASH})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if "model attention:" in line and "WARNING" in line]
    assert len(ours) == 1, ours
    assert ("selfattn attention sdpa (requested flash_attention_2 by ESPNET_FLASHCOMPAT_MODEL_ATTN); rejected "
            "flash_attention_2: ModuleNotFoundError: No module named 'flash_attn_2_cuda'") in ours[0]
    assert ESPNET_FALLBACK not in proc.stderr
    assert optin.OPTION not in (tmp_path / "exp" / "config.yaml").read_text()
    assert (tmp_path / "exp" / "1epoch.pth").is_file()


@pytest.mark.slow
def test_strict_from_the_command_line_refuses_at_build_time(corpus, tmp_path):
    proc = _train(corpus, tmp_path, "exp", "--model_attn_implementation", FLASH, "--model_attn_strict", "true")
    assert proc.returncode != 0
    assert "AttentionUnavailableError: strict: selfattn attention sdpa (requested flash_attention_2 by " \
           "model_attn_implementation); rejected flash_attention_2: ModuleNotFoundError" in proc.stderr


_ESPNET3 = """
import json, sys, torch, yaml
from espnet3.utils.task_utils import get_espnet_model, save_espnet_config
from espnet_flashcompat.espnet import model_attention
task, config, out = sys.argv[1:4]
model_config = yaml.safe_load(open(config))
model = get_espnet_model(task, model_config)  # what espnet3.systems.base.training builds the model with
g = torch.Generator().manual_seed(0)
model.encode(0.1 * torch.randn(2, 8000, generator=g), torch.tensor([8000, 5600]))
save_espnet_config(task, {"model": model_config}, out)
policy = model_attention.policy_of(model)
print(json.dumps(dict(request=policy.request.backend, modules=policy.modules,
                      decisions={" ".join(k): d.implementation for k, d in policy.decisions.items()},
                      saved=yaml.safe_load(open(out + "/config.yaml")).get("model_attn_implementation"))))
"""


@pytest.mark.slow
@only_on("current", "ESPnet3 ships with espnet 202611")
def test_espnet3_model_config_opts_in(tmp_path):
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({**MODEL, "token_list": TOKENS, optin.OPTION: "sdpa"}))
    proc = run([sys.executable, "-c", _ESPNET3, "espnet3.systems.esp2_asr.task.ASRTask", tmp_path / "model.yaml",
                tmp_path / "exp"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"request": "sdpa", "modules": {"encoder selfattn": 2, "decoder selfattn": 1, "decoder source selfattn": 1},
                      "decisions": {"encoder selfattn cpu torch.float32": "sdpa"}, "saved": "sdpa"}


# ----------------------------------------------------------------------------------------- GPU only

_needs_ampere = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
                                   reason="needs a CUDA GPU of compute capability 8.0 or newer")


def _asr_batch(device):
    speech, lengths = _speech(device)
    text = torch.tensor([[2, 3, 4, 2], [4, 3, 0, 0]], device=device)
    return dict(speech=speech, speech_lengths=lengths, text=text, text_lengths=torch.tensor([4, 2], device=device))


def _dropout_active(module, device):
    x = torch.randn(2, 50, module.h * module.d_k, device=device)
    mask = torch.ones(2, 1, 50, dtype=torch.bool, device=device)
    torch.manual_seed(0)
    a = module(x, x, x, mask)
    torch.manual_seed(1)
    return not torch.equal(a, module(x, x, x, mask))


@pytest.mark.gpu
def test_gpu_fp32_never_runs_flash_keeps_dropout_and_gives_no_per_module_warnings(tmp_path, caplog):
    """auto in fp32 on CUDA: SDPA and eager contend (flash-attn runs fp16/bf16 only), each site runs its pick."""
    model = build(tmp_path, model_attn_implementation="auto").cuda().train()
    with caplog.at_level(logging.INFO):
        loss = model(**_asr_batch("cuda"))[0]
        loss.backward()
    decisions = model_attention.policy_of(model).decisions
    assert {k[0] for k in decisions} == {"encoder selfattn", "decoder selfattn", "decoder source selfattn"}
    for (site, device, dtype), decision in decisions.items():
        assert (device, dtype) == ("cuda:0", "torch.float32") and decision.measured
        assert decision.implementation in (SDPA, "eager")
        if guard.probe_flash_attn() is None:
            assert "dtype float32 (FlashAttention runs fp16/bf16 only" in decision.rejected[0].reason
    assert ESPNET_FALLBACK not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("espnet_flashcompat")]
    for module in _attention_modules(model):
        picked = decisions[(module._flashcompat_site, "cuda:0", "torch.float32")].implementation
        assert (module.use_sdpa, module.use_flash_attn) == (picked == SDPA, False)
    assert _dropout_active(_attention_modules(model)[0], "cuda")


_GPU_FLASH = """
import json, sys, torch
from espnet2.tasks.asr import ASRTask
from espnet_flashcompat.espnet import model_attention
config, tokens = sys.argv[1:3]
def build(implementation):
    argv = ["--config", config, "--token_list", tokens, "--model_attn_implementation", implementation]
    torch.manual_seed(0)
    return ASRTask.build_model(ASRTask.get_parser().parse_args(argv)).cuda()
g = torch.Generator().manual_seed(0)
speech, lengths = (0.1 * torch.randn(2, 8000, generator=g)).cuda(), torch.tensor([8000, 5600]).cuda()
text, text_lengths = torch.tensor([[2, 3, 4, 2], [4, 3, 0, 0]]).cuda(), torch.tensor([4, 2]).cuda()
model = build("flash_attention_2").train()
with torch.autocast("cuda", torch.bfloat16):
    loss = model(speech, lengths, text, text_lengths)[0]
loss.backward()
flags = [m.use_flash_attn for m in model.modules() if isinstance(m, model_attention._PolicyAttention)]
sdpa = build("sdpa").eval()
model.eval()
with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
    (a, frames), b = model.encode(speech, lengths), sdpa.encode(speech, lengths)[0]
valid = (torch.arange(a.size(1), device="cuda")[None, :] < frames[:, None])[..., None]  # flash zeroes padded frames
a, b = a.float() * valid, b.float() * valid
decisions = {" ".join(k): d.implementation for k, d in model_attention.policy_of(model).decisions.items()}
print("RESULT " + json.dumps(dict(decisions=decisions, flags=flags, loss=loss.item(),
                                  diff=(a - b).abs().max().item(), scale=b.abs().max().item())))
"""


@pytest.mark.gpu
@_needs_ampere
def test_gpu_bf16_with_a_healthy_flash_attn_runs_flash(tmp_path, healthy_flash_attn):
    """flash_attention_2 under bf16 AMP with a working flash-attn: ESPnet's own flash path (varlen on the ragged batch), no module
    falls back, and the encoder agrees with SDPA within bf16 on the valid frames (unit roundoff 2**-8, a few u each:
    3e-2; ESPnet's varlen path outputs zeros on padded frames, its SDPA path attends from them)."""
    proc = run_script(tmp_path, _GPU_FLASH, pythonpath=healthy_flash_attn)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ")[-1])
    assert result["decisions"] == {f"{site} cuda:0 torch.bfloat16": FLASH for site in
                                   ("encoder selfattn", "decoder selfattn", "decoder source selfattn")}
    assert result["flags"] == [True] * 4  # none fell back
    assert "failed at run time" not in proc.stderr and ESPNET_FALLBACK not in proc.stderr
    assert result["diff"] <= 3e-2 * result["scale"] and np.isfinite(result["loss"])


@pytest.mark.gpu
@_needs_ampere
def test_gpu_relative_position_sdpa_under_autocast_matches_stock():
    torch.manual_seed(0)
    stock = CLASSES["RelPositionMultiHeadedAttention"](4, 256, 0.0).cuda().eval()
    ours = copy.deepcopy(stock)
    model_attention.apply(ours, optin.Request("auto", "config"))
    x, pos = torch.randn(4, 300, 256, device="cuda"), torch.randn(1, 599, 256, device="cuda")
    mask = torch.ones(4, 1, 300, dtype=torch.bool, device="cuda")
    mask[1, :, 200:] = False
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        a, b = stock(x, x, x, pos, mask).float(), ours(x, x, x, pos, mask).float()
    assert ours.use_sdpa and (a - b).abs().max() <= 3e-2 * a.abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_relative_position_lean_bias_matches_and_keeps_no_time_by_time_tensor(dtype):
    """The real memory-efficient kernel ops under ``relpos_sdpa._LeanBias``: against the plain SDPA path (which
    runs the same kernel, as SDPA picks it for this float bias) with attention dropout 0.1 and one seed, so the
    backward's dropout replay is checked too; and against the stock module without dropout. fp32 or bf16 AMP."""
    T = 300
    torch.manual_seed(0)
    stock = CLASSES["RelPositionMultiHeadedAttention"](4, 256, 0.1).cuda().train()
    x, pos = torch.randn(4, T, 256, device="cuda"), torch.randn(1, 2 * T - 1, 256, device="cuda")
    mask = torch.ones(4, 1, T, dtype=torch.bool, device="cuda")
    mask[1, :, 200:] = False

    def run(module, lean=True):
        module.zero_grad(set_to_none=True)
        xi, pi = x.clone().requires_grad_(), pos.clone().requires_grad_()
        possible = relpos_sdpa._lean_possible
        relpos_sdpa._lean_possible = possible if lean else (lambda *args: False)
        try:
            torch.manual_seed(1)
            with torch.autocast("cuda", torch.bfloat16, enabled=dtype == torch.bfloat16):
                out, shapes = _saved_shapes(module, xi, xi, xi, pi, mask)
            (out.float() * torch.linspace(-1, 1, 256, device="cuda")).sum().backward()
        finally:
            relpos_sdpa._lean_possible = possible
        return [out.detach().float(), xi.grad, pi.grad, *[p.grad for p in module.parameters()]], shapes

    def close(a_run, b_run, tolerance):
        grads_scale = max(g.abs().max() for g in a_run[3:])
        for i, (a, b) in enumerate(zip(a_run, b_run)):
            scale = grads_scale if i >= 3 else a.abs().max()
            assert (a - b).abs().max() <= tolerance * scale, (i, ((a - b).abs().max() / scale).item())

    ours = copy.deepcopy(stock)
    model_attention.apply(ours, optin.Request("sdpa", "config"))
    lean, lean_shapes = run(ours)
    plain, plain_shapes = run(ours, lean=False)
    assert (4, 4, T, T) in plain_shapes and not [s for s in lean_shapes if s[-2:] == (T, T)], lean_shapes
    close(plain, lean, 1e-5 if dtype == torch.float32 else 2e-2)  # same kernel, same dropout mask
    stock.dropout_rate = ours.dropout_rate = 0.0
    stock.dropout.p = ours.dropout.p = 0.0
    close(run(stock)[0], run(ours)[0], 1e-4 if dtype == torch.float32 else 5e-2)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_beam_search_under_measured_auto_gives_stocks_hypotheses(corpus, tmp_path):
    """``asr_inference`` on the GPU with ESPNET_FLASHCOMPAT_MODEL_ATTN=auto: the encoder and the decode steps are
    measured (one token against the cache, against the encoder output), and the hypotheses are stock's."""
    trained = _train(corpus, tmp_path, "exp")
    assert trained.returncode == 0, trained.stderr[-3000:]
    ours = _decode(corpus, tmp_path / "exp", tmp_path / "ours", env={optin.ENV_VAR: "auto"}, ngpu=1)
    bare = _decode(corpus, tmp_path / "exp", tmp_path / "bare", env={"ESPNET_FLASHCOMPAT_DISABLE": "1"}, ngpu=1)
    assert ours.returncode == 0 and bare.returncode == 0, ours.stderr[-3000:] + bare.stderr[-3000:]
    measured = [line for line in ours.stderr.splitlines() if "model attention: decoder" in line and "measured" in line]
    assert any("eval, batch <= " in line and " 1 x " in line for line in measured), ours.stderr[-3000:]
    hyps = {out: (tmp_path / out / "1best_recog" / "text").read_text() for out in ("ours", "bare")}
    assert hyps["ours"] == hyps["bare"]


_GPU_BROKEN = """
import json, sys, torch, yaml
from espnet2.tasks.asr import ASRTask
from espnet_flashcompat.espnet import model_attention
config, tokens = sys.argv[1:3]
args = ASRTask.get_parser().parse_args(["--config", config, "--token_list", tokens])
model = ASRTask.build_model(args).cuda().train()
g = torch.Generator().manual_seed(0)
speech, lengths = (0.1 * torch.randn(2, 8000, generator=g)).cuda(), torch.tensor([8000, 5600]).cuda()
text, text_lengths = torch.tensor([[2, 3, 4, 2], [4, 3, 0, 0]]).cuda(), torch.tensor([4, 2]).cuda()
with torch.autocast("cuda", torch.bfloat16):
    loss = model(speech, lengths, text, text_lengths)[0]
loss.backward()
policy = model_attention.policy_of(model)
print(json.dumps({" ".join(k): d.implementation for k, d in policy.decisions.items()}))
"""


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_broken_flash_attn_names_the_cause_once_and_runs_sdpa(tmp_path, broken_flash_attn):
    proc = run_script(tmp_path, _GPU_BROKEN, {optin.OPTION: "auto"}, pythonpath=[broken_flash_attn])
    assert proc.returncode == 0, proc.stderr[-3000:]
    picks = json.loads(proc.stdout.strip().splitlines()[-1])  # auto measured the backends that run
    assert set(picks) == {f"{site} cuda:0 torch.bfloat16" for site in
                          ("encoder selfattn", "decoder selfattn", "decoder source selfattn")}
    assert all(p == "eager" or p.startswith("sdpa") for p in picks.values()), picks
    named = [line for line in proc.stderr.splitlines()
             if "flash_attn_2_cuda" in line and not line.startswith("Failed to import Flash Attention")]
    assert len(named) == 1 and "flash-attn is installed but broken" in named[0], named
    assert ESPNET_FALLBACK not in proc.stderr
