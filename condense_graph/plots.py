"""Pictures of a reduction (matplotlib, the optional `plot` extra).

- one heatmap per reduced layer: the cosine similarity of its neurons, ordered by group (largest
  group first), so condensed blocks show as squares on the diagonal (the paper's Figure 3);
- one bar chart of every layer's width before and after (the paper's Figure 7);
- for `inspect --plot`, every layer's width left at each threshold (the manual mode of the
  paper's section 2.4.1: a person picks each layer's threshold from it).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from condense_graph.errors import CondenseError
from condense_graph.similarity import cosine_similarity


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CondenseError(
            "--plot needs matplotlib: pip install 'condense-graph[plot]' "
            "(from a checkout: pip install -c constraints.txt '.[plot]')"
        ) from None
    return plt


def check_available() -> None:
    """A CondenseError now, before any work, when matplotlib is missing."""
    _pyplot()


def group_order(groups: list[np.ndarray], width: int) -> np.ndarray:
    """Neuron indices ordered by group, largest group first; ungrouped neurons last."""
    ordered = [np.asarray(g) for g in sorted(groups, key=len, reverse=True)]
    seen = np.concatenate(ordered) if ordered else np.zeros(0, dtype=int)
    rest = np.setdiff1d(np.arange(width), seen)
    return np.concatenate([seen, rest]).astype(int)


def plot_reduction(plans, directory: str | Path) -> list[Path]:
    """Write the heatmaps of the reduced layers and the width chart; return the paths."""
    plt = _pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [
        plot_cosine(plt, plan, directory) for plan in plans if plan.cmap.width_after < plan.cmap.width_before
    ]
    paths.append(plot_widths(plt, plans, directory / "widths.png"))
    return paths


def plot_cosine(plt, plan, directory: Path) -> Path:
    order = group_order(plan.groups, len(plan.vectors))
    cosine = cosine_similarity(plan.vectors[order].astype(np.float32))
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    image = ax.imshow(cosine, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="cosine similarity")
    how = "pruned by magnitude" if plan.threshold is None else f"at threshold {plan.threshold:.4g}"
    ax.set_title(
        f"{plan.name}: {plan.cmap.width_before} -> {plan.cmap.width_after} neurons {how}", fontsize=10
    )
    ax.set_xlabel("neuron (ordered by group)")
    ax.set_ylabel("neuron (ordered by group)")
    path = directory / f"cosine_{_file_name(plan.name)}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_widths(plt, plans, path: Path) -> Path:
    names = [p.name for p in plans]
    x = np.arange(len(plans))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.45 * len(plans) + 2), 4.8))
    ax.bar(x - 0.2, [p.cmap.width_before for p in plans], 0.4, label="before")
    ax.bar(x + 0.2, [p.cmap.width_after for p in plans], 0.4, label="after")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("width (neurons / channels)")
    ax.set_title("Layer widths before and after condensation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_threshold_widths(info: dict, directory: str | Path) -> Path:
    """`inspect`'s widths: per layer, the fraction of its width left at each threshold (the legend
    gives each layer's width). Returns the path of thresholds.png."""
    plt = _pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    thresholds = info["thresholds"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for layer in info["layers"]:
        widths = [layer["widths"][str(t)] for t in thresholds]
        label = f"{layer['name']} ({layer['width']})"
        ax.plot(thresholds, [w / layer["width"] for w in widths], marker="o", label=label)
    ax.set_xlabel("threshold (cosine)")
    ax.set_ylabel("width left (fraction of the layer's)")
    ax.set_title("Width left at each threshold")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = directory / "thresholds.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "layer"


def plot_loop(log: dict | list, path: str | Path, metric_name: str = "metric") -> Path:
    """The automatic loop's history (the paper's Figure 6): the metric and the parameter ratio
    against the training step, each kept reduction a red dot, each rollback a grey cross.
    `log` is `AutoReduceResult.log` or the JSON log (`{"events": [...]}`). Returns `path`."""
    plt = _pyplot()
    events = log["events"] if isinstance(log, dict) else log
    evals = [e for e in events if e["event"] == "evaluate"]
    if not evals:
        raise CondenseError("the loop's log has no evaluations to plot")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(
        [e["step"] for e in evals], [e["metric"] for e in evals], color="tab:blue", lw=1, label=metric_name
    )
    metric_at = {e["step"]: e["metric"] for e in evals}
    for kind, style in (
        ("accept", dict(color="red", marker="o", s=18)),
        ("rollback", dict(color="grey", marker="x", s=24)),
    ):
        marks = [e for e in events if e["event"] == kind]
        if marks:
            ax.scatter(
                [e["step"] for e in marks],
                [metric_at.get(e["step"], e.get("metric")) for e in marks],
                label="reduction kept" if kind == "accept" else "rollback",
                zorder=3,
                **style,
            )
    ax.set_xlabel("training step")
    ax.set_ylabel(metric_name)
    right = ax.twinx()
    right.plot(
        [e["step"] for e in evals],
        [e["params_ratio"] for e in evals],
        color="tab:green",
        lw=1.5,
        label="params / original (CPN/OPN)",
    )
    right.set_ylabel("params / original")
    right.set_ylim(0, 1.05)
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower left")
    ax.set_title("Automatic condensation reduction")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
