"""PNG plots of evaluation results (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_passkey(report: dict, path: str | Path) -> None:
    """Heatmap of accuracy: depth (rows) x length (columns)."""
    plt = _plt()
    by = report["accuracy_by_depth"]
    lengths = sorted(by, key=int)
    depths = sorted({d for v in by.values() for d in v}, key=float)
    grid = [[by[L].get(d, float("nan")) for L in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.35 * len(depths)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{int(L) // 1024}K" if int(L) >= 1024 else L for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{float(d):.2f}" for d in depths])
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("key depth")
    ax.set_title(f"passkey: {report.get('setup', '')}", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_ppl(report: dict, path: str | Path) -> None:
    """Perplexity against context length (log2 x axis)."""
    plt = _plt()
    rows = report["results"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["context"] for r in rows], [r["ppl"] for r in rows], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"perplexity: {report.get('setup', '')}", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_ppl_table(rows: dict[str, list[dict]], path: str | Path, title: str = "") -> None:
    """Several perplexity curves (one per set-up) on one plot: ``{label: [{"context", "ppl"}, ...]}``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rs in rows.items():
        ax.plot([r["context"] for r in rs], [r["ppl"] for r in rs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
