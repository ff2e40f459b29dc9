"""The seed's class and the public API beyond parity: trace, LoRA-Q, errors that name things, CLI."""
from __future__ import annotations

import numpy as np
import pytest

import toy_llm
from toy_llm import tinynn as tnn
from toy_llm.cli import main as cli_main
from toy_llm.engine import SmolLM2KVFFICache, SmolLM2KVFFICacheMetal
from toy_llm.engine.weights import MissingTensorError
from toy_llm.gguf_load import GGUFLoadError, load_config

synthetic = pytest.importorskip("toy_llm.testing.synthetic")


def rewrite_gguf(src, dst, edit):
    """Copy GGUF ``src`` to ``dst`` with every key, passing each tensor's data through
    ``edit(name, data)`` (None drops the tensor)."""
    import gguf

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), str(r.fields["general.architecture"].contents()))
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        w.add_key_value(f.name, f.contents(), f.types[0],
                        sub_type=f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        data = edit(t.name, np.asarray(t.data))
        if data is not None:
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return synthetic.write_model(tmp_path_factory.mktemp("api") / "llama.gguf", "llama")


def test_seed_names_and_attributes(llama_path):
    assert SmolLM2KVFFICacheMetal is SmolLM2KVFFICache
    with toy_llm.load(llama_path, max_T=32) as m:
        c = m.cache
        for name in ("attn_softcap", "d_ff", "d_head", "d_model", "embed_scale", "final_softcap",
                     "gguf_handle_keepalive", "group_size", "has_post_norms", "has_qk_norm", "has_qkv_bias",
                     "has_untied_output", "is_moe", "kv_blocks_ffi", "kv_type_k", "kv_type_v",
                     "lora_q_adamw_enabled", "lora_q_enabled", "lora_q_rank", "max_T", "n_experts",
                     "n_experts_used", "n_heads", "n_kv", "n_layers", "qk_norm_kind", "realized", "rms_eps",
                     "rope_base", "rope_scaling", "sess", "swa_alternates", "swa_window", "t_final_norm_gamma",
                     "t_output", "t_rope_freq_factors", "t_token_embed", "use_flash_attn", "vocab_size",
                     "weight_type"):
            assert hasattr(c, name), name
        assert c.realized and c.group_size == c.n_heads // c.n_kv
        assert len(c.kv_blocks_ffi) == c.n_layers and len(c.kv_blocks_ffi[0].t_w_q) == c.n_heads
        gamma = c.read_persistent_mat(c.t_final_norm_gamma, 1, c.d_model)
        assert gamma.shape == (1, c.d_model) and np.isfinite(gamma).all()
        assert c.head_nbytes(tnn.GGML_TYPE_Q8_0, 64, 512) == 64 * 544
        with pytest.raises(tnn.TinyNNError):
            c.head_nbytes(tnn.GGML_TYPE_Q4_K, 64, 100)   # 100 is not a whole number of blocks


def test_trace_returns_named_intermediates(llama_path):
    for graph in ("per_head", "fused"):
        with toy_llm.load(llama_path, max_T=32, graph=graph, n_batch=1) as m:
            ids = m.tokenize("The river")
            m.cache.enable_trace()
            logits = m.eval(ids)
            trace = m.cache.dump_trace()
        cfg = m.config
        for name in ("hook_embed", "blocks.0.ln1.hook_normalized", "blocks.0.attn.hook_q", "blocks.0.attn.hook_k",
                     "blocks.0.attn.hook_z", "blocks.1.hook_resid_post", "ln_final.hook_normalized", "hook_logits"):
            assert name in trace, (graph, name)
        assert trace["blocks.0.attn.hook_q"].shape == (1, cfg.n_heads, cfg.head_dim)
        assert trace["blocks.0.attn.hook_k"].shape == (1, cfg.n_kv, cfg.head_dim)
        np.testing.assert_array_equal(trace["hook_logits"].reshape(-1), logits[-1])
        # the residual stream is what the taps say it is: resid_post = resid_mid + mlp_out
        np.testing.assert_allclose(trace["blocks.1.hook_resid_post"],
                                   trace["blocks.1.hook_resid_mid"] + trace["blocks.1.hook_mlp_out"], rtol=1e-6,
                                   atol=1e-6)


def test_both_graphs_trace_the_same_names_and_numbers(llama_path):
    """One naming scheme: every hook point of the per-head graph exists in the fused graph with the same
    shape and the same values (both compute the same numbers, one position per graph)."""
    traces = {}
    for graph in ("per_head", "fused"):
        with toy_llm.load(llama_path, max_T=32, graph=graph, n_batch=1) as m:
            m.cache.enable_trace()
            m.eval([65, 66, 67])
            traces[graph] = m.cache.dump_trace()
    assert set(traces["per_head"]) == set(traces["fused"])
    for name, a in traces["per_head"].items():
        np.testing.assert_array_equal(a, traces["fused"][name], err_msg=name)


def test_lora_q_starts_as_a_no_op_and_then_changes_q(llama_path):
    cfg = load_config(llama_path)
    tokens = [65, 66, 67, 68]

    def run(lora: bool, bump: bool = False):
        c = SmolLM2KVFFICache()
        c.apply_config(cfg)
        if lora:
            c.enable_lora_q(4)
            c.enable_lora_q_adamw()
        g = tnn.tnn_gguf_load(str(llama_path))
        c.realize_for_mmap(g, cfg, 16, cfg.untied_output, cfg.qkv_bias)
        try:
            if lora:
                c.upload_lora_q_init(seed=7, init_scale=0.01)
                if bump:
                    b = np.full((c.d_head, 4), 0.5, np.float32)
                    tnn.upload(c.sess, c.kv_blocks_ffi[0].t_w_lora_b_q[0], b)
            return np.stack([c.step(t, i) for i, t in enumerate(tokens)])
        finally:
            c.close()

    base = run(False)
    np.testing.assert_array_equal(run(True), base)          # B = 0: exactly the base model
    assert np.abs(run(True, bump=True) - base).max() > 1e-3  # a non-zero B changes the output


def test_errors_name_the_file_and_the_tensor(tmp_path, llama_path):
    import gguf

    bad_arch = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(bad_arch), "bert")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(GGUFLoadError, match=r"bert\.gguf.*'bert'.*unsupported architecture"):
        toy_llm.load(bad_arch)

    # drop one tensor from an otherwise valid file
    missing = rewrite_gguf(llama_path, tmp_path / "missing.gguf",
                           lambda name, data: None if name == "blk.1.ffn_up.weight" else data)
    with pytest.raises(MissingTensorError, match=r"missing\.gguf.*'blk\.1\.ffn_up\.weight'"):
        toy_llm.load(missing)

    with pytest.raises(GGUFLoadError, match="no such file"):
        toy_llm.load(tmp_path / "nope.gguf")


def test_bad_inputs_raise_instead_of_crashing(llama_path):
    with toy_llm.load(llama_path, max_T=8) as m:
        with pytest.raises(ValueError, match="outside the vocabulary"):
            m.eval([10 ** 6])
        with pytest.raises(ValueError, match="context full"):
            m.eval(list(range(9)))
        with pytest.raises(ValueError, match="kv_type"):
            toy_llm.load(llama_path, kv_type="q4")


def test_cli_help_info_and_generate(capsys, llama_path):
    with pytest.raises(SystemExit) as e:
        cli_main(["--help"])
    assert e.value.code == 0
    assert "generate" in capsys.readouterr().out
    assert cli_main(["info", str(llama_path)]) == 0
    out = capsys.readouterr().out
    assert "arch         llama" in out and "d_model 512" in out
    assert cli_main(["generate", "The river", "-n", "8", "-m", str(llama_path), "--max-t", "64"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("The river") and "tok/s" in captured.err
    with toy_llm.load(llama_path, max_T=64) as m:
        assert captured.out.rstrip("\n") == "The river" + m.generate("The river", max_new_tokens=8)
    assert cli_main(["info", "/nonexistent.gguf"]) == 2


def test_metadata_that_does_not_fit_a_tensor_is_named(tmp_path, llama_path):
    """A GGUF whose dims promise more rows than a tensor holds fails naming the tensor, rather
    than reading the neighbouring tensor's bytes."""
    bad = rewrite_gguf(llama_path, tmp_path / "short.gguf",   # half the K rows of layer 0
                       lambda name, data: data[: data.shape[0] // 2] if name == "blk.0.attn_k.weight" else data)
    with pytest.raises(GGUFLoadError, match=r"short\.gguf.*'blk\.0\.attn_k\.weight' has shape \[512, 64\], "
                                            r"expected \[512, 128\]"):
        toy_llm.load(bad)


@pytest.mark.parametrize("kind,name", [(1, "cuda"), (2, "metal")])
def test_backend_falls_back_to_cpu_when_not_compiled_in(kind, name, llama_path):
    s = tnn.tnn_session_new(kind)
    try:
        if tnn.tnn_have_backend(kind):
            assert tnn.tnn_session_backend_kind(s) in (0, kind)
        else:
            assert tnn.tnn_session_backend_kind(s) == 0
            assert tnn.tnn_backend_name(s) == "CPU"
    finally:
        tnn.tnn_session_free(s)
    with pytest.raises(tnn.TinyNNError, match="unknown backend kind"):
        tnn.tnn_session_new(7)
    with toy_llm.load(llama_path, max_T=16, backend=name) as m:   # runs, on the CPU if need be
        assert np.isfinite(m.eval(m.tokenize("The"))).all()
    with pytest.raises(ValueError, match="unknown backend"):
        toy_llm.load(llama_path, backend="tpu")


def test_repacked_weights_only_feed_matmul(tmp_path, llama_path):
    """Weights stored in ggml's CPU_REPACK layout run matmuls like any weight, and every other use
    (views, lookups, copies, reading back) is refused with a message, not computed on the
    interleaved bytes."""
    pytest.importorskip("llama_cpp", reason="the Q4_0 file is made by llama.cpp's quantizer")
    q = synthetic.quantize(llama_path, tmp_path / "q4_0.gguf", "Q4_0")
    g = tnn.tnn_gguf_load(str(q))
    s = tnn.tnn_session_new(0)
    try:
        if tnn.tnn_session_set_weight_repack(s, 1) != 1:
            pytest.skip("this CPU has no CPU_REPACK buffer type")
        tnn.tnn_session_attach_weight_mmap(s, tnn.tnn_gguf_mmap_base(g), tnn.tnn_gguf_mmap_size(g))
        idx = tnn.tnn_gguf_find_index(g, "blk.0.attn_q.weight")
        typ, off = tnn.tnn_gguf_tensor_type(g, idx), tnn.tnn_gguf_tensor_file_offset(g, idx)
        w = tnn.tnn_input_2d_weight_mmap(s, 512, 512, typ, off)
        plain = tnn.tnn_input_2d_persistent_mmap(s, 512, 512, typ, off)
        if tnn.tnn_tensor_is_repacked(s, w) != 1:
            pytest.skip("ggml does not repack Q4_0 on this CPU")
        with pytest.raises(tnn.TinyNNError, match="before declaring weights"):
            tnn.tnn_session_set_weight_repack(s, 0)
        tnn.tnn_finalize_weights(s)
        tnn.tnn_reset_for_rebuild(s)
        x = tnn.tnn_input_2d_f32(s, 1, 512)
        for call in (lambda: tnn.tnn_view_2d(s, w, 32, 2, 18, 0),
                     lambda: tnn.tnn_get_rows(s, w, tnn.tnn_input_1d_i32(s, 1)),
                     lambda: tnn.tnn_cpy(s, w, plain)):
            with pytest.raises(tnn.TinyNNError, match="repacked"):
                call()
        y = tnn.tnn_matmul(s, w, x)
        y_plain = tnn.tnn_matmul(s, plain, x)
        tnn.tnn_add_to_graph(s, y_plain)
        tnn.tnn_set_output(y_plain)
        tnn.tnn_realize(s, y)
        tnn.upload(s, x, np.linspace(-1, 1, 512, dtype=np.float32))
        tnn.tnn_compute(s)
        # same weights, two kernels: equal up to float summation order
        np.testing.assert_allclose(tnn.download(s, y), tnn.download(s, y_plain), rtol=1e-4, atol=1e-4)
        with pytest.raises(tnn.TinyNNError, match="cannot be read back"):
            tnn.download(s, w)
    finally:
        tnn.tnn_session_free(s)
        tnn.tnn_gguf_free(g)


def test_graph_builders_share_weights_and_kv_cache(llama_path):
    """One cache, two graph builders: positions written by the per-head graph are read by the
    fused-heads graph and the other way round, giving exactly the logits of either alone."""
    tokens = [65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76]
    with toy_llm.load(llama_path, max_T=64, graph="per_head") as m:
        per_head = m.eval(tokens)
    with toy_llm.load(llama_path, max_T=64, n_batch=1) as m:
        fused = m.eval(tokens)
        m.reset()
        mixed = []
        for i, tok in enumerate(tokens):
            m.cache.fused_heads = (i // 3) % 2 == 1        # alternate builders every three positions
            mixed.append(m.eval([tok])[0])
    np.testing.assert_array_equal(fused, per_head)
    np.testing.assert_array_equal(np.stack(mixed), per_head)


def test_fused_heads_says_what_it_cannot_do(tmp_path, llama_path):
    cache = SmolLM2KVFFICache()
    cache.enable_lora_q(4)
    with pytest.raises(RuntimeError, match="LoRA-Q adapters are per head"):
        cache.enable_fused_heads()
    per_head = synthetic.write_per_head(llama_path, tmp_path / "per-head.gguf")
    with pytest.raises(ValueError, match=r"per-head\.gguf.*one tensor per head.*graph='per_head'"):
        toy_llm.load(per_head, max_T=16)
    with toy_llm.load(per_head, max_T=16, graph="per_head") as m:
        assert m.eval([65]).shape == (1, m.config.vocab)
        m.cache.fused_heads = True     # switching later: the fused block says why it cannot run
        with pytest.raises(ValueError, match="stores them per head"):
            m.eval([66])


def test_batched_eval_says_what_it_cannot_do(llama_path):
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="n_batch must be a positive int"):
            toy_llm.load(llama_path, max_T=16, n_batch=bad)
    with pytest.raises(ValueError, match="graph must be one of"):
        toy_llm.load(llama_path, max_T=16, graph="fast")
    with toy_llm.load(llama_path, max_T=16, graph="per_head") as m:
        with pytest.raises(RuntimeError, match="needs the fused graph"):
            m.cache.step_batch([65, 66], 0)
    with toy_llm.load(llama_path, max_T=16, n_batch=8) as m:
        with pytest.raises(ValueError, match="outside the vocabulary"):
            m.cache.step_batch([65, 10**6], 0)
        with pytest.raises(ValueError, match="outside the cache"):
            m.cache.step_batch([65] * 4, 14)
        with pytest.raises(ValueError, match="context full"):
            m.eval([65] * 17)
        assert m.eval([65, 66, 67]).shape == (3, m.config.vocab)     # and it still works


@pytest.mark.parametrize("kv_type", ["f32", "q8_0"])
def test_fused_heads_traced_steps_match_replayed_ones(llama_path, kv_type):
    """Tracing rebuilds the fused graph every step (a tap per tensor) instead of replaying it: the
    same logits either way."""
    tokens = [65, 66, 67, 68, 69, 70]
    with toy_llm.load(llama_path, max_T=64, kv_type=kv_type, n_batch=1) as m:
        replayed = m.eval(tokens)
        m.reset()
        m.cache.enable_trace()
        traced = m.eval(tokens)
        taps = m.cache.dump_trace()
    np.testing.assert_array_equal(traced, replayed)
    assert taps["blocks.0.attn.hook_q"].shape == (1, m.config.n_heads, m.config.head_dim)
    assert taps["hook_logits"].shape == (1, m.config.vocab)


def test_cli_bench_times_both_engines_on_the_same_file(capsys, llama_path):
    pytest.importorskip("llama_cpp", reason="--llama-cpp times llama-cpp-python")
    assert cli_main(["bench", "-m", str(llama_path), "-n", "4", "--batch", "16", "--llama-cpp"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("prompt 128 tokens")]
    assert len(lines) == 2
    assert "fused graph" in lines[0] and "(batch 16)" in lines[0]
    assert "llama-cpp-python 0.3.36" in lines[1] and "(batch 16)" in lines[1]


@pytest.mark.parametrize("graph", ["fused", "per_head"])
def test_threadpool_gives_the_same_logits(tmp_path, graph):
    """A persistent ggml threadpool changes who runs the work, not the work: logits are identical."""
    from toy_llm.testing import synthetic

    path = synthetic.write_model(tmp_path / "llama.gguf", "llama")
    out = []
    for pool in (False, True):
        with toy_llm.load(path, max_T=64, n_threads=2, graph=graph, threadpool=pool) as m:
            out.append(np.concatenate([m.eval([1, 2, 3, 4, 5]), m.eval([6]), m.eval([7])]))
    np.testing.assert_array_equal(out[0], out[1])
