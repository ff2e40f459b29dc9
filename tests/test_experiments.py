"""The logit lens, attention patterns, their pictures, the CLI commands and the worked example."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import toy_llm
from toy_llm.cli import main as cli_main
from toy_llm.lens import attention_patterns, logit_lens
from toy_llm.testing import synthetic

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return synthetic.write_model(tmp_path_factory.mktemp("exp") / "llama.gguf", "llama")


@pytest.fixture(scope="module")
def smollm2():
    from toy_llm.fetch import fetch

    return fetch("smollm2")


def _png_ok(path, min_w: int, min_h: int):
    """A PNG of at least that size that is not one flat colour."""
    import matplotlib.image as mpimg

    img = mpimg.imread(str(path))
    assert img.shape[1] >= min_w and img.shape[0] >= min_h, img.shape
    assert float(img[..., :3].std()) > 0.05     # not blank
    return img


@pytest.mark.parametrize("graph,n_batch", [("per_head", 1), ("fused", 512)])
def test_the_last_layer_of_the_lens_is_the_model(llama, graph, n_batch):
    with toy_llm.load(llama, max_T=64, graph=graph, n_batch=n_batch) as m:
        L = m.config.n_layers
        logits, cache = m.run_with_cache([65, 66, 67, 68, 69], names=[f"blocks.{L - 1}.hook_lens_logits"])
        np.testing.assert_array_equal(cache[f"blocks.{L - 1}.hook_lens_logits"], logits)
        lens = logit_lens(m, [65, 66, 67, 68, 69], top_k=3)
    assert lens.top_ids.shape == (L, 5, 3)
    np.testing.assert_array_equal(lens.top_ids[-1, :, 0], logits.argmax(-1))
    assert np.all(np.diff(lens.top_probs, axis=-1) <= 0) and np.all(lens.top_probs <= 1)


def test_lens_and_attention_pictures(smollm2, tmp_path):
    pytest.importorskip("matplotlib")
    from toy_llm.plots import plot_attention, plot_logit_lens

    with toy_llm.load(smollm2, max_T=64) as m:
        lens = logit_lens(m, "The capital of France is")
        pieces, pat = attention_patterns(m, "The Eiffel Tower is in Paris", layer=3)
        with pytest.raises(ValueError, match="layer 30 outside"):
            attention_patterns(m, "x", layer=30)
    assert lens.top_pieces[-1][-1][0] == " Paris"
    assert pat.shape == (9, len(pieces), len(pieces))
    np.testing.assert_allclose(pat.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(pat, 1) == 0)                     # causal
    _png_ok(plot_logit_lens(lens, tmp_path / "lens.png"), 400, 600)
    _png_ok(plot_attention(pieces, pat, tmp_path / "attn.png", layer=3), 800, 600)


def test_cli_lens_attention_perplexity(smollm2, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli_main(["lens", "The capital of France is", "--out", str(tmp_path / "l.png")]) == 0
    out = capsys.readouterr().out
    assert "' Paris'" in out.splitlines()[-2] and (tmp_path / "l.png").exists()
    assert cli_main(["attention", "The capital of France is", "--layer", "2", "--out", str(tmp_path / "a.png")]) == 0
    assert "head 8:" in capsys.readouterr().out and (tmp_path / "a.png").exists()
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["The quick brown fox jumps over the lazy dog while the cat sleeps."] * 12))
    assert cli_main(["perplexity", str(text), "--ctx", "32"]) == 0
    assert "llama-perplexity's method" in capsys.readouterr().out
    assert cli_main(["attention", "x", "--layer", "1", "--flash-attn"]) == 2   # a clear error, not a crash
    assert "flash attention" in capsys.readouterr().err


def test_cli_control_vector(smollm2, tmp_path, capsys):
    import gguf

    path = tmp_path / "cv.gguf"
    w = gguf.GGUFWriter(str(path), "controlvector")
    rng = np.random.default_rng(1)
    for il in range(1, 30):
        w.add_tensor(f"direction.{il}", (rng.standard_normal(576) * 0.5).astype(np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    args = ["generate", "The capital of France is", "-n", "6", "--quiet-prompt"]
    assert cli_main(args) == 0
    plain = capsys.readouterr().out
    assert cli_main(args + ["--control-vector", f"{path}:4"]) == 0
    steered = capsys.readouterr().out
    assert cli_main(args + ["--control-vector", f"{path}:0"]) == 0
    assert steered != plain and capsys.readouterr().out == plain


def test_worked_example_activation_patching(smollm2, tmp_path, capsys):
    """examples/activation_patching.py: the answer is restored by patching the subject token early and
    the last token late, and the plot is written."""
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import activation_patching as ex
    finally:
        sys.path.pop(0)
    assert ex.main(["--out", str(tmp_path / "patching.png")]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "the answer rides on the subject token 'osse'" in out
    _png_ok(tmp_path / "patching.png", 500, 500)
    with toy_llm.load(smollm2, max_T=64) as m:
        effect, pieces, d_clean, d_corrupt = ex.patching_effect(m, ex.CLEAN, ex.CORRUPT, " Paris", " Rome")
    assert d_clean > 0 > d_corrupt
    assert effect[:, 0].max() == 0 == effect[:, 0].min()   # 'The' is the same in both prompts: patching it is a no-op
    assert effect[2, 2] > 0.5 and effect[-1, -1] > 0.9 and abs(effect[-1, 2]) < 0.1
