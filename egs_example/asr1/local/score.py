#!/usr/bin/env python3
"""Token (word) error rate of a hypothesis text file against a reference, both Kaldi ``utt w1 w2 ...``.

Also prints the chance level: the error rate of guessing every word uniformly at random from the
reference vocabulary, with the right number of words (seeded, so reproducible). The summary is the\nlast line of the output.
"""

import argparse
import random


def read_text(path):
    with open(path) as f:
        return {k: v.split() for k, _, v in (line.rstrip("\n").partition(" ") for line in f)}


def edit_distance(ref, hyp):
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def error_rate(refs, hyps):
    return 100.0 * sum(edit_distance(refs[k], hyps.get(k, [])) for k in refs) / sum(map(len, refs.values()))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ref", required=True)
    parser.add_argument("--hyp", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=0, help="print the first SHOW references and hypotheses")
    args = parser.parse_args()
    refs, hyps = read_text(args.ref), read_text(args.hyp)
    missing = len(set(refs) - set(hyps))
    vocab = sorted({w for words in refs.values() for w in words})
    rng = random.Random(args.seed)
    guesses = {k: [rng.choice(vocab) for _ in words] for k, words in refs.items()}
    for k in sorted(refs)[: args.show]:
        print(f"  {k}  ref: {' '.join(refs[k])}\n  {' ' * len(k)}  hyp: {' '.join(hyps.get(k, []))}")
    print(
        f"TER={error_rate(refs, hyps):.1f}% (chance ~{error_rate(refs, guesses):.0f}%, "
        f"{sum(map(len, refs.values()))} words, {len(refs)} utts{f', {missing} missing' if missing else ''})"
    )


if __name__ == "__main__":
    main()
