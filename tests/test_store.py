"""The calibration store (CPU): keys, round trips, where it lives, many writing processes, and bad state.

Bad state must never stop a run: every case gives one warning and reads as a miss. Tests run as root, where
``chmod`` does not stop a write: an unwritable store is made by putting a regular file where a directory must be,
and a read-only file system by failing the write call itself with ``EROFS``.
"""

import dataclasses
import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from espnet_flashcompat.attention import calibration_key, store

REPO = Path(__file__).resolve().parents[1]
STORE_FILE = REPO / "espnet_flashcompat" / "attention" / "store.py"
KEY = calibration_key.Key(gpu="NVIDIA H200", capability="9.0", driver="570.86.15", cuda="13.0", cudnn="91900",
                torch="2.11.0+cu130", transformers="5.17.0", flash_attn="2.8.3.post2",
                site=(("dtype", "bfloat16"), ("head_dim", 64), ("heads", 12), ("layers", 12), ("model", "HubertModel")),
                train=True, trainable=94_000_000, bucket=(8, 262144, False),
                contenders=("flash_attention_2", "sdpa:cudnn", "sdpa:efficient"))
ENTRY = store.Entry("sdpa:cudnn", {"sdpa:cudnn": {"backend": "sdpa:cudnn", "ms": 25.3, "peak_bytes": 2**30,
                                                  "spread": 0.01},
                                   "flash_attention_2": {"backend": "flash_attention_2", "ms": 34.8,
                                                         "peak_bytes": 2**30, "spread": 0.02},
                                   "sdpa:efficient": "RuntimeError: No available kernel"},
                    (("flash_attention_2", "slower (...)"), ("sdpa:efficient", "failed during calibration: ...")),
                    cost_s=4.9, batch=1, written="2026-12-04T09:00:00+00:00")


@pytest.fixture(autouse=True)
def store_dir(tmp_path, monkeypatch):
    """Each test: its own store directory, and warnings counted afresh."""
    monkeypatch.setenv(store.ENV_VAR, str(tmp_path / "calibration"))
    monkeypatch.setattr(store, "_warned", set())
    return tmp_path / "calibration"


def _warnings(caplog):
    return [r for r in caplog.records if r.name == store.__name__ and r.levelno == logging.WARNING]


# --- the key and the entry


def test_round_trip(store_dir):
    assert store.load(KEY) is None
    assert store.save(KEY, ENTRY)
    assert store.load(KEY) == ENTRY
    assert [path.name for path in store_dir.iterdir()] == [f"{KEY.digest}.json"]  # no temporary file left
    (record,) = store.entries()
    assert record.key == KEY and record.entry == ENTRY and record.key.flat()["model"] == "HubertModel"


def test_round_trip_of_the_calibration_objects():
    """A stored calibration gives back the timings and the very decision that ``choice.pick`` made."""
    from espnet_flashcompat.attention import choice, policy

    base = policy.AttnDecision("auto", "flash_attention_2", (policy.Rejection("eager", "never contends"),), "config",
                               "cuda:0 bfloat16", KEY.contenders)
    timings = {"flash_attention_2": choice.Timing("flash_attention_2", 34.8, 2**30, 0.02),
               "sdpa:cudnn": choice.Timing("sdpa:cudnn", 25.3, 2**30, 0.01),
               "sdpa:efficient": "RuntimeError: No available kernel"}
    measured = choice.pick(timings, base, "train, first batch")
    assert store.save(KEY, store.Entry.of(measured, timings, cost_s=4.9))
    entry = store.load(KEY)
    assert entry.pick == "sdpa:cudnn" and entry.cost_s == 4.9 and entry.version and entry.written
    assert entry.timing_objects() == timings
    assert entry.decision(base, "train, first batch") == measured
    assert entry.decision(dataclasses.replace(base, contenders=("flash_attention_2",)), "x") is None  # cannot run now


def test_every_key_field_changes_the_key():
    other = {"gpu": "NVIDIA A100-SXM4-80GB", "capability": "8.0", "driver": "550.54.15", "cuda": "12.8",
             "cudnn": "90800", "torch": "2.12.1+cu128", "transformers": "4.57.1", "flash_attn": "missing",
             "site": KEY.site[:-1] + (("model", "Wav2Vec2Model"),), "train": False, "trainable": 0,
             "bucket": (8, 262144, True), "contenders": KEY.contenders[1:], "format": calibration_key.FORMAT + 1}
    assert set(other) == {f.name for f in dataclasses.fields(calibration_key.Key)}
    digests = {calibration_key.Key(**{**dataclasses.asdict(KEY), name: value}).digest for name, value in other.items()}
    assert len(digests | {KEY.digest}) == len(other) + 1
    assert dataclasses.replace(KEY).digest == KEY.digest == calibration_key.Key.from_fields(KEY.fields()).digest


def test_the_digest_is_stable_across_processes():
    code = f"from espnet_flashcompat.attention import calibration_key; print(calibration_key.Key.from_fields({KEY.fields()!r}).digest)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True)
    assert out.stdout.strip() == KEY.digest


class HubertModel(torch.nn.Module):
    def __init__(self, heads=12, layers=12):
        super().__init__()
        self.config = SimpleNamespace(num_attention_heads=heads, hidden_size=768, num_hidden_layers=layers,
                                      attention_dropout=0.1)
        self.proj = torch.nn.Linear(4, 4)


def test_key_for_reads_the_live_stack(monkeypatch):
    """What key_for reads from the process: a changed torch, GPU, flash-attn, site, mode, bucket or contender set
    misses; the order of the contenders does not matter."""
    model = HubertModel()
    bucket, contenders = (True, 8, 262144, False), ("flash_attention_2", "sdpa")
    key = calibration_key.key_for(model, torch.bfloat16, bucket, contenders, flash_attn="2.8.3")
    assert key.gpu == "cpu" and key.torch == torch.__version__ and key.trainable == 4 * 4 + 4
    assert dict(key.site) == {"model": "HubertModel", "heads": 12, "head_dim": 64, "layers": 12,
                              "dtype": "bfloat16", "attention_dropout": 0.1}
    assert calibration_key.key_for(model, torch.bfloat16, bucket, contenders[::-1], flash_attn="2.8.3") == key
    changed = [calibration_key.key_for(model, torch.float16, bucket, contenders, flash_attn="2.8.3"),
               calibration_key.key_for(HubertModel(heads=16), torch.bfloat16, bucket, contenders, flash_attn="2.8.3"),
               calibration_key.key_for(HubertModel(layers=24), torch.bfloat16, bucket, contenders, flash_attn="2.8.3"),
               calibration_key.key_for(model, torch.bfloat16, (False,) + bucket[1:], contenders, flash_attn="2.8.3"),
               calibration_key.key_for(model, torch.bfloat16, bucket[:3] + (True,), contenders, flash_attn="2.8.3"),
               calibration_key.key_for(model, torch.bfloat16, bucket, contenders[1:], flash_attn="2.8.3"),
               calibration_key.key_for(model, torch.bfloat16, bucket, contenders, flash_attn="2.8.3 broken"),
               calibration_key.key_for(model, torch.bfloat16, bucket, contenders, flash_attn="missing")]
    model.proj.requires_grad_(False)  # a frozen upstream: its train step has no backward through attention
    changed.append(calibration_key.key_for(model, torch.bfloat16, bucket, contenders, flash_attn="2.8.3"))
    model.proj.requires_grad_(True)
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    changed.append(calibration_key.key_for(model, torch.bfloat16, bucket, contenders, flash_attn="2.8.3"))
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = calibration_key.key_for(model, torch.bfloat16, bucket, contenders, torch.device("cuda:0"), flash_attn="2.8.3")
    assert (cuda.gpu, cuda.capability) == ("NVIDIA H200", "9.0") and cuda.driver
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    changed.append(cuda)
    changed.append(calibration_key.key_for(model, torch.bfloat16, bucket, contenders, torch.device("cuda:0"),
                                 flash_attn="2.8.3"))
    assert None not in changed and len({k.digest for k in changed} | {key.digest}) == len(changed) + 1


def test_the_site_of_a_real_transformers_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.HubertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                                       intermediate_size=37, conv_dim=(8, 8), conv_stride=(5, 5), conv_kernel=(10, 3),
                                       num_conv_pos_embeddings=4)
    key = calibration_key.key_for(transformers.HubertModel(config).eval(), torch.float16, (False, 8, 1024, True), ["sdpa"])
    assert dict(key.site) == {"model": "HubertModel", "heads": 4, "head_dim": 8, "layers": 2, "dtype": "float16",
                              "attention_dropout": 0.1}
    assert (key.train, key.trainable, key.bucket) == (False, 0, (8, 1024, True))
    assert key.transformers == transformers.__version__ and key.flash_attn  # a version, "... broken" or "missing"


def test_key_for_probes_flash_attn(monkeypatch):
    from espnet_flashcompat.s3prl import guard

    model, bucket = HubertModel(), (False, 1, 16384, False)
    monkeypatch.setattr(calibration_key, "_version", lambda dist: None if "flash" in dist else "1.0")
    assert calibration_key.key_for(model, torch.float32, bucket, ["sdpa"]).flash_attn == "missing"
    monkeypatch.setattr(calibration_key, "_version", lambda dist: "2.8.3")
    monkeypatch.setattr(guard, "probe_flash_attn", lambda: None)
    assert calibration_key.key_for(model, torch.float32, bucket, ["sdpa"]).flash_attn == "2.8.3"
    monkeypatch.setattr(guard, "probe_flash_attn", lambda: "undefined symbol")
    assert calibration_key.key_for(model, torch.float32, bucket, ["sdpa"]).flash_attn == "2.8.3 broken"


# --- where it lives


def test_location(monkeypatch, tmp_path):
    monkeypatch.setenv(store.ENV_VAR, str(tmp_path / "shared"))
    assert store.location() == tmp_path / "shared"
    for off in ("off", "OFF", "0", "false", "none"):
        monkeypatch.setenv(store.ENV_VAR, off)
        assert store.location() is None
        assert not store.save(KEY, ENTRY) and store.load(KEY) is None and store.entries() == []
    monkeypatch.setenv(store.ENV_VAR, "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert store.location() == tmp_path / "xdg" / "espnet-flashcompat" / "calibration"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # invalid by the XDG spec: ignored
    assert store.location() == tmp_path / "home" / ".cache" / "espnet-flashcompat" / "calibration"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv(store.ENV_VAR)
    assert store.location() == tmp_path / "home" / ".cache" / "espnet-flashcompat" / "calibration"
    assert store.save(KEY, ENTRY) and store.load(KEY) == ENTRY
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(store.ENV_VAR, "rel")
    assert store.location() == tmp_path / "rel"


def test_the_module_imports_without_torch():
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('store', sys.argv[1]); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code, str(STORE_FILE)], env=_env(), check=True)


# --- many writers


WRITER = textwrap.dedent("""
    import dataclasses, importlib.util, os, sys, time
    spec = importlib.util.spec_from_file_location("store", sys.argv[1])
    store = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(store)
    me, go = int(sys.argv[2]), sys.argv[3]
    base = store.Key.from_fields({key!r})
    while not os.path.exists(go):
        time.sleep(0.001)
    for i in range(60):
        timings = {{"sdpa": {{"ms": float(me * 1000 + i), "peak_bytes": me}}}}
        assert store.save(base, store.Entry("sdpa", timings, cost_s=float(me))), "lost a write"  # a key for all
        mine = dataclasses.replace(base, bucket=(me, i))  # a key of this process only
        assert store.save(mine, store.Entry("sdpa", timings)), "lost a write"
        seen = store.load(base)
        assert seen is None or seen.timings["sdpa"]["peak_bytes"] == seen.cost_s, "torn entry"
    """)


def test_eight_processes_write_and_read_at_once(store_dir, tmp_path):
    go = tmp_path / "go"
    script = WRITER.format(key=KEY.fields())
    procs = [subprocess.Popen([sys.executable, "-c", script, str(STORE_FILE), str(me), str(go)], env=_env(),
                              stderr=subprocess.PIPE, text=True) for me in range(8)]
    time.sleep(1.0)  # let them all import, then start them together
    go.touch()
    errors = [p.communicate(timeout=240)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(errors)
    assert not [e for e in errors if "WARNING" in e or "calibration store" in e], errors
    names = sorted(p.name for p in store_dir.iterdir())
    assert len(names) == 1 + 8 * 60 and all(n.endswith(".json") and not n.startswith(".") for n in names)
    records = store.entries()
    assert len(records) == 1 + 8 * 60 and not store._warned
    assert {r.key.bucket for r in records} == {KEY.bucket} | {(me, i) for me in range(8) for i in range(60)}
    last = store.load(KEY)
    assert last.timings["sdpa"]["peak_bytes"] == last.cost_s and last.cost_s in range(8)


MEASURER = textwrap.dedent("""
    import importlib.util, os, sys, time
    spec = importlib.util.spec_from_file_location("store", sys.argv[1])
    store = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(store)
    me, go, log = int(sys.argv[2]), sys.argv[3], sys.argv[4]
    key = store.Key.from_fields({key!r})
    while not os.path.exists(go):
        time.sleep(0.001)
    entry = store.lookup(key)
    if entry is None:  # this process measures: say so, take a while, and store it
        with open(log, "a") as f:
            f.write(f"{{me}}\\n")
        time.sleep(1.0)
        entry = store.Entry("sdpa", {{"sdpa": {{"ms": float(me)}}}}, cost_s=float(me))
        assert store.save(key, entry)
    print(entry.cost_s)
    """)


def test_parallel_jobs_that_miss_one_key_measure_it_once(store_dir, tmp_path):
    """Eight decode jobs meeting the same bucket at once: one measures, the others wait for its entry."""
    go, log = tmp_path / "go", tmp_path / "measured"
    script = MEASURER.format(key=KEY.fields())
    procs = [subprocess.Popen([sys.executable, "-c", script, str(STORE_FILE), str(me), str(go), str(log)],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for me in range(8)]
    time.sleep(1.0)
    go.touch()
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    (measurer,) = log.read_text().split()
    assert {out.strip() for out, _ in outs} == {f"{float(measurer)}"}  # every job uses the one measurement
    assert [p.name for p in store_dir.iterdir()] == [f"{KEY.digest}.json"]  # the claim is released


def test_a_claim_is_waited_for_up_to_a_timeout_and_a_stale_one_taken_over(store_dir):
    assert store.lookup(KEY) is None  # a miss: this process now holds the claim ...
    claim = store_dir / f".{KEY.digest}.claim"
    assert claim.exists()
    start = time.monotonic()
    assert store.lookup(KEY, timeout_s=0.3) is None  # ... which another process would wait for, up to its timeout
    assert 0.3 <= time.monotonic() - start < 5
    store.release(KEY)
    assert not claim.exists()
    claim.touch()
    os.utime(claim, (time.time() - store.STALE_S - 1,) * 2)  # a crashed process's claim
    start = time.monotonic()
    assert store.lookup(KEY) is None and time.monotonic() - start < 5 and time.time() - claim.stat().st_mtime < 5
    assert store.save(KEY, ENTRY) and not claim.exists() and store.lookup(KEY) == ENTRY


def test_an_entry_saved_between_the_miss_and_the_claim_is_used(store_dir, monkeypatch):
    claim = store._claim

    def late(key):
        store.save(key, ENTRY)  # another process finishes just after this one's miss
        return claim(key)

    monkeypatch.setattr(store, "_claim", late)
    assert store.lookup(KEY) == ENTRY
    assert [p.name for p in store_dir.iterdir()] == [f"{KEY.digest}.json"]  # and the claim given back


# --- bad state: one warning each, no exception, a miss


def _truncated(path):
    store.save(KEY, ENTRY)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


def _future(path):
    store.save(KEY, ENTRY)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "format": calibration_key.FORMAT + 1}))


BAD_FILES = {
    "corrupt": lambda path: path.write_bytes(b"\x00\xff not json"),
    "truncated": _truncated,
    "not an entry": lambda path: path.write_text(json.dumps({"format": calibration_key.FORMAT, "key": KEY.fields(),
                                                             "entry": {"pick": 3}})),
    "future version": _future,
    "unreadable": lambda path: path.mkdir(),  # root reads any file: a directory in its place cannot be read
    "another key": lambda path: path.write_text(json.dumps({"format": calibration_key.FORMAT, "entry": dataclasses.asdict(
        ENTRY), "key": dataclasses.replace(KEY, torch="0.0").fields()})),
}


@pytest.mark.parametrize("bad", list(BAD_FILES))
def test_a_bad_file_warns_once_and_reads_as_a_miss(bad, store_dir, caplog):
    store_dir.mkdir()
    path = store_dir / f"{KEY.digest}.json"
    BAD_FILES[bad](path)
    caplog.clear()
    for _ in range(3):
        assert store.load(KEY) is None
    store.entries()
    (warning,) = _warnings(caplog)
    assert str(path) in warning.getMessage() and "Fix: " in warning.getMessage()
    if bad == "unreadable":  # nor can it be replaced: the save fails, one more warning, and leaves no temporary file
        assert not store.save(KEY, ENTRY) and [p.name for p in store_dir.iterdir()] == [path.name]
    else:  # calibrate as without a store: the next save replaces the bad file
        assert store.save(KEY, ENTRY) and store.load(KEY) == ENTRY


@pytest.mark.parametrize("blocked", ["the store is a file", "its parent is a file"])
def test_an_unusable_location_warns_once_and_runs_without_a_store(blocked, store_dir, caplog, monkeypatch):
    if blocked == "the store is a file":
        store_dir.write_text("")
    else:
        store_dir.mkdir()
        (store_dir / "home").write_text("")
        monkeypatch.setenv(store.ENV_VAR, str(store_dir / "home" / "calibration"))
    for _ in range(3):
        assert store.load(KEY) is None and not store.save(KEY, ENTRY)
        assert store.entries() == [] and store.clear() == 0
    (warning,) = _warnings(caplog)
    assert "not a directory" in warning.getMessage() and store.ENV_VAR in warning.getMessage()


def test_a_read_only_store_warns_once(store_dir, caplog, monkeypatch):
    store.save(KEY, ENTRY)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(store.tempfile, "mkstemp", read_only)
    for _ in range(3):
        assert not store.save(dataclasses.replace(KEY, train=False), ENTRY)
        assert store.load(KEY) == ENTRY  # what is there still reads
    (warning,) = _warnings(caplog)
    assert "Read-only file system" in warning.getMessage() and "writable" in warning.getMessage()


def test_an_unexpected_error_never_escapes(caplog, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(calibration_key, "_canonical", broken)
    assert store.save(KEY, ENTRY) is False and store.load(KEY) is None and store.clear() == 0
    monkeypatch.setattr(calibration_key, "stack", broken)
    assert calibration_key.key_for(HubertModel(), torch.float32, (True, 1, 1, False), ["sdpa"]) is None
    assert len(_warnings(caplog)) == 1 and "boom" in _warnings(caplog)[0].getMessage()


# --- clear


def test_clear(store_dir):
    other_gpu = dataclasses.replace(KEY, gpu="NVIDIA A100-SXM4-80GB")
    wav2vec2 = dataclasses.replace(KEY, site=KEY.site[:-1] + (("model", "Wav2Vec2Model"),))
    for key in (KEY, other_gpu, wav2vec2):
        assert store.save(key, ENTRY)
    assert store.clear({"gpu": "NVIDIA B200"}) == 0
    assert store.clear({"gpu": "NVIDIA H200", "model": "Wav2Vec2Model"}) == 1
    assert {r.key for r in store.entries()} == {KEY, other_gpu}
    assert store.clear(lambda key: key.gpu.startswith("NVIDIA A100")) == 1
    assert [r.key for r in store.entries()] == [KEY]
    (store_dir / "junk.json").write_text("{")
    stale = store_dir / ".0123.tmp"
    stale.write_text("")
    os.utime(stale, (time.time() - 3600,) * 2)
    stale_claim = store_dir / f".{KEY.digest}.claim"
    stale_claim.write_text("")
    os.utime(stale_claim, (time.time() - 3600,) * 2)
    fresh = store_dir / ".4567.tmp"  # a writer's, under way: kept
    fresh.write_text("")
    assert store.clear() == 2
    assert [p.name for p in store_dir.iterdir()] == [fresh.name] and store.load(KEY) is None


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_the_command_line_lists_and_clears_the_store(tmp_path, monkeypatch):
    monkeypatch.setenv(store.ENV_VAR, str(tmp_path / "cal"))
    assert store.save(KEY, ENTRY)
    cli = [sys.executable, "-m", "espnet_flashcompat", "calibrations"]
    listed = subprocess.run(cli, capture_output=True, text=True, check=True).stdout
    assert f"{tmp_path / 'cal'}, 1 entries" in listed
    assert "NVIDIA H200 torch 2.11.0+cu130 HubertModel bfloat16 train [8/262144/False]: sdpa:cudnn" in listed
    as_json = json.loads(subprocess.run(cli + ["--json"], capture_output=True, text=True, check=True).stdout)
    assert as_json["entries"][0]["key"] == KEY.fields() and as_json["entries"][0]["entry"]["pick"] == "sdpa:cudnn"
    cleared = subprocess.run(cli + ["--clear"], capture_output=True, text=True, check=True).stdout
    assert cleared.startswith("removed 1 calibration(s)") and store.entries() == []
