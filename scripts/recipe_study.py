"""Which training recipe makes every prefix of an elastic adapter as good as plain LoRA + SVD truncation?

Trains arms on SmolLM2-135M-Instruct (batch 16, AdamW, 5% warmup, linear decay, fp32 or bf16 autocast) on one of two
tasks of different kinds, and records eval loss at every uniform rank on a `dev` split (for choosing) and a `test`
split (for reporting):

- `wordnet`: word -> dictionary definition (examples/data, WordNet 3.0 licence);
- `cmudict`: spelling -> ARPAbet phonemes (scripts/data, CMU Pronouncing Dictionary, BSD-2-Clause).

An arm is `lora` (plain LoRA at --max-rank, rsLoRA alpha 16: its SVD truncations are recorded too), `lora@K` (plain
LoRA trained at rank K, the grid), `default` (ElasticLoraConfig() at --max-rank) or comma-separated
ElasticLoraConfig fields (`full_rank_prob=0.75,shared_draw_prob=0`), optionally named `NAME:SPEC` (to tell one
spec apart across code versions: `rotated:default`; each run records its commit). A spec may start with an
experimental training mode, kept to reproduce: `split+`, `halves+`, `project+` (two passes per step, see
`train_steps_split`), `sandwich+` (every row at full rank, the truncated rows distilled in a second pass, see
`sandwich_step`), `ramp+` / `anneal+` (the truncated share grown from 0 / annealed to 0, see `ramp_truncations`)
or `maps+` (truncations through learned rank maps, A and B trained by the full-rank rows only, see
`add_rank_maps`), e.g. `project+default`.
Arms recorded with fields retired since (`truncation_basis`, `truncation_scaling`, `truncation_scale_power`) rerun
at commit d6061fc. Every (task, steps, arm, lr, seed) run is kept in the JSON as soon as it ends, and runs already
there are skipped, so a cut-off study resumes where it stopped.
`--shrink` also shrinks elastic and `lora` runs (SVD-ordered) at those tolerances on dev. `--plot` only redraws.

    python scripts/recipe_study.py --task cmudict --steps 180 --arms lora default full_rank_prob=0.75 \\
        --lrs 2e-3 --shrink 0.01 --out scripts/results/recipe_study/cmudict.json
    python scripts/recipe_study.py --plot --out scripts/results/recipe_study/cmudict.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import itertools
import json
import platform
import random
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import get_peft_model

import elasticlora.layer
from elasticlora import ElasticLoraConfig, at_ranks
from elasticlora.data import eval_batches, load_rows
from elasticlora.evaluate import eval_loss, model_device
from elasticlora.loading import load_model_and_tokenizer
from elasticlora.sampler import RankSampler
from elasticlora.shrink import shrink

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from common import DATA, train_steps  # noqa: E402

TASKS = {
    "wordnet": (DATA / "wordnet_train.jsonl", DATA / "wordnet_eval.jsonl"),
    "cmudict": (ROOT / "scripts" / "data" / "cmudict_train.jsonl", ROOT / "scripts" / "data" / "cmudict_eval.jsonl"),
}


# experiments: split+/project+/halves+ train full-rank and truncated rows in two passes per step (`train_steps_split`);
# sandwich+ trains every row at full rank and re-runs the truncated rows to learn its output (`sandwich_step`);
# ramp+ grows the share of truncated draws linearly from 0 to the config's over the whole run (`ramp_truncations`),
# anneal+ shrinks it from the config's to 0 (CoTo's progressive activation);
# maps+ trains learned nested rank maps on the truncated rows and A, B on the full-rank rows only (`add_rank_maps`)
TRAIN_MODES = ("split+", "project+", "halves+", "sandwich+", "ramp+", "anneal+", "maps+")


def train_mode(arm: str) -> tuple[str | None, str]:
    """(`split`, `project`, `halves`, `sandwich`, `ramp`, `anneal`, `maps` or None, the config spec) of an arm."""
    spec = arm.split(":", 1)[-1]
    for mode in TRAIN_MODES:
        if spec.startswith(mode):
            return mode[:-1], spec[len(mode) :]
    return None, spec


def arm_config(spec: str, max_rank: int) -> ElasticLoraConfig:
    """The config an arm spec names (see the module docstring)."""
    spec = train_mode(spec)[1]
    if spec == "lora" or spec.startswith("lora@"):
        r = max_rank if spec == "lora" else int(spec[5:])
        return ElasticLoraConfig(r=r, rank_sampler="none")
    return ElasticLoraConfig(r=max_rank, **parse_arm(spec))


def parse_arm(spec: str) -> dict:
    """`"shared_draw_prob=0.5,full_rank_prob=0.75"` -> config kwargs (`default`: none)."""
    if spec == "default":
        return {}
    kwargs = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in ElasticLoraConfig.__dataclass_fields__:
            raise SystemExit(f"bad arm item {item!r}: expected FIELD=VALUE with an ElasticLoraConfig field")
        kwargs[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    return kwargs


def model_sampler(model) -> RankSampler:
    """The `RankSampler` the elastic layers of `model` share (the one their training passes draw from)."""
    return next(m.elastic_state["default"].sampler for m in model.modules() if hasattr(m, "elastic_state"))


def train_steps_split(model, batches, steps, lr, seed, autocast_dtype, progress, warmup_steps, mode):
    """`train_steps` with each batch's full-rank rows and truncated rows in two passes, their gradients summed
    (`project`: after removing from the truncated rows' gradient of each tensor its component against the full-rank
    rows' gradient, so truncations never oppose full rank's descent, as A-GEM / PCGrad do). Each pass's loss is
    weighted by its share of the batch's label tokens, so without `project` the step is the one-pass step. `halves`
    (the control for the statistics) runs the same two groups both at full rank: a plain LoRA step.
    Returns (losses, conflict statistics: per logged step, the share of tensors in conflict and their mean cosine)."""
    torch.manual_seed(seed)
    order = list(range(len(batches)))
    random.Random(seed).shuffle(order)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)) * max(0.0, 1.0 - step / steps)
    )
    sampler = model_sampler(model)
    r_max = torch.tensor(sampler._ranks)
    device = model_device(model)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    model.train()
    losses, conflict = [], []
    for step, index in enumerate(itertools.islice(itertools.cycle(order), steps)):
        batch = {k: v.to(device) for k, v in batches[index].items()}
        table = sampler._draw(batch["input_ids"].shape[0])  # this step's draws, as the one-pass loop makes them
        full = (table == r_max).all(1)  # on the host, like the table; it indexes device tensors too
        if mode == "halves":
            table = r_max.expand_as(table)
        tokens = (batch["labels"][:, 1:] != -100).sum(1).double()
        if mode == "sandwich":
            losses.append(sandwich_step(model, sampler, batch, table, ~full, tokens, autocast))
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            continue
        grads, loss_sum = [], 0.0
        for rows in (full.nonzero()[:, 0], (~full).nonzero()[:, 0]):
            if len(rows) == 0:
                grads.append([torch.zeros_like(p) for p in params])
                continue
            sampler._draw = lambda n, sub=table[rows]: sub  # the pass takes its rows' draws
            with autocast:
                loss = model(**{k: v[rows] for k, v in batch.items()}).loss
            weight = float(tokens[rows].sum() / tokens.sum())
            (loss * weight).backward()
            loss_sum += loss.item() * weight
            grads.append([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
            optimizer.zero_grad(set_to_none=True)
            del sampler._draw
        cosines = []
        for p, g_full, g_trunc in zip(params, *grads):
            dot = (g_full * g_trunc).sum()
            norms = g_full.norm() * g_trunc.norm()
            cosines.append(float(dot / norms) if norms > 0 else 0.0)
            if mode == "project" and dot < 0:
                g_trunc = g_trunc - dot / g_full.square().sum() * g_full
            p.grad = g_full + g_trunc
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss_sum)
        if step % 10 == 0 or step == steps - 1:
            negative = [c for c in cosines if c < 0]
            conflict.append({
                "step": step, "share": len(negative) / len(cosines), "mean_cos": sum(cosines) / len(cosines),
                "mean_negative_cos": sum(negative) / max(1, len(negative)),
            })  # fmt: skip
    model.eval()
    return losses, conflict


def sandwich_step(model, sampler, batch, table, truncated, tokens, autocast) -> float:
    """One backward of the sandwich rule with in-place distillation at per-token parity: every row at full rank on its
    labels (a plain LoRA step), then the rows the config's draws truncate run again at their drawn ranks and learn
    the full rank's detached next-token distribution; their mean KL is weighted by their share of the batch's label
    tokens, so a truncated token pulls as hard as a label token does (the retired `distill_fraction` weighted a
    2-row slice like the whole batch). Returns the labels' loss."""
    sampler._draw = lambda n: table.new_tensor(sampler._ranks).expand(n, -1)  # the labels' pass: every row full rank
    with autocast:
        out = model(**batch)
    loss = out.loss
    rows = truncated.nonzero()[:, 0]
    if len(rows):
        sampler._draw = lambda n: table[rows]
        with autocast:
            student = model(**{k: v[rows] for k, v in batch.items() if k != "labels"}).logits
        scored = batch["labels"][rows, 1:] != -100  # position t predicts label t + 1
        log_t = F.log_softmax(out.logits[rows, :-1][scored].detach().float(), -1)
        log_s = F.log_softmax(student[:, :-1][scored].float(), -1)
        kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
        loss = loss + kl * float(tokens[rows].sum() / tokens.sum())
    del sampler._draw
    loss.backward()
    return out.loss.item()


def ramp_truncations(model, total_draws: int, anneal: bool = False) -> None:
    """Progressive shrinking (OFA): each truncated rank's probability is the config's times the share of the run
    done (draws made / `total_draws`), so training starts as plain LoRA and ends at the config's distribution.
    `anneal`: times the share left instead, from the config's distribution to plain LoRA (CoTo, arXiv 2506.05713)."""
    sampler = model_sampler(model)
    configured = sampler.probabilities

    def probabilities(r: int) -> dict[int, float]:
        done = min(1.0, sampler.draws / total_draws)
        scale = 1.0 - done if anneal else done
        probs = {k: p * scale for k, p in configured(r).items() if k != r}
        return {**probs, r: 1.0 - sum(probs.values())}

    sampler.probabilities = probabilities


def _signed(m: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The singular basis (M, N) with each component's sign fixed (largest entry of its column of N positive), so
    learned maps expressed in it survive the basis's recomputation (an eigensolver may flip any sign)."""
    index = n.abs().argmax(0, keepdim=True)
    sign = torch.where(n.gather(0, index)[0] < 0, -1.0, 1.0).to(n.dtype)
    return m * sign[:, None], n * sign


def add_rank_maps(model) -> None:
    """Learned nested rank maps (experiment): each elastic layer gets two r x r matrices U, V (identity at first)
    and its rank-k truncation becomes `B N U[:, :k] V[:, :k]^T M A` (with the singular basis (M, N): at U = V = I
    it is the SVD truncation). Full-rank rows train A and B exactly as plain LoRA does and never see U, V;
    truncated rows train only U and V (A and B detached), so truncations reorganise the adapter without moving its
    full-rank function. Export would write `(V_k^T M A, B N U_k)`: a plain LoRA at rank k."""
    # the layers' training forward and rank-k factors (eval, shrink); layers without maps still run the library's code
    elasticlora.layer.ElasticVariant.forward = staticmethod(_maps_forward)
    elasticlora.layer.prefix_factors = _maps_prefix_factors
    for module in model.modules():
        if hasattr(module, "elastic_state"):
            weight = module.lora_A["default"].weight
            eye = torch.eye(module.elastic_state["default"].r, device=weight.device, dtype=torch.float32)
            module.rank_maps = nn.ParameterDict({"u": nn.Parameter(eye.clone()), "v": nn.Parameter(eye.clone())})


_FORWARD, _PREFIX_FACTORS = elasticlora.layer.ElasticVariant.forward, elasticlora.layer.prefix_factors


def _maps_forward(module, active_adapter, x, result, **kwargs):
    """`ElasticVariant.forward` for a layer with maps: full-rank rows as plain LoRA, truncated rows through the maps
    with A and B detached (the library's code for every other layer and call)."""
    maps = getattr(module, "rank_maps", None)
    state = module.elastic_state[active_adapter]
    if maps is None or not (state.rank is None and module.training and state.samples):
        return _FORWARD(module, active_adapter, x, result, **kwargs)
    lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
    dropout, scaling = module.lora_dropout[active_adapter], module.scaling[active_adapter]
    h = lora_a(dropout(x))
    cut = state.sampler.truncation(state.column, h)
    if cut is None:
        return result + lora_b(h) * scaling
    drop = _drop_mask(cut, h, state.r)
    m, n = _signed(*state.basis.training(lora_a.weight, lora_b.weight, torch.float32))
    truncated = drop.amax(-1, keepdim=True)  # (B, 1, ..., 1): 1 for a truncated row
    g = F.linear(F.linear(dropout(x), lora_a.weight.detach()), (maps["v"].T @ m).to(h.dtype))  # V^T M A x
    z = F.linear(g * (1 - drop), (n @ maps["u"]).to(h.dtype))  # N U_k V_k^T M A x
    y = lora_b(h * (1 - truncated)) + F.linear(z * truncated, lora_b.weight.detach())
    return result + y * scaling


def _drop_mask(cut, h: torch.Tensor, r: int) -> torch.Tensor:
    """(B or 1, 1, ..., r) mask of the components a `Truncation` drops from each row of `h` (1: dropped)."""
    keep = cut.keep if cut.keep is not None else h.new_ones((1,) * (h.dim() - 1) + (cut.k,))
    drop = 1 - F.pad(keep, (0, r - cut.k))
    return drop if cut.rows is None else h.new_zeros((h.shape[0],) + drop.shape[1:]).index_copy(0, cut.rows, drop)


def _maps_prefix_factors(module, adapter, k):
    """fp32 `(V_k^T M A, B N U_k)` for a layer with maps (eval and shrink at rank k), else the library's factors."""
    maps = getattr(module, "rank_maps", None)
    if maps is None:
        return _PREFIX_FACTORS(module, adapter, k)
    with torch.no_grad(), torch.autocast(maps["u"].device.type, enabled=False):
        weight_a, weight_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        m, n = _signed(*module.elastic_state[adapter].basis.current(weight_a, weight_b))
        a, b = weight_a.float(), weight_b.float()
        return (maps["v"][:, :k].T @ m) @ a, b @ (n @ maps["u"][:, :k])


def commit() -> str:
    """The checked-out commit, with `+dirty` when the package has uncommitted changes."""

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "elasticlora")
    return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")


def run_key(task: str, steps: int, arm: str, lr: float, seed: int) -> str:
    return f"{task}|{steps}|{arm}|{lr:g}|{seed}"


class Study:
    def __init__(self, args):
        self.args = args
        self.dtype = torch.bfloat16 if args.bf16 else None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.base, tokenizer = load_model_and_tokenizer("smollm2")
        self.base.to(self.device)
        train_path, eval_path = TASKS[args.task]
        self.train = eval_batches(tokenizer, train_path, batch_size=args.batch_size)
        rows = load_rows(eval_path)
        half = len(rows) // 2
        self.splits = {
            "dev": eval_batches(tokenizer, rows[:half], 32),
            "test": eval_batches(tokenizer, rows[half:], 32),
        }
        self.ranks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= args.max_rank]

    def curves(self, model, ks) -> dict:
        out = {split: {} for split in self.splits}
        for k in ks:
            with at_ranks(model, k):
                for split, batches in self.splits.items():
                    out[split][str(k)] = eval_loss(model, batches, autocast_dtype=self.dtype)
        return out

    def run(self, arm: str, steps: int, lr: float, seed: int) -> dict:
        config = arm_config(arm, self.args.max_rank)
        torch.manual_seed(seed)  # the adapter's initialisation too
        model = get_peft_model(copy.deepcopy(self.base), config)
        start = time.time()
        mode = train_mode(arm)[0]
        if mode in ("ramp", "anneal"):
            ramp_truncations(model, steps * self.args.batch_size, anneal=mode == "anneal")
        if mode == "maps":
            add_rank_maps(model)
        one_pass = mode in (None, "ramp", "anneal", "maps")
        train = train_steps if one_pass else functools.partial(train_steps_split, mode=mode)
        losses = train(
            model, self.train, steps, lr, seed=seed, autocast_dtype=self.dtype, progress=False,
            warmup_steps=max(1, steps // 20),
        )  # fmt: skip
        entry = {"arm": arm, "steps": steps, "lr": lr, "seed": seed, "seconds": time.time() - start}
        if not one_pass:
            losses, conflict = losses
            if conflict:
                entry["conflict"] = conflict
        entry["final_train_loss"] = sum(losses[-10:]) / len(losses[-10:])
        blocks = [losses[i : i + 10] for i in range(0, len(losses), 10)]
        entry["train_curve"] = [round(sum(b) / len(b), 4) for b in blocks]  # mean loss of each 10 steps
        entry["commit"] = commit()
        spec = arm.split(":", 1)[-1]
        plain = spec.startswith("lora")
        entry.update(self.curves(model, [config.r] if plain else self.ranks))
        if spec == "lora":  # a truncation keeps the top singular directions: SVD truncation
            entry["svd"] = self.curves(model, self.ranks)
        for tolerance in self.args.shrink if spec == "lora" or not plain else []:
            start = time.time()
            result = shrink(model, self.splits["dev"], tolerance=tolerance, autocast_dtype=self.dtype, progress=False)
            seconds = time.time() - start
            with at_ranks(model, result.ranks):
                test = eval_loss(model, self.splits["test"], autocast_dtype=self.dtype)
            entry.setdefault("shrink", {})[str(tolerance)] = {
                "params": result.params, "dev": result.quality, "test": test, "passes": result.passes,
                "max_rank": max(result.ranks.values()), "seconds": seconds,
            }  # fmt: skip
        return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="wordnet")
    parser.add_argument("--arms", nargs="*", default=["lora", "default"])
    parser.add_argument("--steps", type=int, nargs="+", default=[60])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max-rank", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shrink", type=float, nargs="*", default=[], help="tolerances to shrink at (on dev)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (faster on GPUs and AMX CPUs only)")
    parser.add_argument("--plot", action="store_true", help="only redraw the PNGs and the table from --out")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
    if args.plot:
        from recipe_report import write_report

        write_report(results, args.out)
        return
    study = Study(args)
    machine = torch.cuda.get_device_name() if study.device.type == "cuda" else f"{platform.machine()} CPU"
    results.setdefault("machine", f"{machine}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    results.setdefault("base", {})[args.task] = {
        s: eval_loss(study.base, b, autocast_dtype=study.dtype) for s, b in study.splits.items()
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for steps in args.steps:
        for seed in args.seeds:
            for arm in args.arms:
                for lr in args.lrs:
                    key = run_key(args.task, steps, arm, lr, seed)
                    if key in results["runs"]:
                        continue
                    entry = study.run(arm, steps, lr, seed)
                    entry.update(task=args.task, date=str(date.today()))
                    results["runs"][key] = entry
                    tmp = args.out.with_suffix(".tmp")
                    tmp.write_text(json.dumps(results, indent=1))
                    tmp.replace(args.out)
                    curve = entry.get("svd", entry)["test"]
                    shown = " ".join(f"{k}:{v:.3f}" for k, v in curve.items())
                    print(f"{key} ({entry['seconds']:.0f} s) test {shown}", flush=True)


if __name__ == "__main__":
    main()
