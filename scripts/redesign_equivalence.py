"""Does the sampler redesign train the same way as the code before it, given the same ranks?

Forces one deterministic rank sequence into the draws of either version (the old per-layer `ElasticState.draw` at
commit d6061fc, or today's `RankSampler._draw`), trains a tiny Llama for 12 AdamW steps with the default recipe
(basis refreshed every 4 steps) and prints each step's loss. Identical columns mean identical training math; the
redesign changed only the random stream of the draws.

    git worktree add /tmp/old d6061fc
    PYTHONPATH=/tmp/old python scripts/redesign_equivalence.py > old.txt
    python scripts/redesign_equivalence.py > new.txt && paste old.txt new.txt
"""

import sys
from pathlib import Path

import torch
from peft import get_peft_model

from elasticlora import ElasticLoraConfig
from elasticlora.data import eval_batches, load_rows

ROOT = Path(__file__).resolve().parents[1]
SUPPORT = [1, 2, 4, 8, 16]


def forced(pass_index: int, n: int) -> torch.Tensor:
    """The rank of each of the n examples of a pass."""
    return torch.tensor([SUPPORT[(pass_index * 7 + b * 3) % 5] for b in range(n)])


def force_draws() -> tuple:
    """Patch the installed version's draws to `forced`; returns (tiny_llama, char_tokenizer) of that version."""
    try:  # the code before the redesign
        from elasticlora.testing import char_tokenizer, tiny_llama

        import elasticlora.layer as old

        def draw(self, n_draws, device):
            if old._in_backward() and self.last_draw is not None:
                return self.last_draw
            self.calls += 1
            self.last_draw = torch.tensor([self.support.index(int(k)) for k in forced(self.calls - 1, n_draws)])
            return self.last_draw

        old.ElasticState.draw = draw
    except ImportError:  # today's
        from elasticlora import sampler

        sys.path.insert(0, str(ROOT / "examples"))
        from common import char_tokenizer, tiny_llama

        def _draw(self, n_draws):
            self.passes += 1
            return forced(self.passes - 1, n_draws)[:, None].expand(n_draws, len(self._ranks)).contiguous()

        sampler.RankSampler._draw = _draw
    return tiny_llama, char_tokenizer


def main() -> None:
    tiny_llama, char_tokenizer = force_draws()
    rows = load_rows(ROOT / "examples" / "data" / "wordnet_train.jsonl")[:256]
    batches = eval_batches(char_tokenizer(), rows, batch_size=8, max_length=64)
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(hidden=64, layers=2), ElasticLoraConfig(r=16))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(12):
        loss = model(**batches[step]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(step, f"{loss.item():.6f}")


if __name__ == "__main__":
    main()
