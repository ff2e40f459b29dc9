"""Tokenizer tests against llama.cpp's own tokenizer test vectors.

The vectors are the ``models/ggml-vocab-*.gguf`` files of the pinned llama.cpp with their
``.gguf.inp`` / ``.gguf.out`` companions (inputs separated by ``\\n__ggml_vocab_test__\\n``,
one line of space-separated ids per input), parsed the way ``tests/test-tokenizer-0.cpp``
parses them, and checked with ``add_special=False, parse_special=False`` like that test.

Verified vocab files (every vector must match token for token):

==============================  =========  ===============================
vocab file                      vectors    tokenizer
==============================  =========  ===============================
ggml-vocab-command-r.gguf       46         gpt2 BPE, pre "command-r"
ggml-vocab-deepseek-coder.gguf  46         gpt2 BPE, pre "deepseek-coder"
ggml-vocab-deepseek-llm.gguf    46         gpt2 BPE, pre "deepseek-llm"
ggml-vocab-falcon.gguf          46         gpt2 BPE, pre "falcon"
ggml-vocab-gemma-4.gguf         46         gemma4 (SPM-style BPE)
ggml-vocab-gpt-2.gguf           46         gpt2 BPE, pre "gpt-2"
ggml-vocab-llama-bpe.gguf       46         gpt2 BPE, pre "llama-bpe"
ggml-vocab-llama-spm.gguf       46         llama SPM
ggml-vocab-mpt.gguf             46         gpt2 BPE, pre "mpt"
ggml-vocab-phi-3.gguf           46         llama SPM (+ Phi-3 RSTRIP attrs)
ggml-vocab-qwen2.gguf           46         gpt2 BPE, pre "qwen2"
ggml-vocab-qwen35.gguf          50         gpt2 BPE, pre "qwen35"
ggml-vocab-refact.gguf          46         gpt2 BPE, pre "refact"
ggml-vocab-starcoder.gguf       46         gpt2 BPE, pre "starcoder"
==============================  =========  ===============================

Skipped:

* ``ggml-vocab-bert-bge.gguf`` (has vectors): WordPiece (``tokenizer.ggml.model ==
  "bert"``) is not implemented; loading it must raise ``ValueError``.
* ``ggml-vocab-nomic-bert-moe.gguf`` (no vectors): Unigram/T5 (``"t5"``), not implemented.
* ``ggml-vocab-aquila.gguf``, ``ggml-vocab-baichuan.gguf``, ``ggml-vocab-gpt-neox.gguf``:
  no ``.inp``/``.out`` vectors; they load and are covered by the optional differential
  test against the ``llama_cpp`` library (``test_matches_llama_cpp_library``), which
  skips when that package is not importable.

The llama.cpp files are looked up at ``build/llama_cpp_python-0.3.36/vendor/llama.cpp/models``
(extracted by the Makefile); tests that need them skip when the directory is absent.
"""

from __future__ import annotations

import functools
import random
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toy_llm.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "build" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "models"
NO_MODELS = f"llama.cpp vocab files not found at {MODELS_DIR} (run the Makefile to extract the sdist)"

# vocab files with vectors that we deliberately do not support
UNSUPPORTED_WITH_VECTORS = {
    "ggml-vocab-bert-bge.gguf": "WordPiece (bert) tokenizer is not implemented",
}

VECTOR_SEPARATOR = b"\n__ggml_vocab_test__\n"


def read_vectors(vocab_path: Path) -> dict[str, list[int]]:
    """Port of read_tests() in llama.cpp's tests/test-tokenizer-0.cpp."""
    raw = (vocab_path.parent / (vocab_path.name + ".inp")).read_bytes()
    out_lines = (vocab_path.parent / (vocab_path.name + ".out")).read_bytes().split(b"\n")
    if out_lines and out_lines[-1] == b"":  # std::getline yields no final empty line
        out_lines.pop()
    inputs: list[bytes] = []
    pos = 0
    while pos < len(raw):
        nxt = raw.find(VECTOR_SEPARATOR, pos)
        if nxt == -1:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(VECTOR_SEPARATOR)
    assert len(inputs) == len(out_lines), "input and output files have different numbers of tests"
    tests: dict[str, list[int]] = {}  # std::map: a repeated input keeps the last ids
    for inp, line in zip(inputs, out_lines):
        stripped = line.decode().strip()
        tests[inp.decode("utf-8")] = [int(tok) for tok in stripped.split(" ")] if stripped else []
    return tests


def _vector_params() -> list:
    if not MODELS_DIR.is_dir():
        return [pytest.param(None, id="no-llama.cpp-models")]
    params = []
    for path in sorted(MODELS_DIR.glob("ggml-vocab-*.gguf")):
        if (path.parent / (path.name + ".inp")).exists():
            n = len(read_vectors(path))
            params.append(pytest.param(path.name, id=f"{path.stem.removeprefix('ggml-vocab-')}-{n}vectors"))
    return params


VECTOR_PARAMS = _vector_params()


@functools.lru_cache(maxsize=None)
def load(name: str) -> Tokenizer:
    return Tokenizer.from_gguf(MODELS_DIR / name)


def require_models() -> None:
    if not MODELS_DIR.is_dir():
        pytest.skip(NO_MODELS)


def _clean_spaces(text: str) -> str:
    """What llama.cpp's detokenizer does to plain text when clean_spaces is set
    (the behaviour of HF's clean_up_tokenization_spaces)."""
    for a, b in ((" ?", "?"), (" !", "!"), (" .", "."), (" ,", ",")):
        text = text.replace(a, b)
    return text


# ---------------------------------------------------------------------------- vectors

@pytest.mark.parametrize("name", VECTOR_PARAMS)
def test_vocab_vectors(name):
    if name is None:
        pytest.skip(NO_MODELS)
    if name in UNSUPPORTED_WITH_VECTORS:
        with pytest.raises(ValueError, match="bert"):
            load(name)
        pytest.skip(f"{name}: {UNSUPPORTED_WITH_VECTORS[name]}")
    tok = load(name)
    vectors = read_vectors(MODELS_DIR / name)
    failures = []
    for text, expected in vectors.items():
        got = tok.encode(text, add_special=False, parse_special=False)
        if got != expected:
            failures.append(f"{text!r}: expected {expected}, got {got}")
    assert not failures, f"{len(failures)}/{len(vectors)} vectors differ:\n" + "\n".join(failures[:10])


@pytest.mark.parametrize("name", VECTOR_PARAMS)
def test_decode_roundtrip_on_vectors(name):
    """BPE and SPM are lossless, so decode(encode(s)) == s except for llama.cpp's
    clean_spaces pass (on for gpt-2, llama-bpe, falcon, ...: " ," -> "," etc.)."""
    if name is None:
        pytest.skip(NO_MODELS)
    if name in UNSUPPORTED_WITH_VECTORS:
        pytest.skip(f"{name}: {UNSUPPORTED_WITH_VECTORS[name]}")
    tok = load(name)
    for text in read_vectors(MODELS_DIR / name):
        expected = text
        if tok.clean_spaces:
            if " '" in text:
                continue  # the apostrophe rules of the clean-up are not modelled here
            expected = _clean_spaces(text)
        assert tok.decode(tok.encode(text, add_special=False)) == expected, repr(text)


def test_gpt2_decode_examples():
    require_models()
    tok = load("ggml-vocab-gpt-2.gguf")
    assert tok.clean_spaces
    assert tok.decode(tok.encode("Hello world")) == "Hello world"
    assert tok.decode(tok.encode(" this is 🦙.cpp")) == " this is 🦙.cpp"
    # llama.cpp's clean-up pass: " ," " ." " !" " ?" and " 's" lose their space
    assert tok.decode(tok.encode("Hello , world ! it 's")) == "Hello, world! it's"
    # a token boundary inside a UTF-8 sequence: bytes are joined before decoding
    ids = tok.encode("🦙")
    assert len(ids) > 1 and tok.decode_bytes(ids) == "🦙".encode()


# ---------------------------------------------------------------------------- properties

@settings(max_examples=60, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_qwen2_roundtrip_any_text(text):
    """qwen2 has clean_spaces off: byte-level BPE must reproduce any text exactly."""
    require_models()
    tok = load("ggml-vocab-qwen2.gguf")
    assert tok.decode(tok.encode(text, add_special=False)) == text


@settings(max_examples=60, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=40))
def test_spm_roundtrip_any_text(text):
    """SPM: the space prefix is removed again and unknown characters use byte tokens."""
    require_models()
    tok = load("ggml-vocab-llama-spm.gguf")
    assert tok.decode(tok.encode(text, add_special=False)) == text


# ---------------------------------------------------------------------------- specials

def test_spm_bos_and_space_prefix():
    require_models()
    tok = load("ggml-vocab-llama-spm.gguf")
    assert tok.add_bos and tok.bos_id == 1 and tok.eos_id == 2
    ids = tok.encode("Hello world")
    assert ids[0] == tok.bos_id
    assert tok.token_text(ids[1]) == "\u2581Hello"  # the added space prefix
    assert tok.encode("Hello world", add_special=False) == ids[1:]
    # byte fallback: U+10FFFF is not in the vocab
    byte_ids = tok.encode("\U0010ffff", add_special=False)
    assert [tok.token_text(i) for i in byte_ids][-4:] == ["<0xF4>", "<0x8F>", "<0xBF>", "<0xBF>"]
    assert tok.token_to_piece(tok.token_to_id("<0x0A>")) == b"\n"
    # llama.cpp quirk, kept on purpose: when BOS is stripped the prefix space stays
    assert tok.decode(tok.encode("Hi"), remove_special=True) == " Hi"
    assert tok.decode(tok.encode("Hi", add_special=False)) == "Hi"


def test_llama3_bos_eos_eog():
    require_models()
    tok = load("ggml-vocab-llama-bpe.gguf")
    assert tok.add_bos and tok.bos_id == 128000 and tok.eos_id == 128001
    assert tok.encode("Hello")[0] == 128000
    assert tok.eot_id == tok.token_to_id("<|eot_id|>")
    assert {128001, tok.eot_id} <= tok.eog_ids
    assert tok.is_eog(tok.eot_id) and not tok.is_eog(tok.encode("Hello", add_special=False)[0])


def test_parse_special_chatml():
    require_models()
    tok = load("ggml-vocab-qwen2.gguf")
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    text = "<|im_start|>user\nHi there<|im_end|>\n"
    expected = [im_start] + tok.encode("user\nHi there", add_special=False) + [im_end] \
        + tok.encode("\n", add_special=False)
    assert tok.encode(text, add_special=False, parse_special=True) == expected
    plain = tok.encode(text, add_special=False, parse_special=False)
    assert im_start not in plain and im_end not in plain
    assert tok.decode(plain) == text
    # control tokens render only when asked to
    assert tok.decode(expected) == "user\nHi there\n"
    assert tok.decode(expected, unparse_special=True) == text
    assert {im_end, tok.token_to_id("<|endoftext|>")} <= tok.eog_ids
    assert isinstance(tok.chat_template, str) and "im_start" in tok.chat_template


def test_user_defined_tokens_are_split_without_parse_special():
    require_models()
    tok = load("ggml-vocab-qwen2.gguf")
    from toy_llm.tokenizer import ATTR_CONTROL, ATTR_USER_DEFINED
    user_defined = [i for i in range(tok.n_vocab)
                    if tok.token_attr(i) & ATTR_USER_DEFINED and not tok.token_attr(i) & ATTR_CONTROL]
    assert user_defined
    special = user_defined[0]
    ids = tok.encode(f"ab{tok.token_text(special)}cd", add_special=False, parse_special=False)
    assert special in ids
    assert tok.decode(ids) == f"ab{tok.token_text(special)}cd"


def test_token_to_piece_and_errors():
    require_models()
    tok = load("ggml-vocab-gpt-2.gguf")
    assert tok.n_vocab == len(tok) == 50257
    hello = tok.token_to_id("\u0120hello")  # GPT-2 byte alphabet: "Ġ" is the space
    assert tok.token_to_piece(hello) == b" hello"
    eot = tok.token_to_id("<|endoftext|>")
    assert tok.token_to_piece(eot) == b"<|endoftext|>"
    assert tok.token_to_piece(eot, special=False) == b""
    assert tok.eos_id == eot and tok.eog_ids == {eot}
    with pytest.raises(IndexError):
        tok.decode([tok.n_vocab])
    with pytest.raises(IndexError):
        tok.token_to_piece(-1)


def test_unsupported_model_files_raise():
    require_models()
    with pytest.raises(ValueError, match="bert"):
        Tokenizer.from_gguf(MODELS_DIR / "ggml-vocab-bert-bge.gguf")
    with pytest.raises(ValueError, match="t5"):
        Tokenizer.from_gguf(MODELS_DIR / "ggml-vocab-nomic-bert-moe.gguf")


def test_tokenize_speed():
    """A ~128-token prompt must tokenize in well under 50 ms, cold caches included (a quadratic
    slip shows here). Best of 3 fresh tokenizers: this VM once stalled one encode for 150 ms (a
    full CI run, where ~2 ms is usual), and a stall does not repeat where a slow algorithm does."""
    require_models()
    prompt = ("You are a helpful assistant. Please summarize the following paragraph in two "
              "sentences, keeping the key facts: The quick brown fox jumps over the lazy dog "
              "near the riverbank at 7:45 pm, while 3 children (aged 5, 8 and 11) watch from "
              "the bridge. Afterwards, they'll write a short story about it and read it aloud "
              "to their classmates on Monday morning. Don't forget: it's due by 2024-05-01!\n\n"
              "Thanks a lot, and have a great day! Привет, 世界.")
    for name in ("ggml-vocab-llama-bpe.gguf", "ggml-vocab-llama-spm.gguf",
                 "ggml-vocab-gemma-4.gguf", "ggml-vocab-deepseek-llm.gguf"):
        elapsed = float("inf")
        for _ in range(3):
            tok = Tokenizer.from_gguf(MODELS_DIR / name)  # fresh: empty word cache
            start = time.perf_counter()
            ids = tok.encode(prompt, parse_special=True)
            elapsed = min(elapsed, time.perf_counter() - start)
        assert 100 <= len(ids) <= 200, (name, len(ids))
        assert elapsed < 0.025, f"{name}: {elapsed * 1e3:.1f} ms for {len(ids)} tokens"


# ---------------------------------------------------------------------------- synthetic GGUF

BYTE_ALPHABET = [chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in range(0xA1, 0xAD)] \
    + [chr(c) for c in range(0xAE, 0x100)]
BYTE_ALPHABET += [chr(0x100 + i) for i in range(256 - len(BYTE_ALPHABET))]


def write_vocab(path: Path, model: str = "gpt2", pre: str | None = "gpt-2",
                chat_template: str | None = None) -> dict[str, int]:
    """A tiny byte-level BPE vocab: 256 byte tokens + merges for "hello" + specials."""
    tokens = list(BYTE_ALPHABET) + ["he", "ll", "hell", "hello", "<|endoftext|>", "<|im_end|>", "<tool>"]
    types = [1] * (len(tokens) - 3) + [3, 1, 4]  # <|im_end|> deliberately NORMAL
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["h e", "l l", "he ll", "hell o"])
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|endoftext|>"))
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {t: i for i, t in enumerate(tokens)}


def test_synthetic_vocab(tmp_path):
    path = tmp_path / "tiny.gguf"
    ids = write_vocab(path, chat_template="{{ messages[0]['content'] }}")
    tok = Tokenizer.from_gguf(path)
    space = ids["\u0120"]  # byte 0x20 in the GPT-2 alphabet
    assert tok.encode("hello") == [ids["hello"]]  # no BOS: gpt2 default add_bos is false
    assert tok.encode(" hello hell") == [space, ids["hello"], space, ids["hell"]]
    assert tok.decode(tok.encode(" hello, world")) == " hello, world"
    # "<|im_end|>" is typed NORMAL but llama.cpp's EOG detection makes it CONTROL + EOG
    assert tok.eog_ids == {ids["<|endoftext|>"], ids["<|im_end|>"]}
    assert tok.eot_id == ids["<|im_end|>"]  # "<|im_end|>" ranks before "<|endoftext|>"
    assert ids["<|im_end|>"] not in tok.encode("x<|im_end|>", parse_special=False)
    assert tok.encode("x<|im_end|>", parse_special=True) == [ids["x"], ids["<|im_end|>"]]
    # user-defined tokens are split out even without parse_special
    assert tok.encode("a<tool>b") == [ids["a"], ids["<tool>"], ids["b"]]
    assert tok.chat_template == "{{ messages[0]['content'] }}"


def test_from_gguf_reader_matches_path(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_vocab(path)
    by_path = Tokenizer.from_gguf(path)
    by_reader = Tokenizer.from_gguf(gguf.GGUFReader(path))
    for text in ("hello world", " hell<tool>o", "<|im_end|>ünïcödé 123"):
        for parse_special in (False, True):
            assert by_reader.encode(text, parse_special=parse_special) == \
                by_path.encode(text, parse_special=parse_special)
    assert by_reader.eog_ids == by_path.eog_ids and by_reader.n_vocab == by_path.n_vocab


def test_unknown_pre_and_model_raise(tmp_path):
    write_vocab(tmp_path / "pre.gguf", pre="no-such-pre")
    with pytest.raises(ValueError, match="no-such-pre"):
        Tokenizer.from_gguf(tmp_path / "pre.gguf")
    write_vocab(tmp_path / "model.gguf", model="rwkv", pre=None)
    with pytest.raises(ValueError, match="rwkv"):
        Tokenizer.from_gguf(tmp_path / "model.gguf")
    with pytest.raises(TypeError):
        Tokenizer.from_gguf(42)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="GGUF"):
        Tokenizer.from_gguf(tmp_path / "junk.gguf")


def test_missing_pre_uses_default(tmp_path):
    ids = write_vocab(tmp_path / "nopre.gguf", pre=None)
    tok = Tokenizer.from_gguf(tmp_path / "nopre.gguf")
    assert tok.pre == ""
    # the "default" pre-tokenizer splits punctuation runs first
    assert tok.encode("hello!") == [ids["hello"], ids["!"]]


# ---------------------------------------------------------------------------- oracle

ORACLE_ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " ", "   ",
    " \t\n\r", "\n\n", "'sStTmMdDrReEvVlL'", "!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~",
    "äöüßéèêçñÅØæœ", "нещонаБългарски", "我想在apple工作天～你好世界", "🦙🚀😶‍🌫️✅",
    "\u0301\u0308", "\u00a0\u3000\u2028\u1680", "\U00011f04\u0cf3", "…。，、।۔،", "\x00\x1c\x7f",
]


def _llama_detokenize(llama_cpp, vocab, ids: list[int], unparse_special: bool) -> bytes:
    import ctypes

    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    size = 16 * len(ids) + 64
    while True:
        out = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(vocab, arr, len(ids), out, size, False, unparse_special)
        if n >= 0:
            return out.raw[:n]
        size = -n  # buffer too small: llama.cpp returns the needed size, negated


def test_matches_llama_cpp_library():
    """Differential test against llama.cpp itself, when the llama_cpp package of the same
    llama.cpp version is importable (e.g. in the project's .venv)."""
    require_models()
    llama_cpp = pytest.importorskip("llama_cpp")
    if getattr(llama_cpp, "__version__", "") != "0.3.36":
        pytest.skip("llama_cpp is not the pinned 0.3.36")
    llama_cpp.llama_backend_init()
    rng = random.Random(1234)
    for path in sorted(MODELS_DIR.glob("ggml-vocab-*.gguf")):
        try:
            tok = Tokenizer.from_gguf(path)
        except ValueError:
            continue
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        vocab = llama_cpp.llama_model_get_vocab(model)
        try:
            eog = {i for i in range(tok.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)}
            assert tok.eog_ids == eog, path.name
            specials = [tok.token_text(i) for i in tok._special_cache[:50]]
            for _ in range(40):
                text = "".join(rng.choice(specials) if specials and rng.random() < 0.1 else
                               "".join(rng.choices(rng.choice(ORACLE_ALPHABETS), k=rng.randint(1, 5)))
                               for _ in range(rng.randint(0, 10)))
                raw = text.encode()
                for add_special in (False, True):
                    for parse_special in (False, True):
                        buf = (llama_cpp.llama_token * (len(raw) + 8))()
                        n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, len(buf),
                                                     add_special, parse_special)
                        expected = list(buf[:n])
                        assert tok.encode(text, add_special, parse_special) == expected, \
                            (path.name, text, add_special, parse_special)
                        detok = _llama_detokenize(llama_cpp, vocab, expected, parse_special)
                        assert tok.decode_bytes(expected, False, parse_special) == detok, \
                            (path.name, expected)
        finally:
            llama_cpp.llama_model_free(model)


def test_numpy_ids_accepted():
    require_models()
    tok = load("ggml-vocab-gpt-2.gguf")
    ids = tok.encode("Hello world")
    assert tok.decode(np.array(ids, dtype=np.int32)) == "Hello world"


def test_encode_rejects_non_unicode_text():
    require_models()
    tok = load("ggml-vocab-gpt-2.gguf")
    with pytest.raises(ValueError, match="not valid Unicode"):
        tok.encode("abc\udc80")
    with pytest.raises(TypeError):
        tok.encode(b"abc")
    assert tok.encode("") == [] and tok.decode([]) == ""
