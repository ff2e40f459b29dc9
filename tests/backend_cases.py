"""Reference cases for the accelerator backends (CUDA, Metal), computed by llama.cpp on the CPU.

A GPU machine may have no network and no llama-cpp-python, so the cases can be written ahead of
time on any machine that has the oracle (``scripts/device_bundle.sh`` does) and carried over:
a folder of synthetic GGUFs, the teacher-forcing tokens, llama.cpp's logits for every position
(fed one token per ubatch, as in tests/test_parity_families.py) and llama.cpp's greedy
continuation, with a ``manifest.json`` naming them. Nothing in a case comes from our engine.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

N_POS = 56        # past the Gemma files' sliding window of 16
N_GREEDY = 16
GREEDY_PROMPT = "The river ran quietly past the old mill"

# family, weight type, KV type, flash attention: every graph feature the engine uses on a device
# (GQA, biases, QK-norm, head_dim 128, SWA + softcap, MoE mul_mat_id, llama3 rope factors, Granite
# scales) and each kind of weight type, plus both KV settings.
CASES = [
    ("llama", "F32", "f32", False),
    ("llama", "F32", "f32", True),
    ("llama", "Q8_0", "q8_0", True),
    ("llama", "Q4_0", "f32", False),
    ("llama", "Q4_K", "f32", False),
    ("llama_untied", "Q6_K", "q8_0", True),
    ("llama3_rope", "Q4_1", "f32", False),
    ("qwen2", "Q5_K", "f32", False),
    ("qwen3", "Q4_K", "f32", True),
    ("gemma2", "Q8_0", "f32", False),
    ("gemma3", "Q6_K", "f32", False),
    ("mixtral", "Q4_K", "f32", False),
    ("qwen3moe", "Q8_0", "q8_0", True),
    ("olmoe", "Q4_0", "f32", False),
    ("granite", "Q5_0", "f32", False),
]


def case_name(family: str, wtype: str, kv_type: str, flash: bool) -> str:
    return f"{family}-{wtype}-kv_{kv_type}{'-fa' if flash else ''}"


def build_cases(dst: str | os.PathLike, cases=CASES) -> Path:
    """Write the models and llama.cpp's reference numbers for ``cases`` under ``dst``."""
    from oracle import oracle_greedy, oracle_logits, ubatch_oracle
    from toy_llm.testing import synthetic

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    manifest = []
    for family, wtype, kv_type, flash in cases:
        f32 = dst / f"{family}.F32.gguf"
        if not f32.exists():
            synthetic.write_model(f32, family)
        path = f32 if wtype == "F32" else dst / f"{family}.{wtype}.gguf"
        if not path.exists():
            synthetic.quantize(f32, path, wtype)
        llm = ubatch_oracle(path, kv_type, flash, n_ctx=256)
        try:
            tokens = llm.tokenize(synthetic.CORPUS.encode(), add_bos=False)[:N_POS]
            prompt = llm.tokenize(GREEDY_PROMPT.encode(), add_bos=False)
            logits = oracle_logits(llm, tokens)
            greedy = oracle_greedy(llm, prompt, N_GREEDY)
        finally:
            llm.close()
        name = case_name(family, wtype, kv_type, flash)
        np.save(dst / f"{name}.logits.npy", logits)
        manifest.append(dict(name=name, family=family, wtype=wtype, kv_type=kv_type, flash=flash,
                             gguf=path.name, sha256=_sha256(path), tokens=tokens, logits=f"{name}.logits.npy",
                             greedy_prompt=prompt, greedy=greedy))
    # the F32 sources of quantized files are not needed by the cases themselves
    used = {m["gguf"] for m in manifest}
    for f in dst.glob("*.gguf"):
        if f.name not in used:
            f.unlink()
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return dst


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_cases(src: str | os.PathLike) -> list[dict]:
    """The cases under ``src``. F32 files may be left out of a carried folder (they are the largest):
    they are written again by the deterministic synthetic writer, and every file's sha256 must
    equal the one llama.cpp's numbers were computed on."""
    from toy_llm.testing import synthetic

    src = Path(src)
    cases = json.loads((src / "manifest.json").read_text())
    for c in cases:
        c["gguf"] = src / c["gguf"]
        c["logits"] = src / c["logits"]
        if not c["gguf"].exists() and c["wtype"] == "F32":
            synthetic.write_model(c["gguf"], c["family"])
        if _sha256(c["gguf"]) != c["sha256"]:
            raise RuntimeError(f"{c['gguf']}: sha256 differs from the file llama.cpp's reference was computed on")
    return cases


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    print(build_cases(sys.argv[1] if len(sys.argv) > 1 else "backend-cases"))
