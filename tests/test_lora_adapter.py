"""LoRA-Q adapters (toy_llm.lora): llama.cpp's LoRA GGUF format, and the adapter applied in-graph
in both graphs, checked against llama.cpp loading the same file (``Llama(lora_path=...)``).

llama.cpp (src/llama-graph.cpp, build_lora_mm) computes ``W x + ggml_scale(B (A x), s)`` before
the Q bias, with ``s = lora_scale * alpha / rank`` in float32 (llama-adapter.h, get_scale). Our
graphs build the same ops on the same tensors: the fused graph the same whole-matrix products, the
per-head graph each head's d_head rows of B (each output element is the same F32 dot product). So
the expected figure with an adapter is what it is without one: max |Δlogit| = 0, and the tests
assert exactly that. Every expected number comes from llama.cpp; the only engine-vs-engine
comparison is step 0 (B = 0 must leave the base model's logits bit for bit).
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import toy_llm
from oracle import PARITY_TEXT, oracle_greedy_text, oracle_logits, report
from toy_llm.gguf_load import load_config
from toy_llm.gguf_meta import GGUFLoadError
from toy_llm.lora import LoraAdapter, load_adapter
from toy_llm.testing import synthetic

gguf = pytest.importorskip("gguf")

N_POS = 32
THREADS = 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def lc():
    return pytest.importorskip("llama_cpp", reason="the llama-cpp-python oracle is installed by `make test`")


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lora-models")


def model_path(model_dir, name: str):
    if name == "smollm2":
        if not os.path.exists(SMOL):
            pytest.skip(f"{SMOL} is not there")
        return SMOL
    path = model_dir / f"{name}.F32.gguf"
    if not path.exists():
        synthetic.write_model(path, name)
    return str(path)


def teacher_tokens(path) -> list[int]:
    """N_POS tokens tokenized by llama.cpp (SmolLM2: the parity prose; synthetic: its corpus)."""
    text = PARITY_TEXT if path == SMOL else synthetic.CORPUS
    llm = lc().Llama(str(path), n_ctx=64, vocab_only=True, verbose=False)
    try:
        ids = llm.tokenize(text.encode(), add_bos=False)[:N_POS]
    finally:
        llm.close()
    assert len(ids) == N_POS
    return ids


def random_adapter(cfg, rank: int, seed: int, alpha: float, std: float = 0.05, layers=None) -> LoraAdapter:
    """Non-zero A and B (seeded numpy normals)."""
    rng = np.random.default_rng(seed)
    layers = range(cfg.n_layers) if layers is None else layers
    q = {il: ((std * rng.standard_normal((rank, cfg.d_model))).astype(np.float32),
              (std * rng.standard_normal((cfg.n_heads * cfg.head_dim, rank))).astype(np.float32)) for il in layers}
    return LoraAdapter(cfg.arch, alpha, q)


def per_head_adapter(cfg, r: int, seed: int, alpha_h: float, std: float = 0.05, zero_b: bool = False):
    """The seed's per-head layout (A_h (r, D), B_h (Dh, r) per query head) through from_per_head."""
    rng = np.random.default_rng(seed)
    H, D, Dh = cfg.n_heads, cfg.d_model, cfg.head_dim
    a = {il: (std * rng.standard_normal((H, r, D))).astype(np.float32) for il in range(cfg.n_layers)}
    b = {il: np.zeros((H, Dh, r), np.float32) if zero_b else (std * rng.standard_normal((H, Dh, r))).astype(np.float32)
         for il in range(cfg.n_layers)}
    return LoraAdapter.from_per_head(cfg.arch, a, b, alpha_h), a, b


def lora_oracle(path, adapter_path, scale: float, n_batch: int, n_ctx: int = 256, kv_type: int = 1):
    """llama.cpp as tests/oracle.py's ubatch_oracle (F16 KV, n_batch = n_ubatch, logits for every
    position), with the adapter file loaded by llama.cpp itself (None: the base model)."""
    kw = {} if adapter_path is None else {"lora_path": str(adapter_path), "lora_scale": scale}
    return lc().Llama(str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, logits_all=True, verbose=False,
                      n_threads=THREADS, type_k=kv_type, type_v=kv_type, flash_attn=False, **kw)


def llama_cpp_logits(path, adapter_path, scale, tokens, n_batch, kv_type: int = 1):
    llm = lora_oracle(path, adapter_path, scale, n_batch, kv_type=kv_type)
    try:
        return oracle_logits(llm, tokens)
    finally:
        llm.close()


# ------------------------------------------------------------------------------------------ format

def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    ad = LoraAdapter("llama", 12.5, {0: (rng.standard_normal((4, 16)), rng.standard_normal((24, 4))),
                                     3: (rng.standard_normal((4, 16)), rng.standard_normal((24, 4)))})
    ad.save(tmp_path / "a.gguf")
    back = load_adapter(tmp_path / "a.gguf")
    assert (back.arch, back.alpha, back.rank, sorted(back.q)) == ("llama", 12.5, 4, [0, 3])
    for il in ad.q:
        for x, y in zip(ad.q[il], back.q[il]):
            assert x.dtype == y.dtype == np.float32
            np.testing.assert_array_equal(x, y)
    # what llama.cpp reads: the keys and the ne it checks
    r = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    kv = {f.name: f for f in r.fields.values()}
    assert bytes(kv["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(kv["adapter.type"].parts[-1]).decode() == "lora"
    assert kv["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    shapes = {t.name: (list(t.shape), t.tensor_type) for t in r.tensors}
    assert shapes["blk.3.attn_q.weight.lora_a"] == ([16, 4], gguf.GGMLQuantizationType.F32)
    assert shapes["blk.3.attn_q.weight.lora_b"] == ([4, 24], gguf.GGMLQuantizationType.F32)


def test_per_head_round_trip_and_block_diagonal():
    rng = np.random.default_rng(2)
    H, r, D, Dh = 3, 2, 8, 4
    a = {0: rng.standard_normal((H, r, D)).astype(np.float32), 1: rng.standard_normal((H, r, D)).astype(np.float32)}
    b = {0: rng.standard_normal((H, Dh, r)).astype(np.float32), 1: rng.standard_normal((H, Dh, r)).astype(np.float32)}
    ad = LoraAdapter.from_per_head("llama", a, b, 4.0)
    assert (ad.rank, ad.alpha) == (H * r, 12.0)
    assert ad.scale(1.0) == np.float32(12.0) / np.float32(6)       # alpha / R == alpha_h / r
    x = rng.standard_normal(D).astype(np.float64)
    A, B = ad.q[1]
    for h in range(H):   # head h's rows of B (A x) are B_h (A_h x): no head sees another's A
        np.testing.assert_allclose((B.astype(np.float64) @ (A.astype(np.float64) @ x))[h * Dh:(h + 1) * Dh],
                                   b[1][h].astype(np.float64) @ (a[1][h].astype(np.float64) @ x), rtol=1e-12)
    a2, b2, alpha_h = ad.to_per_head(H)
    assert alpha_h == 4.0
    for il in a:
        np.testing.assert_array_equal(a2[il], a[il])
        np.testing.assert_array_equal(b2[il], b[il])
    mixed = LoraAdapter("llama", 1.0, {0: (A, B.copy())})
    mixed.q[0][1][0, -1] = 1.0   # head 0's row reads head 2's rank columns
    with pytest.raises(ValueError, match="not block-diagonal"):
        mixed.to_per_head(H)


def write_convert_lora_layout(path, arch: str, tensors: dict, alpha: float, norm: bool = False):
    """A file as llama.cpp's convert_lora_to_gguf.py writes one for a PEFT adapter on q_proj
    (--outtype f32): its model-card keys, general.type / adapter.type / adapter.lora.alpha, the
    file type, and per layer ``.lora_a`` (ne [n_in, r]) and ``.lora_b`` (ne [r, n_out]); with
    ``norm``, a ``*_norm.weight`` tensor as mergekit-extract-lora adds."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_name("Peft Adapter")
    w.add_base_model_count(1)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, arr in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(arr))
    if norm:
        w.add_tensor("blk.0.attn_norm.weight", np.ones(next(iter(tensors.values())).shape[-1], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_convert_lora_to_gguf_layout_loads_and_matches_llama_cpp(model_dir, tmp_path):
    path = model_path(model_dir, "llama")
    cfg = load_config(path)
    ad = random_adapter(cfg, 4, seed=3, alpha=8.0, std=0.1)
    tensors = {}
    for il, (a, b) in ad.q.items():
        tensors[f"blk.{il}.attn_q.weight.lora_a"] = a
        tensors[f"blk.{il}.attn_q.weight.lora_b"] = b
    f = tmp_path / "converted.gguf"
    write_convert_lora_layout(f, cfg.arch, tensors, 8.0, norm=True)
    with pytest.warns(UserWarning, match=r"skipping tensor 'blk\.0\.attn_norm\.weight'"):
        back = load_adapter(f, cfg)
    for il in ad.q:
        np.testing.assert_array_equal(back.q[il][0], ad.q[il][0])
        np.testing.assert_array_equal(back.q[il][1], ad.q[il][1])
    tokens = teacher_tokens(path)
    ref = llama_cpp_logits(path, f, 1.0, tokens, 512)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with toy_llm.load(path, max_T=256, n_threads=THREADS, lora=str(f)) as m:
            ours = m.eval(tokens)
    max_abs, agree = report("llama convert_lora layout (fused)", ours, ref)
    assert agree == 1.0 and max_abs == 0.0


# ------------------------------------------------------------------------------------------ step 0

@pytest.mark.parametrize("graph", ["fused", "per_head"])
def test_step0_zero_b_is_the_base_model(model_dir, graph):
    path = model_path(model_dir, "qwen2")   # a Q bias: the adapter term goes in before it
    cfg = load_config(path)
    tokens = teacher_tokens(path)[:12]
    zero_b, _, _ = per_head_adapter(cfg, 2, seed=4, alpha_h=16.0, zero_b=True)
    nb = 512 if graph == "fused" else 1
    with toy_llm.load(path, max_T=64, n_threads=1, graph=graph, n_batch=nb) as m:
        base = m.eval(tokens)
    with toy_llm.load(path, max_T=64, n_threads=1, graph=graph, n_batch=nb, lora=zero_b) as m:
        step0 = m.eval(tokens)
    d = float(np.abs(step0 - base).max())
    print(f"\n[lora] step 0 (B = 0) {graph}: max|Δlogit| vs the base model = {d}")
    np.testing.assert_array_equal(step0, base)


# ------------------------------------------------------------------------------------------ llama.cpp parity

CASES = [   # (model, adapter kind, lora_scale)
    ("smollm2", "random", 0.7),
    ("smollm2", "per_head", 1.0),
    ("llama", "random", 0.7),
    ("llama", "per_head", 1.0),
    ("llama", "alpha0", 0.5),     # alpha = 0: llama.cpp then uses lora_scale alone
    ("llama", "odd", 1.3),        # R = 6, alpha = 20: (1.3f * 20f) / 6f != 1.3f * (20f / 6f) in float32
    ("qwen2", "random", 1.3),
    ("qwen2", "per_head", 1.0),
]


def make_adapter(cfg, kind: str) -> LoraAdapter:
    if kind == "random":
        return random_adapter(cfg, 8, seed=5, alpha=16.0)
    if kind == "alpha0":
        return random_adapter(cfg, 8, seed=6, alpha=0.0, layers=[0, cfg.n_layers - 1])
    if kind == "odd":
        return random_adapter(cfg, 6, seed=12, alpha=20.0)
    return per_head_adapter(cfg, 2, seed=7, alpha_h=4.0)[0]


@pytest.mark.parametrize("name,kind,scale", CASES, ids=[f"{n}-{k}-s{s}" for n, k, s in CASES])
def test_adapter_logits_match_llama_cpp(model_dir, tmp_path, name, kind, scale):
    """Fused graph (ubatches of 512, llama.cpp's default) against llama.cpp's 512-ubatch, and the
    per-head graph against llama.cpp fed one token per ubatch: both bit-identical."""
    path = model_path(model_dir, name)
    cfg = load_config(path)
    ad = make_adapter(cfg, kind)
    f = tmp_path / f"{kind}.gguf"
    ad.save(f)
    tokens = teacher_tokens(path)
    base = llama_cpp_logits(path, None, 1.0, tokens, 512)
    for graph, nb in (("fused", 512), ("per_head", 1)):
        ref = llama_cpp_logits(path, f, scale, tokens, nb)
        effect = float(np.abs(ref - (base if nb == 512 else llama_cpp_logits(path, None, 1.0, tokens, 1))).max())
        with toy_llm.load(path, max_T=256, n_threads=THREADS, graph=graph, n_batch=nb, lora=str(f),
                          lora_scale=scale) as m:
            ours = m.eval(tokens)
        max_abs, agree = report(f"{name} {kind} adapter (R={ad.rank}, alpha={ad.alpha}, lora_scale={scale}) "
                                f"{graph} vs llama.cpp n_ubatch={nb}; the adapter moves llama.cpp's logits by "
                                f"{effect:.3g}", ours, ref)
        assert effect > 0.05        # the adapter does something
        assert agree == 1.0
        assert max_abs == 0.0
    if kind == "odd":
        # The zero needs llama.cpp's float32 scale (lora_scale * alpha) / rank: the other order is
        # 1 ulp off here. An F16 KV cache hides that (Q meets F16 K as F16), an F32 one shows it.
        f32 = np.float32
        other = float(f32(scale) * (f32(ad.alpha) / f32(ad.rank)))
        assert other != ad.scale(scale)
        ref = llama_cpp_logits(path, f, scale, tokens, 512, kv_type=0)
        with toy_llm.load(path, max_T=256, n_threads=THREADS, kv_type="f32", lora=ad, lora_scale=scale) as m:
            right = float(np.abs(m.eval(tokens) - ref).max())
            m.reset()
            m.cache.engine.set_lora_q(ad, other)
            off = float(np.abs(m.eval(tokens) - ref).max())
        print(f"[lora] F32 KV, fused: scale {ad.scale(scale)!r} (llama.cpp's): max|Δlogit| = {right}; "
              f"{other!r} (alpha / rank first): {off:.3g}")
        assert right == 0.0 and off > 0.0


@pytest.mark.parametrize("name,graph", [("smollm2", "fused"), ("smollm2", "per_head"), ("qwen2", "fused")])
def test_greedy_text_with_adapter_matches_llama_cpp(model_dir, tmp_path, name, graph):
    path = model_path(model_dir, name)
    cfg = load_config(path)
    ad = make_adapter(cfg, "per_head" if graph == "per_head" else "random")
    f = tmp_path / "ad.gguf"
    ad.save(f)
    n, nb = 16, (512 if graph == "fused" else 1)
    llm = lora_oracle(path, f, 0.8, nb)
    try:
        ids = llm.tokenize(b"The capital of France is", add_bos=False)
        ref = oracle_greedy_text(llm, ids, n)
    finally:
        llm.close()
    with toy_llm.load(path, max_T=256, n_threads=THREADS, graph=graph, n_batch=nb, lora=str(f),
                      lora_scale=0.8) as m:
        ours = m.generate(ids, max_new_tokens=n)
    print(f"\n[lora] {name} {graph} greedy with adapter: ours={ours!r} llama.cpp={ref!r}")
    assert ours == ref


# ------------------------------------------------------------------------------------------ API

def test_set_lora_swaps_scales_and_turns_off(model_dir, tmp_path):
    path = model_path(model_dir, "llama")
    cfg = load_config(path)
    tokens = teacher_tokens(path)[:16]
    a1, a2 = random_adapter(cfg, 4, seed=8, alpha=8.0), random_adapter(cfg, 4, seed=9, alpha=2.0)
    a2.save(tmp_path / "a2.gguf")
    with toy_llm.load(path, max_T=64, n_threads=THREADS, lora=a1) as m:
        m.eval(tokens[:3])
        m.reset()
        m.set_lora(str(tmp_path / "a2.gguf"), scale=1.5)      # same rank and layers: swapped in place
        np.testing.assert_array_equal(m.eval(tokens), llama_cpp_logits(path, tmp_path / "a2.gguf", 1.5, tokens, 512))
        m.reset()
        m.set_lora(None)
        np.testing.assert_array_equal(m.eval(tokens), llama_cpp_logits(path, None, 1.0, tokens, 512))
        with pytest.raises(ValueError, match="rank 8 .*rank 4"):
            m.set_lora(random_adapter(cfg, 8, seed=10, alpha=8.0))
        with pytest.raises(ValueError, match="scale must be a finite number"):
            m.set_lora(a1, scale=float("nan"))
        with pytest.raises(TypeError, match="LoraAdapter"):
            m.set_lora(42)
    with toy_llm.load(path, max_T=16, n_threads=1) as m:
        with pytest.raises(ValueError, match=r"loaded without LoRA tensors.*lora="):
            m.set_lora(a1)


def test_cli_generate_with_lora_matches_llama_cpp(model_dir, tmp_path):
    path = model_path(model_dir, "llama")
    cfg = load_config(path)
    f = tmp_path / "ad.gguf"
    random_adapter(cfg, 4, seed=11, alpha=8.0, std=0.1).save(f)
    prompt = "the quick"
    llm = lora_oracle(path, f, 0.5, 512)
    try:
        ref = oracle_greedy_text(llm, llm.tokenize(prompt.encode(), add_bos=True), 8)
    finally:
        llm.close()
    out = subprocess.run([sys.executable, "-m", "toy_llm", "generate", prompt, "-m", path, "-n", "8", "--lora",
                          str(f), "--lora-scale", "0.5", "--quiet-prompt", "-t", "1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ref + "\n"
    bad = subprocess.run([sys.executable, "-m", "toy_llm", "generate", prompt, "-m", path, "-n", "2", "--lora",
                          path, "-t", "1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "general.type" in bad.stderr and "not a LoRA adapter" in bad.stderr


# ------------------------------------------------------------------------------------------ bad files

def _bad_file(tmp_path, cfg, edit: str):
    """Our adapter for ``cfg`` with one thing wrong."""
    D, Q = cfg.d_model, cfg.n_heads * cfg.head_dim
    A, B = np.zeros((4, D), np.float32), np.zeros((Q, 4), np.float32)
    t = {"blk.0.attn_q.weight.lora_a": A, "blk.0.attn_q.weight.lora_b": B}
    arch, gtype = cfg.arch, "adapter"
    if edit == "arch":
        arch = "qwen2"
    elif edit == "a_shape":
        t["blk.0.attn_q.weight.lora_a"] = np.zeros((4, D + 1), np.float32)
    elif edit == "b_shape":
        t["blk.0.attn_q.weight.lora_b"] = np.zeros((Q - 1, 4), np.float32)
    elif edit == "rank":
        t["blk.0.attn_q.weight.lora_b"] = np.zeros((Q, 5), np.float32)
    elif edit == "missing_b":
        del t["blk.0.attn_q.weight.lora_b"]
    elif edit == "f16":
        t["blk.0.attn_q.weight.lora_b"] = B.astype(np.float16)
    elif edit == "layer":
        t = {k.replace("blk.0.", f"blk.{cfg.n_layers}."): v for k, v in t.items()}
    elif edit == "attn_k":
        t["blk.1.attn_k.weight.lora_a"] = A
        t["blk.1.attn_k.weight.lora_b"] = np.zeros((cfg.n_kv * cfg.head_dim, 4), np.float32)
    elif edit == "model":
        gtype = "model"
    f = tmp_path / f"bad-{edit}.gguf"
    w = gguf.GGUFWriter(str(f), arch)
    w.add_string("general.type", gtype)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
    for name, arr in t.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return f


BAD = [
    ("arch", r"general\.architecture.*'qwen2'.*'llama'"),
    ("a_shape", r"tensor 'blk\.0\.attn_q\.weight\.lora_a' has ne \[\d+, 4\], expected \[\d+, R\]"),
    ("b_shape", r"tensor 'blk\.0\.attn_q\.weight\.lora_b' has ne \[4, \d+\], expected \[R, \d+\]"),
    ("rank", r"'blk\.0\.attn_q\.weight\.lora_a' has ne .* 'blk\.0\.attn_q\.weight\.lora_b' ne .*rank"),
    ("missing_b", r"tensor 'blk\.0\.attn_q\.weight\.lora_b' is missing"),
    ("f16", r"tensor 'blk\.0\.attn_q\.weight\.lora_b' has type F16, expected F32"),
    ("layer", r"tensor 'blk\.\d+\.attn_q\.weight\.lora_a': the model has \d+ layers"),
    ("attn_k", r"only attn_q adapters.*blk\.1\.attn_k\.weight\.lora_a, blk\.1\.attn_k\.weight\.lora_b"),
    ("model", r"general\.type is 'model', expected 'adapter'"),
]


@pytest.mark.parametrize("edit,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_adapter_files_raise_naming_the_tensor(model_dir, tmp_path, edit, msg):
    path = model_path(model_dir, "llama")
    cfg = load_config(path)
    f = _bad_file(tmp_path, cfg, edit)
    with pytest.raises(GGUFLoadError, match=msg) as e:
        toy_llm.load(path, max_T=16, n_threads=1, lora=str(f))
    assert str(f) in str(e.value)
    if edit in ("f16", "missing_b", "rank", "attn_k", "model"):   # refused without any model, too
        with pytest.raises(GGUFLoadError, match=msg):
            load_adapter(f)


@pytest.mark.parametrize("variant", ["copy_loader", "per_head_file"])
def test_adapter_on_other_load_paths_matches_llama_cpp(model_dir, tmp_path, variant):
    """The seed's copy loader (weights in the session's buffer) and its per-head toy checkpoints
    (attn_q stored one tensor per head; llama.cpp runs the whole-matrix file they came from)."""
    path = model_path(model_dir, "qwen2")
    cfg = load_config(path)
    f = tmp_path / "ad.gguf"
    make_adapter(cfg, "random").save(f)
    tokens = teacher_tokens(path)[:16]
    if variant == "copy_loader":
        ref = llama_cpp_logits(path, f, 0.9, tokens, 512)
        kw = dict(path=path, loader="copy")
    else:
        ref = llama_cpp_logits(path, f, 0.9, tokens, 1)
        kw = dict(path=synthetic.write_per_head(path, tmp_path / "per-head.gguf"), graph="per_head")
    with toy_llm.load(max_T=64, n_threads=THREADS, lora=str(f), lora_scale=0.9, **kw) as m:
        ours = m.eval(tokens)
    max_abs, agree = report(f"qwen2 adapter, {variant}", ours, ref)
    assert agree == 1.0 and max_abs == 0.0
