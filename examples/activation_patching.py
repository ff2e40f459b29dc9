"""Activation patching on SmolLM2-135M: which layers, at which positions, carry the answer?

A clean prompt ("The Eiffel Tower is in" -> " Paris") and a corrupted one of the same length
("The Colosseum is in" -> " Rome"). For every layer L and position p, the corrupted run is
repeated with the residual stream entering layer L at position p replaced by the clean run's
(``Patch`` on ``blocks.{L}.hook_resid_pre``, a ggml op inside the graph). The effect is the
fraction of the clean logit difference (Paris - Rome) that the patch restores: 0 = none, 1 = all.

    python examples/activation_patching.py [--model PATH] [--out patching.png]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

import toy_llm
from toy_llm.engine.interventions import Patch

CLEAN, CORRUPT = "The Eiffel Tower is in", "The Colosseum is in"


def patching_effect(m, clean: str, corrupt: str, answer: str, wrong: str):
    """[layers, positions] fraction of the clean logit difference restored by patching resid_pre."""
    toks_clean, toks_corrupt = m.tokenize(clean), m.tokenize(corrupt)
    if len(toks_clean) != len(toks_corrupt):
        raise ValueError("clean and corrupted prompts must have the same number of tokens")
    a, w = m.tokenize(answer, add_bos=False)[0], m.tokenize(wrong, add_bos=False)[0]
    L, n = m.config.n_layers, len(toks_clean)
    clean_logits, cache = m.run_with_cache(toks_clean, names=[f"blocks.{il}.hook_resid_pre" for il in range(L)])
    corrupt_logits = m.run_with_hooks(toks_corrupt, [])

    def diff(logits):
        return float(logits[-1, a] - logits[-1, w])
    d_clean, d_corrupt = diff(clean_logits), diff(corrupt_logits)
    effect = np.zeros((L, n))
    for il in range(L):
        name = f"blocks.{il}.hook_resid_pre"
        for p in range(n):
            patched = m.run_with_hooks(toks_corrupt, [(name, Patch(cache[name], positions=(p,)))])
            effect[il, p] = (diff(patched) - d_corrupt) / (d_clean - d_corrupt)
    return effect, [m.detokenize([t]) for t in toks_corrupt], d_clean, d_corrupt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--out", default="patching.png", help="where to save the plot (needs matplotlib)")
    args = ap.parse_args(argv)
    with toy_llm.load(args.model, max_T=64) as m:
        effect, pieces, d_clean, d_corrupt = patching_effect(m, CLEAN, CORRUPT, " Paris", " Rome")
    print(f"logit(Paris) - logit(Rome): clean {d_clean:+.2f}, corrupted {d_corrupt:+.2f}")
    print("fraction restored by patching the clean resid_pre (rows: layers; columns: corrupted tokens)")
    print("layer " + " ".join(f"{p!r:>12}" for p in pieces))
    for il in range(effect.shape[0]):
        print(f"{il:5d} " + " ".join(f"{e:12.2f}" for e in effect[il]))
    subject = int(np.argmax(np.abs(effect[0, :-1])))   # where the prompts differ, early on
    last = effect.shape[1] - 1
    carry = [il for il in range(effect.shape[0]) if effect[il, last] > 0.5]
    hand_over = next((il for il in range(effect.shape[0]) if effect[il, last] > effect[il, subject]), None)
    if hand_over is not None:
        print(f"the answer rides on the subject token {pieces[subject]!r} through layer {hand_over - 1} and on the "
              f"last token {pieces[last]!r} from layer {hand_over} on; patching the last position restores over "
              f"half of it from layer {carry[0] if carry else None} on")
    try:
        from toy_llm.plots import plot_patching
    except ImportError:
        return 0
    try:
        plot_patching(effect, pieces, args.out, title=f"patching '{CLEAN}' into '{CORRUPT}'")
        print(f"saved {args.out}")
    except ImportError as e:
        print(f"(no plot: {e})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
