"""A picture of the kept structure: query heads, MLP channels and blocks kept per layer."""

from __future__ import annotations

from pathlib import Path

from .structure import Structure


def plot_structure(structure: Structure, num_heads: int, intermediate_size: int, path: str | Path,
                   title: str = "") -> Path:
    """Save a PNG with two bar panels (kept query heads and kept MLP channels per layer, dense width in grey);
    a removed block shows as an empty slot with an x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(len(structure.layers)))
    heads, channels = structure.num_heads(), structure.intermediate_sizes()
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.3 * len(layers) + 2), 5.5), sharex=True)
    for ax, kept, full, label, color in (
        (axes[0], heads, num_heads, "query heads kept", "tab:blue"),
        (axes[1], channels, intermediate_size, "MLP channels kept", "tab:orange"),
    ):
        ax.bar(layers, [full] * len(layers), color="0.88", width=0.8, label="dense")
        ax.bar(layers, kept, color=color, width=0.8, label="kept")
        removed = [i for i, k in enumerate(kept) if k == 0]
        ax.scatter(removed, [full * 0.05] * len(removed), marker="x", color="tab:red", label="block removed", zorder=3)
        ax.set_ylabel(label)
        ax.set_ylim(0, full * 1.05)
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=7, ncol=3, frameon=False)
    axes[1].set_xlabel("layer")
    axes[1].set_xticks(layers)
    axes[1].tick_params(axis="x", labelsize=7)
    fig.suptitle(title or "DMS structure per layer", fontsize=10, x=0.02, ha="left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
