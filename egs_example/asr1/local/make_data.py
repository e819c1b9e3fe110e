#!/usr/bin/env python3
"""Generate the synthetic "tone language" corpus: 16 kHz wavs plus Kaldi-style data dirs.

Each word of the language is a distinct sound (a pure tone, a chirp, a chord, a trill or filtered
noise); an utterance is a random word sequence with random gaps, loudness, speaker pitch and
background noise. Speakers of the test split never occur in training. Fully deterministic in --seed.
"""

import argparse
import logging
from pathlib import Path

import numpy as np
import soundfile as sf

FS = 16000
WORDS = ("low", "mid", "high", "top", "rise", "fall", "chord", "trill", "hiss", "rumble")
SPLITS = {"train": (800, 8), "dev": (100, 2), "test": (200, 4)}  # utterances, speakers


def _noise(rng, n, smooth):
    """White noise (smooth=0: high-passed, smooth>0: low-passed by a moving average of that width)."""
    x = rng.standard_normal(n + max(smooth, 1))
    x = np.convolve(x, np.ones(smooth) / smooth, "valid")[:n] if smooth else np.diff(x)[:n]
    return x / (np.abs(x).max() + 1e-9)


def word_sound(word, n, pitch, rng):
    """One word, ``n`` samples long, every frequency scaled by the speaker's ``pitch``."""
    t = np.arange(n) / FS
    tone = {"low": 300, "mid": 600, "high": 1200, "top": 2400}
    if word in tone:
        x = np.sin(2 * np.pi * tone[word] * pitch * t)
    elif word in ("rise", "fall"):
        f0, f1 = (400 * pitch, 2000 * pitch)[:: 1 if word == "rise" else -1]
        x = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * t[-1])))
    elif word == "chord":
        x = 0.5 * (np.sin(2 * np.pi * 500 * pitch * t) + np.sin(2 * np.pi * 750 * pitch * t))
    elif word == "trill":
        x = np.sin(2 * np.pi * 1000 * pitch * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 30 * t))
    else:  # hiss / rumble
        x = _noise(rng, n, 0 if word == "hiss" else 24)
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.01 * FS))
    return x * fade


def utterance(rng, pitch):
    words = list(rng.choice(WORDS, size=rng.integers(2, 7)))
    pieces = [np.zeros(int(rng.uniform(0.05, 0.3) * FS))]
    for w in words:
        amp = 10 ** (rng.uniform(-20, -2) / 20)
        pieces.append(amp * word_sound(w, int(rng.uniform(0.12, 0.24) * FS), pitch, rng))
        pieces.append(np.zeros(int(rng.uniform(0.03, 0.2) * FS)))
    x = np.concatenate(pieces)
    x += 10 ** (rng.uniform(-50, -30) / 20) * rng.standard_normal(len(x))
    return (x / max(1.0, np.abs(x).max())).astype(np.float32), words


def make_split(out, name, n_utts, n_spk, rng, first_spk):
    wav_dir = out / "wav" / name
    wav_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(first_spk, first_spk + n_spk):
        spk, pitch = f"spk{s:02d}", rng.uniform(0.92, 1.08)
        for u in range(n_utts // n_spk):
            utt = f"{spk}-{name}{u:04d}"
            x, words = utterance(rng, pitch)
            path = wav_dir / f"{utt}.wav"
            sf.write(path, x, FS, subtype="PCM_16")
            rows.append((utt, spk, path, " ".join(words)))
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    rows.sort()
    for fname, col in (("wav.scp", 2), ("utt2spk", 1), ("text", 3)):
        (d / fname).write_text("".join(f"{r[0]} {r[col]}\n" for r in rows))
    logging.info("%s: %d utterances, %d speakers, %.1f min", name, len(rows), n_spk, sum(
        sf.info(r[2]).duration for r in rows) / 60)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("data"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s (make_data) %(message)s")
    rng = np.random.default_rng(args.seed)
    first_spk = 0
    for name, (n_utts, n_spk) in SPLITS.items():
        make_split(args.out, name, n_utts, n_spk, rng, first_spk)
        first_spk += n_spk


if __name__ == "__main__":
    main()
