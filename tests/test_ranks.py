"""Agreement across DDP ranks: ``ranks.merge`` on its own, then real 2-process process groups (gloo) on
CPU, and on one GPU shared by two processes (gloo accepts CUDA tensors): every rank picks the same backend from
all ranks' timings, a rank that cannot run a backend vetoes it without a deadlock, ranks on different backends
still train one model, and calibration's extra passes never reach DDP's gradient hooks.
"""

import json
import sys

import pytest
import torch

from espnet_flashcompat.attention import calibrate, choice, policy, ranks
from espnet_flashcompat.attention.choice import Timing
from faults import run

FLASH, SDPA = policy.FLASH, policy.SDPA
BASE = policy.AttnDecision(policy.AUTO, FLASH, contenders=(FLASH, SDPA), context="cuda:0 bfloat16")


def test_merge_takes_the_slowest_rank_and_lets_any_rank_veto():
    fast_flash = {FLASH: Timing(FLASH, 80.0, 8 << 30, 0.01), SDPA: Timing(SDPA, 84.0, 17 << 29, 0.01)}
    slow_flash = {FLASH: Timing(FLASH, 95.0, 8 << 30, 0.09), SDPA: Timing(SDPA, 85.0, 17 << 29, 0.01)}
    merged = ranks.merge([fast_flash, slow_flash])
    assert merged[FLASH] == Timing(FLASH, 95.0, 8 << 30, 0.09) and merged[SDPA] == Timing(SDPA, 85.0, 17 << 29, 0.01)
    assert choice.pick(merged, BASE, "train").implementation == SDPA  # rank 0 alone would have kept flash
    vetoed = ranks.merge([fast_flash, {FLASH: "Tesla T4 is sm_75", SDPA: Timing(SDPA, 90.0, 9 << 30, 0.0)}])
    assert vetoed[FLASH] == "rank 1: Tesla T4 is sm_75"
    decision = choice.pick(vetoed, BASE, "train")
    assert decision.implementation == SDPA
    assert policy.Rejection(FLASH, "failed during calibration: rank 1: Tesla T4 is sm_75") in decision.rejected
    assert ranks.merge([{SDPA: Timing(SDPA, 1.0, 1)}, {}])[SDPA] == "rank 1: not a contender there"


def test_one_process_exchanges_nothing():
    timings = {SDPA: Timing(SDPA, 1.0, 0)}
    assert ranks.world_size() == 1 and ranks.gather(timings) == [timings]


def test_calibration_never_reaches_gradient_hooks(tiny_wav2vec2):
    """DDP's reducer hooks the gradient accumulators; calibration differentiates with torch.autograd.grad, which
    accumulates nothing: no hook fires and no .grad appears, so DDP sees one backward per step, the real one."""
    from espnet_flashcompat.frontend import S3prlFlashCompatFrontend

    fe = S3prlFlashCompatFrontend(frontend_conf={"upstream": "hf_wav2vec2_custom", "path_or_url": str(tiny_wav2vec2)})
    fired = []
    for p in fe.parameters():
        p.register_post_accumulate_grad_hook(lambda p: fired.append(p))
    x, n = torch.randn(2, 16000), torch.tensor([16000, 9000])
    from espnet2.asr.frontend.s3prl import S3prlFrontend

    timings = calibrate.measure(lambda: S3prlFrontend.forward(fe, x, n), (SDPA, policy.EAGER),
                                lambda b: policy.apply(fe.upstream, b), fe, x.device)
    assert all(isinstance(t, Timing) for t in timings.values()), timings
    assert fired == [] and all(p.grad is None for p in fe.parameters())
    feats, lens = fe(x, n)
    feats.sum().backward()  # the control: a real backward does fire them
    assert len(fired) > 0


SCRIPT = r'''
import json, os, sys
import torch, torch.distributed as dist, torch.multiprocessing as mp

class Model(torch.nn.Module):
    def __init__(self, fe):
        super().__init__()
        self.fe, self.head = fe, torch.nn.Linear(fe.output_size(), 4)

    def forward(self, x, n):
        feats, lens = self.fe(x, n)
        return self.head(feats).square().mean()


def main(rank, scenario, world, init, tiny, device, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    import logging
    from espnet_flashcompat.attention import policy, ranks
    from espnet_flashcompat.frontend import S3prlFlashCompatFrontend
    logs = []
    class Keep(logging.Handler):
        def emit(self, record):
            logs.append(record.getMessage())
    logging.getLogger("espnet_flashcompat").addHandler(Keep())
    logging.getLogger("espnet_flashcompat").setLevel(logging.INFO)
    torch.manual_seed(0)
    attn = {"agree": "auto", "ddp_auto": "auto"}.get(scenario, "sdpa" if rank == 0 else "eager")
    fe = S3prlFlashCompatFrontend(frontend_conf={"upstream": "hf_wav2vec2_custom", "path_or_url": tiny},
                                  attn_implementation=attn).to(device)
    g = torch.Generator().manual_seed(rank)  # each rank its own batch, as DDP's sampler gives
    lengths = [16000 + 4000 * rank, 9000]
    x, n = 0.1 * torch.randn(2, max(lengths), generator=g), torch.tensor(lengths)
    x, n = x.to(device), n.to(device)
    result = {"rank": rank, "world": ranks.world_size()}
    def decide(base):  # what the frontend does at its first forward under DDP, with a fresh tuner each time
        from espnet_flashcompat.attention import tuner
        timed = []
        def measure(contenders):
            timed.append(list(contenders))
            return fe._measure(contenders, x, n)
        decision = tuner.Tuner().decision((device, "torch.float32"), base, (True, 2, 32768, True), True,
                                          policy.hf_model(fe.upstream), torch.device(device), measure)
        return decision, timed
    if scenario == "agree":
        # Rank 1 cannot run eager (as a rank with an old GPU cannot run flash-attn): it says so.
        contenders = ("sdpa", "eager") if rank == 0 else ("sdpa",)
        rejected = () if rank == 0 else (policy.Rejection("eager", "refused on rank 1 for this test"),)
        base = policy.AttnDecision("auto", "sdpa", rejected, context=f"{device} float32", contenders=contenders)
        decision, _ = decide(base)
        result.update(chosen=decision.implementation, summary=decision.summary())
    elif scenario == "step_peak":
        # The memory cap against the step's peak at a bucket's second batch: rank 0's step holds little besides the
        # attention (flash-attn alone fits), rank 1's much (the memory-efficient kernel fits too): one decision.
        from espnet_flashcompat.attention import tuner
        from espnet_flashcompat.attention.choice import Timing
        gib = 2 ** 30
        ms = {"flash_attention_2": 11.0, "sdpa:efficient": 10.6}
        peaks = {"flash_attention_2": int(0.81 * gib), "sdpa:efficient": int(0.90 * gib)}
        base = policy.AttnDecision("auto", "flash_attention_2", (), context=f"{device} bfloat16",
                                   contenders=tuple(ms))
        site = tuner.Tuner(step_peak=lambda: int((0.85 if rank == 0 else 3.3) * gib))
        picks = [site.decision((device, "torch.bfloat16"), base, (True, 2, 32768, True), True, None,
                               torch.device(device), lambda c: {b: Timing(b, ms[b], peaks[b], 0.01, 9) for b in c})
                 for _ in range(2)]
        result.update(picks=[d.implementation for d in picks], summary=picks[-1].summary())
    elif scenario == "store":
        # Each rank its own store (as nodes without a shared file system have): filled on both, then on rank 0 only.
        from espnet_flashcompat.attention import store
        os.environ[store.ENV_VAR] = f"{out}.calibration.{rank}"
        base = policy.AttnDecision("auto", "sdpa", (), context=f"{device} float32", contenders=("sdpa", "eager"))
        steps = []
        for step in ("empty", "one rank cleared", "both filled"):
            if step == "one rank cleared" and rank == 1:
                store.clear()
            decision, timed = decide(base)
            steps.append(dict(step=step, timed=timed, chosen=decision.implementation, summary=decision.summary()))
        result.update(steps=steps)
    else:  # "train": ranks on different backends under DDP still train one model; "ddp_auto": auto under DDP
        torch.manual_seed(0)
        # find_unused_parameters, as ESPnet recipes with S3PRL frontends set unused_parameters: true
        model = torch.nn.parallel.DistributedDataParallel(Model(fe).to(device), find_unused_parameters=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        amp = scenario == "ddp_auto"  # bf16 autocast: flash-attn and SDPA's kernels contend
        for _ in range(3):
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
                loss = model(x, n)
            opt.zero_grad()
            loss.backward()
            opt.step()
        flat = torch.cat([p.detach().flatten().cpu() for p in model.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        decision = fe.attn_decision
        result.update(identical=all(torch.equal(gathered[0], t) for t in gathered), backend=decision.implementation,
                      summary=decision.summary(), measured=decision.measured,
                      contenders=list(fe._static[fe._key].contenders))
    result["logs"] = logs
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.barrier()  # every rank's result is on disk
    # Leave without tearing gloo down: its threads, destroyed at exit, aborted a run now and then after the results
    # were written ("terminate called without an active exception"); the parent reads only the exit code.
    os._exit(0)

if __name__ == "__main__":
    scenario, tiny, device, out = sys.argv[1:5]
    mp.spawn(main, args=(scenario, 2, f"file://{out}.store", tiny, device, out), nprocs=2)
'''


def _two_ranks(tmp_path, scenario, tiny, device="cpu", pythonpath=()):
    script = tmp_path / "ranks_probe.py"
    script.write_text(SCRIPT)
    out = tmp_path / "result"
    proc = run([sys.executable, script, scenario, tiny, device, out], pythonpath=pythonpath, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((tmp_path / f"result.{rank}").read_text()) for rank in range(2)]


@pytest.mark.slow
def test_two_ranks_pick_the_same_backend_and_a_veto_holds(tmp_path, tiny_wav2vec2):
    results = _two_ranks(tmp_path, "agree", str(tiny_wav2vec2))
    assert [r["world"] for r in results] == [2, 2]
    assert [r["chosen"] for r in results] == ["sdpa", "sdpa"]  # eager is vetoed by rank 1, whatever it cost
    assert "eager: failed during calibration: rank 1: refused on rank 1 for this test" in results[0]["summary"]
    assert all("decided across 2 ranks" in r["summary"] for r in results), results


@pytest.mark.slow
def test_ranks_pick_again_alike_against_the_largest_steps_peak(tmp_path, tiny_wav2vec2):
    """At a bucket's second batch the memory cap counts the step's peak (``attention.step_memory``): each rank's
    differs, every rank takes the largest, and all pick alike (rank 0's own would have kept flash-attn)."""
    results = _two_ranks(tmp_path, "step_peak", str(tiny_wav2vec2))
    assert [r["picks"] for r in results] == [["flash_attention_2", "sdpa:efficient"]] * 2, results
    assert all("memory against the step's peak of 3.30 GiB, decided across 2 ranks" in r["summary"] for r in results), \
        results


@pytest.mark.slow
def test_ranks_use_the_calibration_store_only_when_every_rank_has_the_entry(tmp_path, tiny_wav2vec2):
    """A store entry some ranks see and others do not must not split them: then every rank measures, and all
    take one decision; when every rank has it, none measures."""
    results = _two_ranks(tmp_path, "store", str(tiny_wav2vec2))
    for step, expect_timing in (("empty", True), ("one rank cleared", True), ("both filled", False)):
        rows = [next(s for s in r["steps"] if s["step"] == step) for r in results]
        assert all(bool(row["timed"]) == expect_timing for row in rows), (step, rows)
        assert rows[0]["chosen"] == rows[1]["chosen"], (step, rows)
    assert all("from the calibration store" in r["steps"][2]["summary"] for r in results), results


@pytest.mark.slow
def test_ranks_on_different_backends_still_train_one_model(tmp_path, tiny_wav2vec2):
    """What a local run-time fallback leaves behind: rank 0 on sdpa, rank 1 on eager. DDP averages the gradients
    and every rank applies the same update, so the parameters stay identical on both ranks."""
    results = _two_ranks(tmp_path, "train", str(tiny_wav2vec2))
    assert [r["backend"] for r in results] == ["sdpa", "eager"]
    assert all(r["identical"] for r in results)


@pytest.mark.gpu
def test_two_processes_on_one_gpu_agree(tmp_path, tiny_wav2vec2):
    results = _two_ranks(tmp_path, "agree", str(tiny_wav2vec2), device="cuda:0")
    assert [r["chosen"] for r in results] == ["sdpa", "sdpa"]
    assert all("decided across 2 ranks" in r["summary"] for r in results), results


@pytest.mark.gpu
def test_ddp_auto_on_one_gpu_calibrates_across_ranks_and_trains_one_model(tmp_path, tiny_wav2vec2,
                                                                         healthy_flash_attn):
    """The frontend's own path under DDP: two processes share the GPU, auto in bf16 autocast, the first forward
    (inside DDP's) calibrates flash-attn against SDPA's kernels on each rank's own batch; both ranks take the same
    backend from the merged timings, and after three steps the parameters are identical on both."""
    results = _two_ranks(tmp_path, "ddp_auto", str(tiny_wav2vec2), device="cuda:0", pythonpath=healthy_flash_attn)
    print(json.dumps([{k: r[k] for k in ("rank", "backend", "summary", "contenders")} for r in results], indent=1))
    assert results[0]["measured"] and results[0]["contenders"][0] == "flash_attention_2", results[0]
    assert any(c.startswith("sdpa") for c in results[0]["contenders"]), results[0]
    assert results[0]["backend"] == results[1]["backend"], results
    assert all("decided across 2 ranks" in r["summary"] and "cuda:0 bfloat16" in r["summary"] for r in results)
    assert all(r["identical"] for r in results)
