"""Regenerate the GGUF loader corpus: one tiny bad file per case the robustness issue (#11) found,
each built from one tiny synthetic llama (1 layer, d_model 32, 2 query heads, 1 KV head, head size
16, d_ff 64, 512 tokens, Q8_0 weights: ~40 KB), and MANIFEST.json with what each must give.

    .venv/bin/python tests/gguf_corpus/make_corpus.py      # rewrites tests/gguf_corpus/*.gguf

The expectations are written here by hand (the error substrings each message must contain),
never read off our loader's output. tests/test_gguf_fuzz.py (``-k corpus``) runs every file
through toy_llm.load + eval in a forked child with a time and address-space limit.
"""
from __future__ import annotations

import json
import struct
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from toy_llm.gguf_layout import T_ARR, T_STR, assemble, encode_kv, encode_tensor_info, parse  # noqa: E402

GGML_F32, GGML_I32 = 0, 26


def base_model(tmp: Path) -> bytes:
    from toy_llm.testing.synthetic import family_config, quantize, write_model

    cfg = family_config("llama")
    cfg.update(d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64, context_length=64, n_layers=1)
    f32 = write_model(tmp / "f32.gguf", "llama", config=cfg, seed=0)
    return quantize(f32, tmp / "q8.gguf", "Q8_0").read_bytes()


def u32(v):
    return struct.pack("<I", v & 0xFFFFFFFF)


def u64(v):
    return struct.pack("<Q", v & (2**64 - 1))


class Edit:
    def __init__(self, buf: bytes):
        self.buf, self.lay = buf, parse(buf)
        self.kvs = [buf[k.start:k.end] for k in self.lay.kvs]
        self.infos = [buf[t.start:t.end] for t in self.lay.tensors]
        self.data = buf[self.lay.data_start:]

    def kv(self, key):
        return self.lay.kv(key)

    def tensor(self, name):
        return next(t for t in self.lay.tensors if t.name == name)

    def patch(self, at: int, b: bytes) -> bytes:
        out = bytearray(self.buf)
        out[at:at + len(b)] = b
        return bytes(out)

    def set_kv(self, key, vtype, value, etype=None) -> bytes:
        kvs = list(self.kvs)
        rec = encode_kv(key, vtype, value, etype)
        i = next((i for i, k in enumerate(self.lay.kvs) if k.key == key), None)
        if i is None:
            kvs.append(rec)
        else:
            kvs[i] = rec
        return assemble(kvs, self.infos, self.data, version=self.lay.version)

    def dup_kv(self, key) -> bytes:
        i = next(i for i, k in enumerate(self.lay.kvs) if k.key == key)
        return assemble(self.kvs + [self.kvs[i]], self.infos, self.data, version=self.lay.version)

    def set_tensor(self, name, ne=None, typ=None, offset=None) -> bytes:
        infos = list(self.infos)
        i = next(i for i, t in enumerate(self.lay.tensors) if t.name == name)
        t = self.lay.tensors[i]
        infos[i] = encode_tensor_info(name, t.ne if ne is None else ne, t.type if typ is None else typ,
                                      t.offset if offset is None else offset)
        return assemble(self.kvs, infos, self.data, version=self.lay.version)


def cases(buf: bytes) -> dict[str, tuple[bytes, dict]]:
    """name -> (file bytes, expectation): {"ok": True} or {"error": [substrings], "category": ...}."""
    e = Edit(buf)
    toks, merges = e.kv("tokenizer.ggml.tokens"), e.kv("tokenizer.ggml.merges")
    out: dict[str, tuple[bytes, dict]] = {}

    def err(cat, *subs):
        return {"category": cat, "error": list(subs)}

    out["valid"] = (buf, {"category": "control", "ok": True})
    # -- hangs: huge claimed lengths, nested / retyped arrays, absurd block counts
    for v in (2**31, 2**32, 2**63 - 1, 2**64 - 1):
        out[f"hang_tokens_len_{v:x}"] = (e.patch(toks.n_at, u64(v)), err("hang", "tokenizer.ggml.tokens"))
    out["hang_merges_len_2p32"] = (e.patch(merges.n_at, u64(2**32)), err("hang", "tokenizer.ggml.merges"))
    out["hang_arch_type_array"] = (e.patch(e.kv("general.architecture").type_at, u32(T_ARR)),
                                   err("hang", "general.architecture"))
    out["hang_tokenizer_model_type_array"] = (e.patch(e.kv("tokenizer.ggml.model").type_at, u32(T_ARR)),
                                              err("hang", "tokenizer.ggml.model"))
    out["hang_tokens_etype_array"] = (e.patch(toks.value_at, u32(T_ARR)), err("hang", "tokenizer.ggml.tokens"))
    out["hang_block_count_2p31m1"] = (e.set_kv("llama.block_count", 4, 2**31 - 1), err("hang", "llama.block_count"))
    out["hang_block_count_2p63m1"] = (e.set_kv("llama.block_count", 10, 2**63 - 1), err("hang", "llama.block_count"))
    out["hang_key_len_2p64m1"] = (e.patch(e.kv("llama.block_count").start, u64(2**64 - 1)), err("hang", "key #"))
    out["hang_n_kv_2p64m1"] = (e.patch(16, u64(2**64 - 1)), err("hang", "key count"))
    out["hang_n_tensors_2p63m1"] = (e.patch(8, u64(2**63 - 1)), err("hang", "tensor count"))
    # -- unclear exceptions: value types the key does not have, counts that do not divide
    out["type_block_count_str"] = (e.set_kv("llama.block_count", T_STR, "1"), err("type", "llama.block_count", "str"))
    out["type_block_count_f32"] = (e.set_kv("llama.block_count", 6, 2.5), err("type", "llama.block_count", "f32"))
    out["type_block_count_bool"] = (e.set_kv("llama.block_count", 7, True), err("type", "llama.block_count", "bool"))
    out["type_block_count_list"] = (e.set_kv("llama.block_count", T_ARR, [1], 4),
                                    err("type", "llama.block_count", "arr"))
    out["type_arch_u32"] = (e.set_kv("general.architecture", 4, 1), err("type", "general.architecture"))
    out["type_tokens_i32"] = (e.set_kv("tokenizer.ggml.tokens", T_ARR, [0] * toks.n, 5),
                              err("type", "tokenizer.ggml.tokens"))
    out["head_count_zero"] = (e.set_kv("llama.attention.head_count", 4, 0), err("divide", "llama.attention.head_count"))
    out["head_count_kv_zero"] = (e.set_kv("llama.attention.head_count_kv", 4, 0),
                                 err("divide", "llama.attention.head_count_kv"))
    out["head_count_kv_not_dividing"] = (e.set_kv("llama.attention.head_count", 4, 3),
                                         err("divide", "llama.attention.head_count"))
    out["head_count_negative"] = (e.set_kv("llama.attention.head_count", 5, -2),
                                  err("divide", "llama.attention.head_count"))
    out["rope_dim_odd"] = (e.set_kv("llama.rope.dimension_count", 4, 15), err("divide", "llama.rope.dimension_count"))
    out["context_length_u64_max"] = (e.set_kv("llama.context_length", 10, 2**64 - 1),
                                     err("range", "llama.context_length"))
    out["rms_eps_nan"] = (e.set_kv("llama.attention.layer_norm_rms_epsilon", 6, float("nan")),
                          err("range", "llama.attention.layer_norm_rms_epsilon"))
    # -- silently accepted bad ids and vocabularies
    out["bos_id_eq_vocab"] = (e.set_kv("tokenizer.ggml.bos_token_id", 4, 512),
                              err("token id", "tokenizer.ggml.bos_token_id", "512"))
    out["eos_id_u32_max"] = (e.set_kv("tokenizer.ggml.eos_token_id", 4, 2**32 - 1),
                             err("token id", "tokenizer.ggml.eos_token_id"))
    out["unk_id_negative"] = (e.set_kv("tokenizer.ggml.unknown_token_id", 5, -1),
                              err("token id", "tokenizer.ggml.unknown_token_id", "-1"))
    out["pad_id_huge"] = (e.set_kv("tokenizer.ggml.padding_token_id", 10, 2**63 - 1),
                          err("token id", "tokenizer.ggml.padding_token_id"))
    short_tokens = e.set_kv("tokenizer.ggml.tokens", T_ARR, ["a%d" % i for i in range(toks.n - 1)], T_STR)
    out["tokens_fewer_than_embd_rows"] = (short_tokens, err("token id", "tokenizer.ggml.tokens", "511", "512"))
    # -- wrongly shaped / typed required tensors (byte counts unchanged: only a shape check sees them)
    # (Q8_0 rows must stay whole 32-blocks, else ggml's reader refuses them first)
    out["shape_ffn_gate_transposed"] = (e.set_tensor("blk.0.ffn_gate.weight", ne=[64, 32]),
                                        err("shape", "blk.0.ffn_gate.weight", "[64, 32]", "[32, 64]"))
    out["shape_attn_k_reshaped"] = (e.set_tensor("blk.0.attn_k.weight", ne=[64, 8]),
                                    err("shape", "blk.0.attn_k.weight", "[64, 8]", "[32, 16]"))
    out["shape_attn_q_3d"] = (e.set_tensor("blk.0.attn_q.weight", ne=[32, 16, 2]),
                              err("shape", "blk.0.attn_q.weight", "[32, 16, 2]", "[32, 32]"))
    out["shape_norm_as_2d"] = (e.set_tensor("blk.0.attn_norm.weight", ne=[16, 2]),
                               err("shape", "blk.0.attn_norm.weight", "[16, 2]", "[32]"))
    out["type_norm_i32"] = (e.set_tensor("blk.0.attn_norm.weight", typ=GGML_I32),
                            err("shape", "blk.0.attn_norm.weight", "i32", "F32"))
    out["type_output_norm_i32"] = (e.set_tensor("output_norm.weight", typ=GGML_I32),
                                   err("shape", "output_norm.weight", "i32"))
    out["tensor_5_dims"] = (e.patch(e.tensor("blk.0.attn_norm.weight").ndim_at, u32(5)),
                            err("dims", "blk.0.attn_norm.weight"))
    t = e.tensor("blk.0.ffn_norm.weight")
    out["tensor_ne_overflow"] = (e.patch(t.ne_at, u64(2**62)), err("dims", "blk.0.ffn_norm.weight"))
    out["tensor_bad_type_id"] = (e.patch(t.type_at, u32(99)), err("dims", "blk.0.ffn_norm.weight", "99"))
    # -- data offsets and sizes
    out["offset_misaligned"] = (e.set_tensor("blk.0.ffn_norm.weight", offset=t.offset + 1),
                                err("offset", "blk.0.ffn_norm.weight"))
    out["offset_past_end"] = (e.set_tensor("output_norm.weight", offset=2**63), err("offset", "output_norm.weight"))
    last = e.lay.tensors[-1]
    out["truncated_data"] = (buf[:e.lay.data_start + last.offset + 4], err("truncation", last.name))
    # -- truncation at section boundaries
    out["truncated_magic"] = (buf[:3], err("truncation", "magic"))
    out["truncated_in_kv"] = (buf[:e.kv("tokenizer.ggml.merges").value_at + 100], err("truncation", "key #"))
    out["truncated_in_tensor_info"] = (buf[:e.lay.tensors[3].ne_at + 4], err("truncation", "tensor #3"))
    out["truncated_before_data"] = (buf[:e.lay.tensor_info_end], err("truncation", "data"))
    out["bad_magic"] = (b"GGUG" + buf[4:], err("header", "magic"))
    out["bad_version"] = (e.patch(4, u32(4)), err("header", "version"))
    out["duplicate_key"] = (e.dup_kv("llama.block_count"), err("header", "llama.block_count"))
    out["alignment_not_pow2"] = (e.set_kv("general.alignment", 4, 3), err("header", "general.alignment"))
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        buf = base_model(Path(tmp))
    for old in HERE.glob("*.gguf"):
        old.unlink()
    manifest = {}
    for name, (data, expect) in cases(buf).items():
        (HERE / f"{name}.gguf").write_bytes(data)
        manifest[name] = expect
    (HERE / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    total = sum(p.stat().st_size for p in HERE.glob("*.gguf"))
    print(f"{len(manifest)} files, {total / 1024:.0f} KiB in {HERE}")


if __name__ == "__main__":
    main()
