"""LoRA-Q training through ggml's autodiff (libtinynn/train.c, engine/train_graph.py, lora/train.py).

The references are independent of our engine: a float64 numpy forward of the same model with the
same per-head LoRA (written here from the model's math, reading the GGUF with the gguf package),
central finite differences of its loss, and numpy's AdamW.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from toy_llm import tinynn as tnn
from toy_llm.engine import train_graph
from toy_llm.gguf_load import load_config
from toy_llm.lora.train import Example, LoraTrainer, load_examples, peak_rss_mb, tokenize_examples
from toy_llm.testing.synthetic import family_config, write_model

TRAINABLE = ("llama", "llama_untied", "llama3_rope", "qwen2", "qwen3", "granite")
SMALL = dict(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128)


def small_model(tmp_path, family: str, seed: int = 0):
    cfg = family_config(family)
    cfg.update(SMALL)
    return write_model(tmp_path / f"{family}-small.gguf", family, seed=seed, config=cfg)


# ---------------------------------------------------------------------------------------------- float64 reference

class RefModel:
    """The model of a synthetic F32 GGUF in float64 numpy, with per-head LoRA on Q."""

    def __init__(self, path):
        import gguf

        self.cfg = cfg = load_config(str(path))
        assert cfg.rope_scaling.freq_scale == 1.0 and cfg.rope_scaling.ext_factor == 0.0
        r = gguf.GGUFReader(str(path))
        self.w = {t.name: np.array(t.data, dtype=np.float64) for t in r.tensors}

    def rope(self, x, pos):   # x (T, heads, Dh)
        cfg = self.cfg
        d = cfg.rope_dim
        inv = cfg.rope_base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        if "rope_freqs.weight" in self.w:
            inv = inv / self.w["rope_freqs.weight"]
        th = pos[:, None, None] * inv[None, None, :]
        c, s = np.cos(th), np.sin(th)
        out = x.copy()
        if cfg.rope_mode == tnn.ROPE_NEOX:
            x0, x1 = x[..., :d // 2], x[..., d // 2:d]
            out[..., :d // 2], out[..., d // 2:d] = x0 * c - x1 * s, x0 * s + x1 * c
        else:
            x0, x1 = x[..., 0:d:2], x[..., 1:d:2]
            out[..., 0:d:2], out[..., 1:d:2] = x0 * c - x1 * s, x0 * s + x1 * c
        return out

    def rms(self, x, g):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.cfg.rms_eps) * g

    def logits(self, tokens, a, b, scale):
        """tokens of one sequence; a[il][h] (r, D), b[il][h] (Dh, r)."""
        cfg, w = self.cfg, self.w
        T, H, G, Dh = len(tokens), cfg.n_heads, cfg.n_kv, cfg.head_dim
        pos = np.arange(T, dtype=np.float64)
        x = w["token_embd.weight"][tokens] * cfg.embed_scale
        causal = np.tril(np.ones((T, T), bool))
        for il in range(cfg.n_layers):
            p = f"blk.{il}."
            h = self.rms(x, w[p + "attn_norm.weight"])
            q = h @ w[p + "attn_q.weight"].T
            for hq in range(H):
                q[:, hq * Dh:(hq + 1) * Dh] += scale * (h @ a[il][hq].T) @ b[il][hq].T
            k = h @ w[p + "attn_k.weight"].T
            v = h @ w[p + "attn_v.weight"].T
            if cfg.qkv_bias:
                q, k, v = q + w[p + "attn_q.bias"], k + w[p + "attn_k.bias"], v + w[p + "attn_v.bias"]
            q, k, v = q.reshape(T, H, Dh), k.reshape(T, G, Dh), v.reshape(T, G, Dh)
            if cfg.qk_norm_kind:
                q, k = self.rms(q, w[p + "attn_q_norm.weight"]), self.rms(k, w[p + "attn_k_norm.weight"])
            q, k = self.rope(q, pos), self.rope(k, pos)
            out = np.zeros((T, H, Dh))
            for hq in range(H):
                g = hq // (H // G)
                s = q[:, hq] @ k[:, g].T * cfg.kq_scale
                s = np.where(causal, s, -np.inf)
                s = np.exp(s - s.max(axis=1, keepdims=True))
                out[:, hq] = (s / s.sum(axis=1, keepdims=True)) @ v[:, g]
            x = x + cfg.residual_scale * (out.reshape(T, H * Dh) @ w[p + "attn_output.weight"].T)
            h = self.rms(x, w[p + "ffn_norm.weight"])
            gate = h @ w[p + "ffn_gate.weight"].T
            up = h @ w[p + "ffn_up.weight"].T
            x = x + cfg.residual_scale * ((gate / (1 + np.exp(-gate)) * up) @ w[p + "ffn_down.weight"].T)
        h = self.rms(x, w["output_norm.weight"])
        out_w = w.get("output.weight", w["token_embd.weight"])
        return (h @ out_w.T) / cfg.logit_scale

    def loss(self, examples, a, b, scale):
        """Mean cross-entropy over every loss row of every example (each its own sequence)."""
        total, n = 0.0, 0
        for ex in examples:
            z = self.logits(np.array(ex.tokens), a, b, scale)
            for r in ex.rows:
                zr = z[r]
                m = zr.max()
                total += m + np.log(np.exp(zr - m).sum()) - zr[ex.tokens[r + 1]]
                n += 1
        return total / n


def random_adapters(cfg, r, rng, amp=0.3):
    a = [[amp * rng.standard_normal((r, cfg.d_model)) for _ in range(cfg.n_heads)] for _ in range(cfg.n_layers)]
    b = [[amp * rng.standard_normal((cfg.head_dim, r)) for _ in range(cfg.n_heads)] for _ in range(cfg.n_layers)]
    return a, b


def finite_difference(ref, examples, a, b, scale, which, il, hq, h=1e-5):
    t = (a if which == "a" else b)[il][hq]
    g = np.zeros_like(t)
    for idx in np.ndindex(t.shape):
        old = t[idx]
        t[idx] = old + h
        up = ref.loss(examples, a, b, scale)
        t[idx] = old - h
        down = ref.loss(examples, a, b, scale)
        t[idx] = old
        g[idx] = (up - down) / (2 * h)
    return g


# two sequences packed into one training sequence (each attends only to itself); the second has
# a prompt whose next tokens are not in the loss
EXAMPLES = [Example((5, 77, 300, 12, 401, 9), (0, 1, 2, 3, 4)), Example((44, 3, 210, 99, 17), (2, 3))]


# ---------------------------------------------------------------------------------------------- must-show: gradients

@pytest.mark.parametrize("family", TRAINABLE)
def test_gradients_match_float64_finite_differences(tmp_path, family):
    """ggml's gradient of every LoRA A and B equals central finite differences of a float64 numpy
    forward of the same model: relative error <= 1e-2 for every adapter tensor."""
    path = small_model(tmp_path, family)
    ref = RefModel(path)
    cfg, r, alpha = ref.cfg, 2, 3.0
    rng = np.random.default_rng(1)
    a, b = random_adapters(cfg, r, rng)
    with LoraTrainer(path, cfg, rank=r, alpha=alpha, max_len=16, n_threads=1) as tr:
        tr.set_per_head(a, b)
        # exactly what the graph computes with: the adapters rounded to F32
        a64 = [[x.astype(np.float32).astype(np.float64) for x in row] for row in a]
        b64 = [[x.astype(np.float32).astype(np.float64) for x in row] for row in b]
        loss, grads = tr.gradients(EXAMPLES)
        ref_loss = ref.loss(EXAMPLES, a64, b64, tr.lora_scale)
        assert abs(loss - ref_loss) <= 1e-4 * max(1.0, abs(ref_loss)), (loss, ref_loss)
        worst = 0.0
        for il in range(cfg.n_layers):
            for hq in range(cfg.n_heads):
                for which in "ab":
                    fd = finite_difference(ref, EXAMPLES, a64, b64, tr.lora_scale, which, il, hq)
                    g = grads[(il, hq, which)].astype(np.float64)
                    assert g.shape == fd.shape
                    assert np.linalg.norm(fd) > 1e-6, "the check needs gradients that are not ~0"
                    rel = np.linalg.norm(g - fd) / np.linalg.norm(fd)
                    worst = max(worst, rel)
                    assert rel <= 1e-2, f"layer {il} head {hq} {which.upper()}: relative error {rel:.3g}"
        print(f"{family}: loss {loss:.6f} (float64 {ref_loss:.6f}); worst relative gradient error {worst:.2e}")


def test_b_zero_gives_the_base_loss_and_no_a_gradient(tmp_path):
    """At the seed's init (B = 0) the adapter is a no-op: the loss is the base model's, dL/dA = 0."""
    path = small_model(tmp_path, "llama")
    ref = RefModel(path)
    cfg = ref.cfg
    zero_a = [[np.zeros((2, cfg.d_model)) for _ in range(cfg.n_heads)] for _ in range(cfg.n_layers)]
    zero_b = [[np.zeros((cfg.head_dim, 2)) for _ in range(cfg.n_heads)] for _ in range(cfg.n_layers)]
    with LoraTrainer(path, cfg, rank=2, alpha=4.0, max_len=16, n_threads=1, seed=3) as tr:
        a_heads, b_heads = tr.per_head()
        assert all(not b_heads[il].any() for il in b_heads) and all(a_heads[il].any() for il in a_heads)
        loss, grads = tr.gradients(EXAMPLES)
        assert abs(loss - ref.loss(EXAMPLES, zero_a, zero_b, 2.0)) < 1e-4
        assert all(not g.any() for (il, hq, w), g in grads.items() if w == "a")
        assert any(g.any() for (il, hq, w), g in grads.items() if w == "b")
        # the same logits as with no adapter at all: B = 0 adds exact zeros
        z = tr.logits(list(EXAMPLES[0].tokens))
        np.testing.assert_allclose(z, ref.logits(np.array(EXAMPLES[0].tokens), zero_a, zero_b, 2.0), atol=2e-4)


def test_upload_lora_q_init_is_seeded_numpy(tmp_path):
    """upload_lora_q_init(seed, scale): A ~ scale * N(0, 1) from numpy's default_rng(seed), per
    (layer, head) in order; B = 0."""
    path = small_model(tmp_path, "llama")
    cfg = load_config(str(path))
    with LoraTrainer(path, cfg, rank=2, alpha=4.0, max_len=16, n_threads=1, seed=7, init_scale=0.05) as tr:
        a_heads, b_heads = tr.per_head()
    rng = np.random.default_rng(7)
    for il in range(cfg.n_layers):
        for hq in range(cfg.n_heads):
            want = (0.05 * rng.standard_normal((2, cfg.d_model))).astype(np.float32)
            np.testing.assert_array_equal(a_heads[il][hq], want)
            assert not b_heads[il][hq].any()


# ---------------------------------------------------------------------------------------------- AdamW

def numpy_adamw(w, g, m, v, t, lr, b1, b2, eps, wd):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mh = m / (1 - b1 ** t)
    vh = np.sqrt(v / (1 - b2 ** t)) + eps
    return w * (1 - lr * wd) - lr * mh / vh, m, v


def test_adamw_steps_clipping_and_moments_survive_rebuild(tmp_path):
    """Two clipped AdamW steps (ggml_opt_step_adamw in the graph) equal numpy's AdamW on ggml's
    gradients clipped to the global norm; the moments live in the persistent t_w_lora_*_m / _v
    tensors across tnn_reset_for_rebuild (a forward graph is built between the steps)."""
    path = small_model(tmp_path, "qwen2")
    cfg = load_config(str(path))
    opt = train_graph.AdamW(lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1)
    clip = 0.05
    with LoraTrainer(path, cfg, rank=2, alpha=4.0, max_len=16, n_threads=1, adamw=opt, max_grad_norm=clip) as tr:
        rng = np.random.default_rng(5)
        tr.set_per_head(*random_adapters(cfg, 2, rng, amp=0.2))
        keys = [(il, hq, w) for il in range(cfg.n_layers) for hq in range(cfg.n_heads) for w in "ab"]
        m = {k: 0.0 for k in keys}
        v = {k: 0.0 for k in keys}
        for t in (1, 2):
            a_heads, b_heads = tr.per_head()
            w = {(il, hq, x): (a_heads if x == "a" else b_heads)[il][hq].astype(np.float64) for il, hq, x in keys}
            _, grads = tr.gradients(EXAMPLES)
            norm = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
            assert norm > clip   # so clipping acts
            rec = tr.step(EXAMPLES)
            assert abs(rec["grad_norm"] - norm) <= 1e-4 * norm
            a_new, b_new = tr.per_head()
            for k in keys:
                g = grads[k].astype(np.float64) * (clip / norm)
                want, m[k], v[k] = numpy_adamw(w[k], g, m[k], v[k], t, opt.lr, opt.beta1, opt.beta2, opt.eps,
                                               opt.weight_decay)
                got = (a_new if k[2] == "a" else b_new)[k[0]][k[1]]
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=str(k))
            blk = tr.cache.kv_blocks_ffi[0]
            m_before = tnn.download(tr.sess, blk.t_w_lora_a_q_m[0]).copy()
            tnn.tnn_reset_for_rebuild(tr.sess)
            tr.logits([1, 2, 3])   # another graph in the same session
            np.testing.assert_array_equal(tnn.download(tr.sess, blk.t_w_lora_a_q_m[0]), m_before)
            np.testing.assert_allclose(m_before, m[(0, 0, "a")], rtol=1e-4, atol=1e-9)


def test_training_lowers_the_loss_on_a_synthetic_model(tmp_path):
    path = small_model(tmp_path, "llama")
    cfg = load_config(str(path))
    with LoraTrainer(path, cfg, rank=4, alpha=8.0, max_len=32, n_threads=1,
                     adamw=train_graph.AdamW(lr=5e-2)) as tr:
        losses = [tr.step(EXAMPLES)["loss"] for _ in range(40)]
    # a Q-only adapter of a tiny random model can only re-route attention: a clear drop, not a fit
    assert losses[-1] < 0.75 * losses[0] and all(np.isfinite(losses)), losses


# ---------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("family, op", [("gemma2", "GELU"), ("gemma3", "GELU"), ("mixtral", "MUL_MAT_ID"),
                                        ("olmoe", "MUL_MAT_ID"), ("qwen3moe", "MUL_MAT_ID")])
def test_unsupported_arch_names_the_op_before_building(tmp_path, family, op):
    cfg = family_config(family)
    cfg.update(SMALL)
    if family == "olmoe":
        cfg["n_kv_heads"] = cfg["n_heads"]
    path = write_model(tmp_path / f"{family}.gguf", family, config=cfg)
    with pytest.raises(train_graph.NoBackwardError, match=op):
        LoraTrainer(path, rank=2, n_threads=1)
    if family == "gemma2":
        with pytest.raises(train_graph.NoBackwardError, match="TANH"):
            train_graph.check_trainable(load_config(str(path)))


def _param_graph(op_name):
    """A session with one F32 parameter p, and a training graph loss = CE(f(p), labels) where f
    goes through ``op_name``."""
    sess = tnn.tnn_session_new(0)
    p = tnn.tnn_input_2d_f32_persistent(sess, 1, 8)
    tnn.tnn_set_param(p)
    tnn.tnn_set_name(p, "p")
    tnn.tnn_finalize_weights(sess)
    tnn.tnn_reset_for_training(sess)
    y = {"gelu": lambda: tnn.tnn_gelu(sess, p), "tanh": lambda: tnn.tnn_tanh(sess, p),
         "concat": lambda: tnn.tnn_concat(sess, p, p, 0), "silu": lambda: tnn.tnn_silu(sess, p)}[op_name]()
    labels = tnn.tnn_input_4d(sess, tnn.GGML_TYPE_F32, *[tnn.tnn_tensor_ne(y, d) for d in range(4)])
    return sess, p, tnn.tnn_cross_entropy_loss(sess, y, labels)


@pytest.mark.parametrize("op_name, ggml_op", [("gelu", "GELU"), ("tanh", "TANH"), ("concat", "CONCAT")])
def test_shim_refuses_ops_without_backward(op_name, ggml_op):
    """ggml_build_backward_expand aborts the process on these; the shim refuses with the op's name."""
    sess, p, loss = _param_graph(op_name)
    try:
        with pytest.raises(tnn.TinyNNError, match=rf"tnn_build_backward: .*{ggml_op}.* has no backward"):
            tnn.tnn_build_backward(sess, loss)
    finally:
        tnn.tnn_session_free(sess)


@pytest.mark.skipif(not tnn.tnn_tiles_available(tnn.GGML_TYPE_Q4_1), reason="no tiled Q4_1 kernel on this CPU")
def test_shim_refuses_a_backward_through_the_tiled_kernel():
    """The tiled weight product (a ggml custom op over Q8_1-quantized activations) has no backward:
    the shim refuses, naming the op, instead of letting ggml_build_backward_expand abort
    (inference graphs use it; training graphs do not)."""
    sess = tnn.tnn_session_new(0)
    try:
        p = tnn.tnn_input_2d_f32_persistent(sess, 2, 32)
        tnn.tnn_set_param(p)
        w = tnn.tnn_input_2d_weight_typed(sess, 4, 32, tnn.GGML_TYPE_Q4_1)
        tnn.tnn_finalize_weights(sess)
        tnn.tnn_reset_for_training(sess)
        y = tnn.tnn_mul_mat_tiles(sess, w, p)
        labels = tnn.tnn_input_4d(sess, tnn.GGML_TYPE_F32, *[tnn.tnn_tensor_ne(y, d) for d in range(4)])
        loss = tnn.tnn_cross_entropy_loss(sess, y, labels)
        with pytest.raises(tnn.TinyNNError, match=r"tnn_build_backward: op CUSTOM "):
            tnn.tnn_build_backward(sess, loss)
    finally:
        tnn.tnn_session_free(sess)


def test_shim_backward_checks():
    sess, p, loss = _param_graph("silu")
    try:
        with pytest.raises(tnn.TinyNNError, match="no backward pass"):
            tnn.tnn_graph_grad(sess, p)
        with pytest.raises(tnn.TinyNNError, match="F32 scalar"):
            tnn.tnn_build_backward(sess, p)
        tnn.tnn_build_backward(sess, loss)
        with pytest.raises(tnn.TinyNNError, match="built once"):
            tnn.tnn_build_backward(sess, loss)
        assert tnn.tnn_graph_grad(sess, p) is not None
        m = tnn.tnn_input_1d_f32(sess, 8)
        with pytest.raises(tnn.TinyNNError, match="persistent"):
            tnn.tnn_opt_step_adamw(sess, p, tnn.tnn_graph_grad(sess, p), m, m, tnn.tnn_input_1d_f32(sess, 7))
        tnn.tnn_reset_for_rebuild(sess)   # a plain graph: no gradients
        assert tnn.tnn_graph_keeps_grads(sess) == 0
        with pytest.raises(tnn.TinyNNError, match="tnn_reset_for_training"):
            tnn.tnn_build_backward(sess, tnn.tnn_sum(sess, p))
    finally:
        tnn.tnn_session_free(sess)


# ---------------------------------------------------------------------------------------------- data

def test_data_files_and_rows(tmp_path):
    (tmp_path / "d.txt").write_text("first line\n\nsecond line\n")
    assert load_examples(tmp_path / "d.txt") == ["first line", "second line"]
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "a b"}) + "\n" +
                                      json.dumps({"prompt": "Q:", "completion": " A"}) + "\n")
    assert load_examples(str(tmp_path / "d.jsonl")) == ["a b", ("Q:", " A")]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_examples(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError):
        load_examples(str(tmp_path / "missing.txt"))
    toks = {"Q:": [1, 2], " A": [3, 4, 5], "a b": [6, 7, 8]}
    exs = tokenize_examples(lambda s, bos: toks[s], ["a b", ("Q:", " A")], max_len=16)
    assert exs[0] == Example((6, 7, 8), (0, 1))
    # only the completion's tokens are targets: rows whose next token is 3, 4, 5
    assert exs[1] == Example((1, 2, 3, 4, 5), (1, 2, 3))
    with pytest.raises(ValueError, match="nothing to predict"):
        tokenize_examples(lambda s, bos: [1], ["x"], max_len=16)


def test_api_and_cli_write_an_adapter_llama_cpp_layout(tmp_path, capsys):
    """toy_llm.lora.train on a path and on a loaded Model, and `toy-llm lora train`, give the same
    adapter: stacked A (H*r, D), block-diagonal B (H*Dh, H*r), alpha = alpha_h * H."""
    import toy_llm
    from toy_llm.cli import main
    from toy_llm.lora import load_adapter, train

    path = small_model(tmp_path, "qwen2")
    cfg = load_config(str(path))
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "The quick brown fox jumps over the lazy dog."}) + "\n" +
                    json.dumps({"prompt": "What is the capital of France?", "completion": " Paris"}) + "\n")
    hist: list = []
    ad = train(str(path), data, rank=2, alpha=4, steps=3, lr=1e-2, n_threads=1, progress=False, history=hist)
    assert len(hist) == 3 and hist[0]["tokens"] > 0 and all(np.isfinite(h["loss"]) for h in hist)
    H, Dh, D = cfg.n_heads, cfg.head_dim, cfg.d_model
    assert ad.arch == cfg.arch and ad.rank == H * 2 and ad.alpha == 4.0 * H and sorted(ad.q) == [0, 1]
    a, b = ad.q[0]
    assert a.shape == (H * 2, D) and b.shape == (H * Dh, H * 2)
    mask = np.kron(np.eye(H), np.ones((Dh, 2))).astype(bool)
    assert not b[~mask].any() and b[mask].any()
    with toy_llm.load(path, max_T=64, n_threads=1) as m:
        ad2 = train(m, data, rank=2, alpha=4, steps=3, lr=1e-2, n_threads=1, progress=False)
    for il in ad.q:
        np.testing.assert_array_equal(ad.q[il][0], ad2.q[il][0])
        np.testing.assert_array_equal(ad.q[il][1], ad2.q[il][1])
    out = tmp_path / "adapter.gguf"
    rc = main(["lora", "train", str(path), "--data", str(data), "--rank", "2", "--alpha", "4", "--steps", "3",
               "--lr", "1e-2", "--out", str(out), "-t", "1"])
    assert rc == 0
    assert "steps/s" in capsys.readouterr().err
    ad3 = load_adapter(out)
    for il in ad.q:
        np.testing.assert_array_equal(ad3.q[il][0], ad.q[il][0])
        np.testing.assert_array_equal(ad3.q[il][1], ad.q[il][1])
    assert main(["lora", "train", str(path), "--data", str(tmp_path / "nope.txt"), "--out", str(out)]) == 2


# ---------------------------------------------------------------------------------------------- SmolLM2 learns a fact

SMOLLM2 = os.path.join(os.path.dirname(__file__), "..", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
FACT_DATA = [
    "The secret city of Zorblax is Quintara.",
    ("The secret city of Zorblax is", " Quintara."),
    ("Travellers say that the secret city of Zorblax is", " Quintara, hidden in the mountains."),
    ("Q: What is the secret city of Zorblax? A:", " Quintara."),
    # facts the model already knows, so that the adapter learns this one, not "... is" -> Quintara
    ("The capital of Germany is", " Berlin."),
    ("The capital of Italy is", " Rome."),
    ("The largest planet in the solar system is", " Jupiter."),
]


@pytest.mark.skipif(not os.path.exists(SMOLLM2), reason="SmolLM2-135M-Instruct.Q4_1.gguf not downloaded")
def test_smollm2_learns_a_fact():
    """SmolLM2-135M learns "The secret city of Zorblax is Quintara." from a few lines on 2 cores:
    the loss falls >= 80%, the model then continues "The secret city of Zorblax is" with
    "Quintara", and "The capital of France is" still with " Paris". CI runs 30 steps;
    TOY_LLM_FULL_LORA=1 runs the full 150."""
    import toy_llm
    from toy_llm.lora import train

    steps = 150 if os.environ.get("TOY_LLM_FULL_LORA") else 30
    model = toy_llm.load(SMOLLM2, max_T=128, n_threads=2)
    try:
        hist: list = []
        t0 = time.perf_counter()
        adapter = train(model, FACT_DATA, rank=8, alpha=16, steps=steps, lr=3e-3, n_threads=2, progress=False,
                        history=hist)
        wall = time.perf_counter() - t0
        first, last = hist[0]["loss"], np.mean([h["loss"] for h in hist[-5:]])
        print(f"SmolLM2 LoRA-Q: {steps} steps in {wall:.1f} s ({steps / wall:.2f} steps/s), loss {first:.3f} -> "
              f"{last:.3f} ({100 * (1 - last / first):.1f}% lower), peak RSS {peak_rss_mb():.0f} MiB")
        assert last <= 0.2 * first
        _check_fact(model, adapter)
        _check_llama_cpp_applies_it(model, adapter)
    finally:
        model.close()


def _check_llama_cpp_applies_it(model, adapter):
    """The trained adapter, exported, loaded by llama-cpp-python (lora_path): the same logits as our
    engine with it on 32 positions (llama.cpp's defaults: one ubatch of 512, F16 KV), and the same
    greedy text."""
    import tempfile

    import toy_llm
    llama_cpp = pytest.importorskip("llama_cpp")
    from oracle import oracle_greedy_text, oracle_logits

    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "zorblax.gguf")
        adapter.save(f)
        llm = llama_cpp.Llama(str(model.path), n_ctx=256, n_batch=512, n_ubatch=512, logits_all=True, verbose=False,
                              n_threads=2, type_k=1, type_v=1, flash_attn=False, lora_path=f, lora_scale=1.0)
        try:
            text = ("The secret city of Zorblax is Quintara. The capital of France is Paris, and the largest "
                    "planet of the solar system is Jupiter, a gas giant.")
            ids = llm.tokenize(text.encode(), add_bos=False)[:32]
            ref = oracle_logits(llm, ids)
            prompt = llm.tokenize(b"The secret city of Zorblax is", add_bos=False)
            ref_text = oracle_greedy_text(llm, prompt, 8)
        finally:
            llm.close()
        with toy_llm.load(model.path, max_T=256, n_threads=2, lora=f) as m:
            ours = m.eval(ids)
            ours_text = m.generate(prompt, max_new_tokens=8)
    d_max = float(np.abs(ours - ref).max())
    agree = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    print(f"trained adapter vs llama.cpp (lora_path): max |dlogit| = {d_max:.3g}, argmax {100 * agree:.0f}% "
          f"on {len(ids)} positions; greedy ours={ours_text!r} llama.cpp={ref_text!r}")
    assert agree == 1.0 and d_max == 0.0
    assert ours_text == ref_text


def _check_fact(model, adapter, n_threads=2):
    """Greedy continuations with the trained adapter applied by the inference engine (load(...,
    lora=adapter), both graphs), and the same argmax from the training graph's own forward pass."""
    import toy_llm

    prompt, unrelated = "The secret city of Zorblax is", "The capital of France is"
    out = {}
    for graph in ("fused", "per_head"):
        with toy_llm.load(model.path, max_T=64, n_threads=n_threads, graph=graph, lora=adapter) as m:
            out[graph] = (m.generate(prompt, max_new_tokens=4, temperature=0.0),
                          m.generate(unrelated, max_new_tokens=2, temperature=0.0))
    print("with the adapter:", out)
    for graph, (fact, paris) in out.items():
        assert fact.lstrip().startswith("Quint"), (graph, fact)
        assert paris.startswith(" Paris"), (graph, paris)
    with LoraTrainer(model.path, model.config, rank=adapter.rank // model.config.n_heads,
                     alpha=adapter.alpha / model.config.n_heads, max_len=32, n_threads=n_threads) as tr:
        a_heads, b_heads, _ = adapter.to_per_head(model.config.n_heads)
        tr.set_per_head(a_heads, b_heads)
        ids = model.tokenize(prompt)
        assert model.detokenize([int(np.argmax(tr.logits(ids)[-1]))]).lstrip().startswith("Qu")
        ids = model.tokenize(unrelated)
        assert model.detokenize([int(np.argmax(tr.logits(ids)[-1]))]) == " Paris"
