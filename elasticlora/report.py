"""The shrink report: JSON, and a PNG with the per-module rank heatmap, the quality-vs-parameters curve and the r_max
advice."""

from __future__ import annotations

import re

LAYER_INDEX = re.compile(r"\.(\d+)\.")


def rank_table(ranks: dict[str, int]) -> tuple[list[int], list[str], list[list[int | None]]]:
    """(layer indices, module types, table[layer][type]) from full module names like `model.layers.3.mlp.up_proj`."""
    layers: list[int] = []
    kinds: list[str] = []
    cells: dict[tuple[int, str], int] = {}
    for name, k in ranks.items():
        match = LAYER_INDEX.search(name)
        layer = int(match.group(1)) if match else -1
        kind = name.rsplit(".", 1)[-1]
        if layer not in layers:
            layers.append(layer)
        if kind not in kinds:
            kinds.append(kind)
        cells[(layer, kind)] = k
    layers.sort()
    return layers, kinds, [[cells.get((layer, kind)) for kind in kinds] for layer in layers]


def plot_report(result: dict, path) -> None:
    """Heatmap of the chosen ranks (layer x module type) beside the measured quality-vs-parameters curve.

    Drawn through matplotlib's object API (a `Figure` renders with the Agg canvas on `savefig`), so the caller's
    pyplot backend and figures are left alone."""
    import numpy as np
    from matplotlib.figure import Figure

    layers, kinds, table = rank_table(result["ranks"])
    grid = np.array([[np.nan if v is None else v for v in row] for row in table], dtype=float)
    fig = Figure(figsize=(12, max(4, 0.22 * len(layers) + 1.5)))
    ax_map, ax_curve = fig.subplots(1, 2)
    image = ax_map.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    ax_map.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax_map.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax_map.set_ylabel("layer")
    ax_map.set_title("rank per module (0 = dropped)")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]) and grid.size <= 400:
                ax_map.text(j, i, int(grid[i, j]), ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(image, ax=ax_map, fraction=0.04)

    points = sorted(result["curve"], key=lambda p: p["params"])
    ax_curve.plot(
        [p["params"] for p in points], [p["quality"] for p in points], "o-", color="tab:blue", label="measured"
    )
    ax_curve.axhline(result["full_quality"], color="tab:gray", ls="--", label="full rank")
    ax_curve.axhline(result["base_quality"], color="tab:red", ls=":", label="base model")
    ax_curve.plot([result["params"]], [result["quality"]], "*", ms=16, color="tab:orange", label="chosen")
    ax_curve.set_xscale("symlog", linthresh=max(1, result["full_params"] / 1000))
    ax_curve.set_xlabel("adapter parameters")
    ax_curve.set_ylabel(result["metric"])
    ax_curve.set_title("quality vs parameters (every configuration shrink measured)")
    ax_curve.legend()
    if result.get("advice"):
        fig.suptitle(f"r_max advice: {result['advice']['message']}", fontsize=9, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")


def summary_lines(result: dict) -> list[str]:
    """A short human-readable summary of a shrink result."""
    kept = sum(1 for k in result["ranks"].values() if k > 0)
    lines = [
        f"modules kept: {kept}/{len(result['ranks'])}; max rank {max(result['ranks'].values())}",
        f"adapter parameters: {result['params']:,} of {result['full_params']:,} "
        f"({100 * result['params'] / max(1, result['full_params']):.1f}%)",
        f"{result['metric']}: base {result['base_quality']:.4f} | full rank {result['full_quality']:.4f} | "
        f"shrunk {result['quality']:.4f} (best measured {result['best_quality']:.4f})",
        f"passes over the eval data: {result['passes_run']}"
        + (" (one for the r_max advice)" if result["passes_run"] > result["passes"] else ""),
    ]
    if result.get("advice"):
        lines.append(f"r_max advice: {result['advice']['message']}")
    if result.get("rank_cap") is not None:
        cost = result["cap_quality"] - result["full_quality"]
        lines.insert(
            2,
            f"rank cap {result['rank_cap']} ({'found' if result['max_rank'] == 'auto' else 'asked'}): "
            f"capped adapter {result['cap_quality']:.4f}, {cost:+.4f} against full rank "
            f"({100 * cost / abs(result['full_quality']):+.2f}%)",
        )
    return lines
