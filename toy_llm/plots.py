"""PNG pictures of toy_llm.lens results and of activation patching. Needs the optional ``plot``
extra (matplotlib): ``pip install 'toy_llm[plot]'``; the rest of toy_llm never imports it."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'toy_llm[plot]' (or pip install matplotlib)") from e
    matplotlib.use("Agg")   # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _show(piece: str) -> str:
    return piece.replace("\n", "\\n").replace("$", r"\$") or "∅"


def plot_logit_lens(lens, path, layers=None) -> Path:
    """Layers (rows) x positions (columns): each cell the lens's top token, coloured by its probability."""
    plt = _plt()
    rows = list(range(lens.n_layers)) if layers is None else list(layers)
    probs = lens.top_probs[rows, :, 0]
    fig, ax = plt.subplots(figsize=(1.1 * len(lens.tokens) + 2, 0.32 * len(rows) + 1.5))
    im = ax.imshow(probs, aspect="auto", cmap="Blues", vmin=0, vmax=1, origin="lower")
    for i, il in enumerate(rows):
        for j in range(len(lens.tokens)):
            ax.text(j, i, _show(lens.top_pieces[il][j][0])[:10], ha="center", va="center", fontsize=7,
                    color="white" if probs[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(lens.tokens)), [_show(p) for p in lens.pieces], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [str(il) for il in rows], fontsize=7)
    ax.set_xlabel("input position (token)")
    ax.set_ylabel("layer")
    ax.set_title("logit lens: top next token after each layer")
    fig.colorbar(im, ax=ax, label="probability of the top token")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_attention(pieces, patterns: np.ndarray, path, layer: int | None = None) -> Path:
    """One heatmap per head of ``patterns`` [heads, tokens, tokens] (query rows, key columns)."""
    plt = _plt()
    H, n = patterns.shape[0], patterns.shape[1]
    cols = min(H, 4)
    rows = -(-H // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    labels = [_show(p)[:8] for p in pieces]
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= H:
            ax.axis("off")
            continue
        ax.imshow(patterns[h], cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"head {h}", fontsize=9)
        ticks = range(n) if n <= 24 else []
        ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=6)
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=6)
    fig.suptitle(f"attention pattern{'' if layer is None else f', layer {layer}'} (rows: queries, columns: keys)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_patching(effect: np.ndarray, pieces, path, title: str = "activation patching") -> Path:
    """``effect`` [layers, positions]: how much of the clean answer patching that layer's residual
    at that position restores (0: none, 1: all)."""
    plt = _plt()
    L, n = effect.shape
    fig, ax = plt.subplots(figsize=(1.0 * n + 2.5, 0.25 * L + 1.8))
    im = ax.imshow(effect, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, origin="lower")
    ax.set_xticks(range(n), [_show(p) for p in pieces], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(0, L, max(1, L // 15)))
    ax.set_xlabel("patched position")
    ax.set_ylabel("layer (resid_pre patched)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="fraction of the clean logit difference restored")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
