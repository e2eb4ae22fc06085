"""Derive the small word -> definition sample in examples/data/ from Debian's `wordnet-base` package.

    apt-get download wordnet-base && dpkg -x wordnet-base_*.deb /tmp/wn
    python scripts/make_wordnet_data.py /tmp/wn/usr/share/wordnet

Writes `wordnet_train.jsonl` and `wordnet_eval.jsonl` (prompt/completion rows). Deterministic. WordNet 3.0 is
(c) 2006 Princeton University under the WordNet 3.0 licence, reproduced in examples/data/LICENSE-wordnet.md.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

POS_FILES = {"noun": "data.noun", "verb": "data.verb", "adj": "data.adj", "adv": "data.adv"}


def read_synsets(wordnet_dir: Path) -> list[tuple[str, str, str]]:
    """(word, part of speech, definition) for every synset whose first lemma is a single word."""
    rows = []
    for pos, filename in POS_FILES.items():
        for line in (wordnet_dir / filename).read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            fields, gloss = line.split("|", 1)
            parts = fields.split()
            word = parts[4].split("(")[0]
            definition = gloss.split(";")[0].strip()
            if "_" in word or not word.isalpha() or not 12 <= len(definition) <= 120:
                continue
            rows.append((word.lower(), pos, definition))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wordnet_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "examples" / "data")
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--eval", type=int, default=300)
    args = parser.parse_args()

    rows = read_synsets(args.wordnet_dir)
    seen: set[str] = set()
    unique = []
    for word, pos, definition in rows:  # one sense per word, so eval words never appear in training
        if word not in seen:
            seen.add(word)
            unique.append((word, pos, definition))
    random.Random(0).shuffle(unique)
    splits = {"train": unique[: args.train], "eval": unique[args.train : args.train + args.eval]}
    for split, items in splits.items():
        path = args.out / f"wordnet_{split}.jsonl"
        with path.open("w") as f:
            for word, pos, definition in items:
                row = {"prompt": f"Define the {pos} '{word}'.\nDefinition:", "completion": f" {definition}."}
                f.write(json.dumps(row) + "\n")
        print(f"wrote {len(items)} rows to {path}")


if __name__ == "__main__":
    main()
