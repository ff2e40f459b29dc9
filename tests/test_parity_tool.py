"""The ``parity`` tool: tensor-by-tensor comparison with llama.cpp, and that it finds a planted error.

Oracle: llama-cpp-python 0.3.36 (its eval callback hands us llama.cpp's named intermediates).
On SmolLM2 every paired tensor is bit-identical (max |Δ| = 0), so the tool must report
"first divergence: none"; after flipping the sign of one layer's attention-norm gamma in OUR
engine only, it must point at exactly that layer's attn_norm row.
"""
from __future__ import annotations

import importlib.util
import re
import sys

import numpy as np
import pytest

from toy_llm import parity
from toy_llm.parity import ParityReport, TensorDiff, compare, format_report

PROMPT = "The capital of France is a big city"   # 8 tokens with SmolLM2's tokenizer (no BOS)


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("llama_cpp", reason="the llama-cpp-python oracle is installed by `make test`")
    from toy_llm.fetch import fetch

    return fetch("smollm2")


@pytest.fixture(scope="module")
def planted_model(tmp_path_factory):
    """A small model for the planted-error test: the synthetic 2-layer llama (SmolLM2 if that helper is absent)."""
    pytest.importorskip("llama_cpp", reason="the llama-cpp-python oracle is installed by `make test`")
    if importlib.util.find_spec("toy_llm.testing.synthetic") is not None:
        from toy_llm.testing.synthetic import write_model

        return write_model(tmp_path_factory.mktemp("parity") / "m.gguf", "llama")
    from toy_llm.fetch import fetch

    return fetch("smollm2")


def flip_attn_norm(layer: int):
    """A mutate() that negates layer ``layer``'s attention-norm gamma in our engine only (the weights are a
    private copy-on-write mapping: the file is untouched)."""
    def mutate(model):
        from toy_llm import tinynn as tnn

        t = model.cache.kv_blocks_ffi[layer].t_rn1_gamma
        g = tnn.download(model.cache.sess, t)
        tnn.upload(model.cache.sess, t, -g)
        np.testing.assert_array_equal(tnn.download(model.cache.sess, t), -g)
    return mutate


def test_cli_parity_layers_smollm2_no_divergence(smollm2, capsys):
    from toy_llm.cli import main

    rc = main(["parity", str(smollm2), "--prompt", PROMPT, "--layers"])
    out = capsys.readouterr().out
    print(out[-3000:])
    assert rc == 0
    for L in range(30):
        assert re.search(rf"^layer {L}$", out, re.M), f"no table for layer {L}"
    assert "layer 30" not in out
    for name in ("attn_norm-29", "Qcur-29", "Kcur-29", "Vcur-29", "kqv_out-29", "attn_out-29", "ffn_inp-29",
                 "ffn_out-29", "l_out-29", "result_norm", "result_output"):
        assert re.search(rf"{re.escape(name)}\s+0\s+0$", out, re.M), f"{name}: not bit-identical"
    assert "first divergence: none" in out
    assert "<<< first divergence" not in out
    m = re.search(r"summary: (\d+) positions, max \|Δlogit\| = (\S+), argmax agreement = (\S+)%", out)
    assert m and int(m.group(1)) == 8 and float(m.group(2)) == 0.0 and m.group(3) == "100.0"


@pytest.mark.parametrize("graph", ["fused", "per_head"])
@pytest.mark.parametrize("which,layer", [("small", 1), ("small", 0), ("smollm2", 1)])
def test_planted_attn_norm_error_is_located(request, which, layer, graph):
    path = request.getfixturevalue("planted_model" if which == "small" else "smollm2")
    rep = compare(path, PROMPT, n_positions=3, graph=graph, mutate=flip_attn_norm(layer))
    assert rep.graph == graph
    first = rep.first_divergence
    print("\n" + format_report(rep).split("\n\nlayer 2\n")[0])
    assert first is not None
    assert (first.layer, first.row) == (layer, "attn_norm")
    assert first.rel == pytest.approx(2.0, rel=1e-6)    # -x vs x: |Δ| = 2 max|x|
    for d in rep.rows:                                   # everything before it is bit-identical
        if d is first:
            break
        assert d.max_abs == 0.0
    assert f"first divergence: layer {layer}, tensor attn_norm" in format_report(rep)
    assert rep.max_abs_logit > 0


def test_q8_0_kv_cache_smollm2_no_divergence(smollm2):
    """A Q8_0 KV cache (flash attention on): llama.cpp's kqv_out is in the V Hadamard basis; the tool
    rotates it back, so that row differs by rounding only and nothing diverges."""
    rep = compare(smollm2, PROMPT, n_positions=4, kv_type="q8_0")
    assert rep.flash_attn and rep.kv_type == "q8_0"
    assert rep.first_divergence is None
    assert rep.max_abs_logit == 0.0 and rep.agreement == 1.0
    assert any("Hadamard" in n for n in rep.notes)
    for d in rep.rows:
        assert d.max_abs is not None, (d.layer, d.row, d.note)
        if d.row == "kqv_out":
            assert d.rel < 1e-5
        else:
            assert d.max_abs == 0.0, (d.layer, d.row)


@pytest.mark.parametrize("family,row,ref", [("gemma2", "ffn_inp", "sa_out"), ("mixtral", "ffn_out", "ffn_moe_out")])
def test_arch_specific_names_are_paired(tmp_path, family, row, ref):
    pytest.importorskip("llama_cpp")
    synthetic = pytest.importorskip("toy_llm.testing.synthetic")
    rep = compare(synthetic.write_model(tmp_path / f"{family}.gguf", family), PROMPT, n_positions=2)
    for L in range(rep.n_layers):
        d = rep.row(L, row)
        assert d.ref == f"{ref}-{L}" and d.note == "" and d.max_abs is not None


def test_format_report_marks_first_and_blank_rows():
    rows = [TensorDiff(0, "attn_norm", "attn_norm", "L0.rn1", "attn_norm-0", 0.0, 1.0, 0),
            TensorDiff(0, "attn_out", "attn_out", "L0.attn_out", "attn_out-0", note="no llama.cpp tensor"),
            TensorDiff(0, "ffn_out", "ffn_out", "L0.dn", "ffn_out-0", 5e-4, 1.0, 1),
            TensorDiff(0, "l_out", "l_out", "L0.post_ffn", "l_out-0", 0.5, 2.0, 1),
            TensorDiff(None, "result_output", "logits", "logits", "result_output", 3.0, 10.0, 1)]
    rep = ParityReport("m.gguf", "llama", [1, 2], "f32", False, 1e-3, [0.0, 3.0], [5, 6], [5, 7], rows,
                      n_layers=1)
    assert rep.first_divergence is rows[3]
    text = format_report(rep)
    assert "first divergence: layer 0, tensor l_out" in text
    assert [ln for ln in text.splitlines() if "<<< first divergence" in ln] == [ln for ln in text.splitlines() if "l_out-0" in ln]
    assert re.search(r"attn_out-0\s+\(no llama.cpp tensor\)", text)
    assert "summary: 2 positions, max |Δlogit| = 3, argmax agreement = 50.0%" in text
    short = format_report(rep, layers=False)
    assert "layer 0" not in short and "first divergence" not in short and "summary:" in short
    rep.tol = 0.28   # l_out's 0.25 no longer counts; the logits' 0.3 does
    assert rep.first_divergence is rows[4]
    assert "first divergence: output, tensor result_output" in format_report(rep)


def test_missing_llama_cpp_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)   # import llama_cpp -> ImportError
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(parity.ParityToolError, match=r"pip install llama-cpp-python==0\.3\.36"):
        compare(tmp_path / "m.gguf", [1, 2])
