"""The model-wide policy's measured ``auto`` (``model_policy``, ``model_calibration``) on models ESPnet builds.

On CUDA, ``auto`` times every backend that passes on each attention site's real calls. On the tests' CPU-only
machines nothing contends (the rule: SDPA), so ``cpu_contenders`` lets SDPA and eager contend on the CPU as they do
on a GPU: what is tested is the bookkeeping (a calibration per site and shape bucket, the step's output that of the
backends picked, the decode step's own bucket, the calibration store, explicit requests), the timings being real
CPU timings. GPU-marked: the pick on the H200's real backends, in bf16, with flash-attn.
"""

import json
import logging
import sys

import pytest
import torch
import yaml

from espnet_flashcompat.attention import calibrate
from espnet_flashcompat.attention.policy import AUTO, EAGER, SDPA
from espnet_flashcompat.espnet import model_attention, model_calibration, model_policy, optin
from espnet_models import MODEL, SCRIPT, TOKENS, build, run_script
from faults import run

CONFORMER = {"encoder": "conformer",
             "encoder_conf": {"output_size": 32, "attention_heads": 2, "linear_units": 64, "num_blocks": 2,
                              "input_layer": "conv2d", "pos_enc_layer_type": "rel_pos",
                              "selfattention_layer_type": "rel_selfattn", "rel_pos_type": "latest",
                              "attention_dropout_rate": 0.1}}
SITES = ("encoder selfattn", "decoder selfattn", "decoder source selfattn")


@pytest.fixture(autouse=True)
def _no_env_request(monkeypatch):
    for name in (optin.ENV_VAR, optin.STRICT_ENV, "ESPNET_FLASHCOMPAT_ATTN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def cpu_contenders(monkeypatch):
    """SDPA and eager contend on the CPU under ``auto``, as the backends that pass do on CUDA."""
    decide = model_policy.decide

    def contending(requested, kind, device=None, dtype=None, source="config", strict=False):
        decision = decide(requested, kind, device, dtype, source, strict)
        if requested == AUTO and device is not None:
            decision = model_policy.AttnDecision(requested, SDPA, decision.rejected, source, decision.context,
                                                 (SDPA, EAGER))
        return decision

    monkeypatch.setattr(model_policy, "decide", contending)


def _batch(samples=8000):
    g = torch.Generator().manual_seed(0)
    speech = 0.1 * torch.randn(2, samples, generator=g)
    text = torch.tensor([[2, 3, 4, 2], [4, 3, 0, 0]])
    return dict(speech=speech, speech_lengths=torch.tensor([samples, samples * 7 // 10]), text=text,
                text_lengths=torch.tensor([4, 2]))


def _step(model, batch):
    torch.manual_seed(3)  # dropout is on: the same draws for every run
    loss = model(**batch)[0]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


def _measured(caplog):
    return [r.getMessage() for r in caplog.records if "measured" in r.getMessage() and "model attention" in
            r.getMessage()]


def _stock_on(stock, ours):
    """``stock``'s attention modules set to what ``ours``'s modules ran last (ESPnet's own flags)."""
    for a, b in zip(stock.modules(), ours.modules()):
        if isinstance(b, model_attention._PolicyAttention):
            a.use_sdpa, a.use_flash_attn = b.use_sdpa, b.use_flash_attn


def test_auto_measures_each_site_once_per_bucket_and_runs_its_pick(tmp_path, cpu_contenders, caplog):
    stock = build(tmp_path).train()
    ours = build(tmp_path, model_attn_implementation="auto").train()
    batch = _batch()
    with caplog.at_level(logging.INFO, logger="espnet_flashcompat"):
        loss, grads = _step(ours, batch)
        _step(ours, batch)  # the same buckets: nothing measured again
    measured = _measured(caplog)
    assert sorted(m.split("model attention: ")[1].split(": attention ")[0] for m in measured) == sorted(SITES)
    assert all(" ms / " in m and "train, batch <= 2" in m for m in measured), measured
    assert any(m.startswith("espnet-flashcompat: model attention: encoder selfattn") and "padded keys" in m
               for m in measured), measured
    policy = model_attention.policy_of(ours)
    # a bucket counts batches, not calls: its second look comes at its 50th batch whatever the number of layers
    assert all(list(policy._tuners[site].seen.values()) == [2] for site in SITES)
    picks = {site: policy.decisions[(site, "cpu", "torch.float32")] for site in SITES}
    assert all(d.measured and d.implementation in (SDPA, EAGER) for d in picks.values()), picks
    for module in ours.modules():  # every module of a site ran its site's pick
        if isinstance(module, model_attention._PolicyAttention):
            assert module.use_sdpa == (picks[module._flashcompat_site].implementation == SDPA)
    # calibration leaves no trace: the step equals stock ESPnet's on the same backends, RNG draws included
    _stock_on(stock, ours)
    stock_loss, stock_grads = _step(stock, batch)
    torch.testing.assert_close(loss, stock_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == stock_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], stock_grads[name], rtol=1e-4, atol=1e-6)


def test_the_decode_step_is_a_bucket_of_its_own_and_decodes_as_stock(tmp_path, cpu_contenders, caplog):
    """Beam search runs the decoder one token at a time against the encoder output: queries of one frame."""
    stock = build(tmp_path).eval()
    ours = build(tmp_path, model_attn_implementation="auto").eval()
    batch = _batch()
    with torch.no_grad():
        memory, _ = stock.encode(batch["speech"], batch["speech_lengths"])
        ys, more = torch.tensor([[5, 2, 3], [5, 4, 4]]), torch.tensor([[5, 2, 3, 2], [5, 4, 4, 3]])
        masks = [torch.tril(torch.ones(n, n, dtype=torch.bool)).unsqueeze(0) for n in (3, 4)]
        with caplog.at_level(logging.INFO, logger="espnet_flashcompat"):
            out, cache = ours.decoder.forward_one_step(ys, masks[0], memory, cache=None)
            step, _ = ours.decoder.forward_one_step(more, masks[1], memory, cache=cache)
        _stock_on(stock, ours)
        reference, ref_cache = stock.decoder.forward_one_step(ys, masks[0], memory, cache=None)
        ref_step, _ = stock.decoder.forward_one_step(more, masks[1], memory, cache=ref_cache)
    measured = _measured(caplog)
    assert any("decoder selfattn" in m and "eval, batch <= 2, 4 x 4 frames" in m for m in measured), measured
    assert any("decoder selfattn" in m and "eval, batch <= 2, 1 x 4 frames" in m for m in measured), measured
    assert any("decoder source selfattn" in m and "eval, batch <= 2, 1 x " in m for m in measured), measured
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step, ref_step, rtol=1e-5, atol=1e-6)


def test_a_decode_step_decides_each_site_once_not_once_per_layer(tmp_path, cpu_contenders, monkeypatch):
    """Beam search gives each decoder layer its own slice of the step's mask and expands the encoder output at every
    step (``BatchBeamSearch``): a site's later layers, and later steps on the same encoder output, take the site's
    decision without deciding again; another mode (autocast) is decided again."""
    model = build(tmp_path, model_attn_implementation="auto",
                  decoder_conf={**MODEL["decoder_conf"], "num_blocks": 3}).eval()
    decided, policy = [], model_attention.policy_of(model)
    static = policy.static

    def counted(site, *args):  # every decision that is not the site's latest looks up the rule's first
        decided.append(site)
        return static(site, *args)

    monkeypatch.setattr(policy, "static", counted)
    batch, beam = _batch(), 3
    with torch.no_grad():
        memory, _ = model.encode(batch["speech"][:1], batch["speech_lengths"][:1])
        ys, cache, steps = torch.full((beam, 1), 5), None, []
        decided.clear()
        for n in range(1, 5):
            mask = torch.tril(torch.ones(n, n, dtype=torch.bool)).unsqueeze(0)
            before = cache
            logp, cache = model.decoder.forward_one_step(ys, mask, memory.expand(beam, -1, -1), cache=before)
            ys = torch.cat([ys, logp.argmax(-1, keepdim=True)], dim=1)
            steps.append(decided[:]), decided.clear()
        assert steps[0] == ["decoder selfattn", "decoder source selfattn"]
        assert steps[1:] == [["decoder selfattn"]] * 3  # the same encoder output: the source attention's decision holds
        model.decoder.forward_one_step(ys[:, :-1], mask, memory.expand(beam, -1, -1), cache=before)
        assert decided == []  # the last step again, on the same mask: nothing to decide
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.decoder.forward_one_step(ys[:, :-1], mask, memory.expand(beam, -1, -1), cache=before)
    assert decided == ["decoder selfattn", "decoder source selfattn"]
    assert ("decoder source selfattn", "cpu", "torch.bfloat16") in policy.decisions


def test_padded_keys_are_read_off_a_batchs_mask_and_a_masks_of_one_row_is_not_read():
    """Padded keys by ESPnet's own test (the last query row); a decode step's causal mask, one for every hypothesis,
    pads nothing and is not read (on a GPU, reading it waits for the step's kernels): a mask on the meta device,
    which has no data, shows it."""
    padded = torch.ones(2, 1, 4, dtype=torch.bool)
    assert not model_calibration.ragged(padded)
    padded[1, 0, 3:] = False
    assert model_calibration.ragged(padded)
    assert not model_calibration.ragged(None)
    assert not model_calibration.ragged(torch.ones(1, 4, 4, dtype=torch.bool, device="meta"))
    with pytest.raises(Exception):  # a batch's own mask is read
        model_calibration.ragged(torch.ones(2, 4, 4, dtype=torch.bool, device="meta"))


def test_relative_position_attention_is_timed_on_another_shape_too(tmp_path, cpu_contenders):
    """``calibrate``'s cost of a new shape: the call cut short on both time axes, its relative positions too."""
    model = build(tmp_path, model_attn_implementation="auto", **CONFORMER).train()
    _step(model, _batch())
    policy = model_attention.policy_of(model)
    site = policy._tuners["encoder rel_selfattn"]
    (timings,) = site.timings.values()
    assert {b: t.new_shape_ms > 0 for b, t in timings.items()} == {SDPA: True, EAGER: True}
    assert policy.decisions[("encoder rel_selfattn", "cpu", "torch.float32")].measured


def test_a_shorter_call_keeps_its_relative_positions_centred():
    """``Call.reshaped``: relative positions -(T' - 1) .. T' - 1 of the shorter call, from the middle of the
    original ones, for both of ESPnet's layouts (2 T - 1 centred, T)."""
    from espnet_flashcompat.espnet import espnet_compat

    rel = {c.__name__: c for c in espnet_compat.attention_classes()}["RelPositionMultiHeadedAttention"](2, 8, 0.0)
    x = torch.randn(1, 10, 8)
    positions = torch.arange(-9, 10, dtype=torch.float32).view(1, 19, 1).expand(1, 19, 8)
    mask = torch.ones(1, 1, 10, dtype=torch.bool)
    call = model_calibration.Call.of(rel, type(rel), x, (x, x, positions, mask), {}, None)
    short = call.reshaped(2)
    assert short["query"].shape[1] == short["key"].shape[1] == short["mask"].shape[-1] == 6
    assert short["pos_emb"][0, :, 0].tolist() == list(range(-5, 6))
    step = model_calibration.Call.of(rel, type(rel), x[:, :1], (x, x, positions, mask), {}, None).reshaped(2)
    assert (step["query"].shape[1], step["key"].shape[1], step["mask"].shape[-1]) == (1, 6, 6)  # a decode step
    legacy = model_calibration.Call.of(rel, type(rel), x, (x, x, positions[:, :10], mask), {}, None).reshaped(1)
    assert legacy["pos_emb"].shape[1] == 8
    assert model_calibration.Call.of(rel, type(rel), x, (x, x, positions[:, :7], mask), {}, None).reshaped(1) is None


def test_a_later_model_takes_its_picks_from_the_calibration_store(tmp_path, cpu_contenders, caplog):
    first = build(tmp_path, model_attn_implementation="auto").train()
    _step(first, _batch())
    picks = {k: d.implementation for k, d in model_attention.policy_of(first).decisions.items()}
    later = build(tmp_path, seed=1, model_attn_implementation="auto").train()  # other weights, same sites
    with caplog.at_level(logging.INFO, logger="espnet_flashcompat"):
        _step(later, _batch())
    text = caplog.text
    assert text.count("from the calibration store: measured at batch 1") == len(SITES), text
    assert "calibration took" not in text
    assert {k: d.implementation for k, d in model_attention.policy_of(later).decisions.items()} == picks


def test_explicit_requests_and_the_cpu_rule_measure_nothing(tmp_path, caplog, monkeypatch):
    measured = []
    real = calibrate.measure
    monkeypatch.setattr(calibrate, "measure", lambda *a, **k: measured.append(a[1]) or real(*a, **k))
    for request in ("auto", "sdpa", "eager"):  # auto without cpu_contenders: the rule, SDPA on the CPU
        model = build(tmp_path, model_attn_implementation=request).train()
        _step(model, _batch())
        expected = SDPA if request == AUTO else request
        assert {d.implementation for d in model_attention.policy_of(model).decisions.values()} == {expected}
    assert measured == []


_ONE_PROCESS = SCRIPT + """
import logging
logging.basicConfig(level=logging.INFO, force=True)  # after the build, which configured logging
from espnet_flashcompat.espnet import model_attention, model_policy
decide = model_policy.decide
def contending(requested, kind, device=None, dtype=None, source="config", strict=False):
    d = decide(requested, kind, device, dtype, source, strict)
    if requested == "auto" and device is not None:
        d = model_policy.AttnDecision(requested, "sdpa", d.rejected, source, d.context, ("sdpa", "eager"))
    return d
model_policy.decide = contending  # the policy decides at the first forward: SDPA and eager contend on the CPU
loss = model(speech, lengths, torch.tensor([[2, 3, 4, 2], [4, 3, 0, 0]]), torch.tensor([4, 2]))[0]
loss.backward()
print(json.dumps({" ".join(k): d.implementation for k, d in model_attention.policy_of(model).decisions.items()}))
"""


@pytest.mark.slow
def test_a_later_process_measures_nothing(tmp_path):
    """What a second training run, or a decode job after training, finds: the first process's entries."""
    procs = [run_script(tmp_path, _ONE_PROCESS, {optin.OPTION: "auto"}) for _ in range(2)]
    assert all(p.returncode == 0 for p in procs), procs[-1].stderr[-3000:]
    assert procs[0].stderr.count("calibration took") == len(SITES)
    assert "calibration took" not in procs[1].stderr
    assert procs[1].stderr.count("from the calibration store: measured at batch 1") == len(SITES)
    assert procs[0].stdout.splitlines()[-1] == procs[1].stdout.splitlines()[-1]


# ----------------------------------------------------------------------------------------- GPU only

_GPU_PICK = """
import json, logging, sys, torch
logging.basicConfig(level=logging.INFO)
from espnet2.tasks.asr import ASRTask
from espnet_flashcompat.espnet import model_attention
config, tokens = sys.argv[1:3]
def build(implementation):
    argv = ["--config", config, "--token_list", tokens, "--model_attn_implementation", implementation]
    torch.manual_seed(0)
    return ASRTask.build_model(ASRTask.get_parser().parse_args(argv)).cuda().train()
g = torch.Generator().manual_seed(0)
speech, lengths = (0.1 * torch.randn(4, 48000, generator=g)).cuda(), torch.tensor([48000, 40000, 30000, 20000]).cuda()
text, text_lengths = torch.randint(2, 5, (4, 12), generator=g).cuda(), torch.tensor([12, 10, 8, 6]).cuda()
def step(model):
    torch.manual_seed(3)
    with torch.autocast("cuda", torch.bfloat16):
        loss = model(speech, lengths, text, text_lengths)[0]
    loss.backward()
    return loss.item()
auto = build("auto")
loss = step(auto)
policy = model_attention.policy_of(auto)
sites = {}
for (site, device, dtype), d in policy.decisions.items():
    timings = policy._tuners[site].timings
    (timed,) = timings.values()
    sites[site] = dict(pick=d.implementation, measured=d.measured,
                       timed={b: t if isinstance(t, str) else t.ms for b, t in timed.items()},
                       rejected={r.backend: r.reason for r in d.rejected})
print("RESULT " + json.dumps(dict(sites=sites, loss=loss)))
"""


@pytest.mark.gpu
def test_gpu_auto_times_flash_sdpas_kernels_and_eager_on_each_site(tmp_path, healthy_flash_attn):
    """bf16 AMP with a working flash-attn on an Ampere+ GPU: every site times flash-attn (ESPnet's own path),
    SDPA's memory-efficient kernel (pinned) and eager on its real calls (cuDNN's, presumed to build a graph per
    length, sits out a first look); SDPA's flash kernel, which takes no mask, is left out with its reason; the pick
    is one of those timed."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("flash-attn and SDPA's cuDNN kernel need sm_80+")
    proc = run_script(tmp_path, _GPU_PICK, pythonpath=healthy_flash_attn)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ")[-1])
    assert set(result["sites"]) == set(SITES)
    for site, row in result["sites"].items():
        assert row["measured"], (site, row)
        timed = {b: ms for b, ms in row["timed"].items() if isinstance(ms, float)}
        assert {"flash_attention_2", "sdpa:efficient", "eager"} <= set(timed), (site, row)
        assert row["pick"] in timed
        assert "takes no attention mask" in row["rejected"].get("sdpa:flash", ""), (site, row)


_GPU_DDP = """
import json, os, sys, torch
import torch.distributed as dist
import torch.multiprocessing as mp

def main(rank, config, tokens, init, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    from espnet2.tasks.asr import ASRTask
    from espnet_flashcompat.espnet import model_attention
    argv = ["--config", config, "--token_list", tokens, "--model_attn_implementation", "auto"]
    torch.manual_seed(0)
    model = ASRTask.build_model(ASRTask.get_parser().parse_args(argv)).to("cuda:0").train()
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)  # each rank its own batch, as DDP's sampler gives
    n = [16000 + 8000 * rank, 12000]
    speech, lengths = (0.1 * torch.randn(2, max(n), generator=g)).cuda(), torch.tensor(n).cuda()
    text, text_lengths = torch.tensor([[2, 3, 4, 2], [4, 3, 0, 0]]).cuda(), torch.tensor([4, 2]).cuda()
    for _ in range(2):
        with torch.autocast("cuda", torch.bfloat16):
            loss = ddp(speech, lengths, text, text_lengths)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    flat = torch.cat([p.detach().flatten().cpu() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    decisions = model_attention.policy_of(model).decisions
    with open(f"{out}.{rank}", "w") as f:
        json.dump(dict(picks={k[0]: d.implementation for k, d in decisions.items()},
                       together=all("decided across 2 ranks" in d.context for d in decisions.values()),
                       identical=torch.equal(gathered[0], gathered[1])), f)
    dist.barrier()  # every rank's result is on disk
    os._exit(0)  # without tearing gloo down, whose threads at exit abort a run now and then (tests/test_ranks.py)

if __name__ == "__main__":
    config, tokens, out = sys.argv[1:4]
    mp.spawn(main, args=(config, tokens, f"file://{out}.store", out), nprocs=2)
"""


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_ddp_ranks_agree_on_each_sites_pick(tmp_path):
    """Two DDP ranks on one GPU (gloo), each on its own batch: every site's pick is decided from both ranks'
    timings, the same on both, and the ranks train one model."""
    (tmp_path / "tokens.txt").write_text("\n".join(TOKENS) + "\n")
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(MODEL))
    script = tmp_path / "ddp.py"
    script.write_text(_GPU_DDP)
    out = tmp_path / "result"
    proc = run([sys.executable, script, tmp_path / "model.yaml", tmp_path / "tokens.txt", out], timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = [json.loads((tmp_path / f"result.{rank}").read_text()) for rank in range(2)]
    assert results[0]["picks"] == results[1]["picks"] and set(results[0]["picks"]) == set(SITES), results
    assert all(r["together"] and r["identical"] for r in results), results
