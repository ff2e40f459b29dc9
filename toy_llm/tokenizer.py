"""GGUF tokenizer: a pure-Python port of llama.cpp's tokenizer (``src/llama-vocab.cpp``).

The goal is token-for-token agreement with ``llama_tokenize`` / ``llama_detokenize`` of the
pinned llama.cpp, so that prompts fed to our engine are identical to what llama.cpp would
produce.  Supported vocabularies:

* ``tokenizer.ggml.model == "gpt2"`` -- byte-level BPE with a per-model pre-tokenizer
  (``tokenizer.ggml.pre``), see ``_PRE_TOKENIZERS`` for the accepted names;
* ``tokenizer.ggml.model == "gemma4"`` -- SentencePiece-style BPE (spaces escaped to U+2581,
  ``<0xXX>`` byte fallback, text only split at newlines);
* ``tokenizer.ggml.model == "llama"`` -- SentencePiece (llama-spm, Gemma 1/2/3, Phi-3, ...):
  bigram merges by score, ``<0xXX>`` byte fallback, ``▁`` space prefix.

WordPiece (bert), Unigram (t5), RWKV and the few pre-tokenizers that llama.cpp implements
with bespoke code (kimi-k2, afmoe, tiny_aya, superbpe, ...) raise ``ValueError``.

Porting notes (things that are easy to get subtly wrong):

* llama.cpp classifies code points with its own Unicode 15.1 table; Python 3.11 ships
  Unicode 14.0, so ``_UNICODE_15_ADDITIONS`` patches in the code points assigned since.
* Pre-tokenizer regexes run either through hand-written splitters (gpt2, llama3, qwen2,
  qwen35, newline split -- ported 1:1 from ``unicode.cpp``, including their quirks) or
  through ``std::regex`` on a "collapsed" text where every non-ASCII code point is
  replaced by one byte per Unicode category.  We reproduce the collapsed representation
  and run Python's ``re`` in ASCII mode, whose semantics match ECMAScript ``std::regex``
  for these patterns (``$`` is translated to ``\\Z``).
* Special tokens are split out of the text before tokenization (``tokenizer_st_partition``);
  user-defined tokens are split even when ``parse_special=False``.  Token attributes are
  patched at load time exactly like llama.cpp (EOG detection marks tokens as CONTROL,
  Phi-3 special tokens get RSTRIP, ...), because these attributes change tokenization.
"""

from __future__ import annotations

import heapq
import re
from array import array
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

__all__ = ["Tokenizer"]

# ---------------------------------------------------------------------------------------
# Token attributes (llama.h: enum llama_token_attr) and GGUF token types
# ---------------------------------------------------------------------------------------

ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_NORMALIZED = 1 << 6
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8
ATTR_SINGLE_WORD = 1 << 9

# tokenizer.ggml.token_type value -> attribute (unknown values map to UNDEFINED)
_TOKEN_TYPE_TO_ATTR = {
    0: ATTR_UNDEFINED,
    1: ATTR_NORMAL,
    2: ATTR_UNKNOWN,
    3: ATTR_CONTROL,
    4: ATTR_USER_DEFINED,
    5: ATTR_UNUSED,
    6: ATTR_BYTE,
}

# the same as a lookup table (index: token type)
_TOKEN_TYPE_ATTR_LUT = np.array([_TOKEN_TYPE_TO_ATTR[t] for t in range(len(_TOKEN_TYPE_TO_ATTR))], dtype=np.int64)

_SPACE_ESCAPE = "\u2581"  # "▁", SentencePiece's visible space
_C_ISSPACE = frozenset(" \t\n\v\f\r")  # C isspace() in the "C" locale

# ---------------------------------------------------------------------------------------
# GGUF metadata
# ---------------------------------------------------------------------------------------

# The keys the tokenizer reads, and the typed accessor of toy_llm.gguf_meta for each (a key of
# another type raises GGUFLoadError naming the file, the key and both types).
_KEY_KINDS: dict[str, str] = {
    "tokenizer.ggml.model": "str", "tokenizer.ggml.pre": "str", "tokenizer.chat_template": "str",
    "general.name": "str", "general.architecture": "str",
    "tokenizer.ggml.tokens": "str_list", "tokenizer.ggml.merges": "str_list",
    "tokenizer.ggml.scores": "array", "tokenizer.ggml.token_type": "array",
    "tokenizer.ggml.add_space_prefix": "bool", "tokenizer.ggml.add_bos_token": "bool",
    "tokenizer.ggml.add_eos_token": "bool",
}


class _MetaView(Mapping):
    """The ``tokenizer.*`` / ``general.*`` keys of an open GGUF metadata source
    (:mod:`toy_llm.gguf_meta`), read on first access only: each array is read once, straight
    into the object the tokenizer keeps."""

    def __init__(self, meta: Any) -> None:
        self._m = meta

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.startswith(("tokenizer.", "general.")) and key in self._m

    def __getitem__(self, key: str) -> Any:
        if key not in self:
            raise KeyError(key)
        kind = _KEY_KINDS.get(key) or ("int" if key.endswith("_token_id") else None)
        return getattr(self._m, "get_" + kind)(key) if kind else self._m[key]

    def __iter__(self):
        return (k for k in self._m.keys() if k.startswith(("tokenizer.", "general.")))

    def __len__(self) -> int:
        return sum(1 for _ in self)


# ---------------------------------------------------------------------------------------
# Unicode code point classification (unicode.cpp / unicode-data.cpp)
# ---------------------------------------------------------------------------------------

F_UNDEFINED = 0x0001
F_NUMBER = 0x0002  # \p{N}
F_LETTER = 0x0004  # \p{L}
F_SEPARATOR = 0x0008  # \p{Z}
F_MARK = 0x0010  # \p{M}
F_PUNCT = 0x0020  # \p{P}
F_SYMBOL = 0x0040  # \p{S}
F_CONTROL = 0x0080  # \p{C}
F_WHITESPACE = 0x0100  # \s as defined by llama.cpp's table

_CATEGORY_FLAGS = {
    "Cn": F_UNDEFINED, "Cc": F_CONTROL, "Cf": F_CONTROL, "Co": F_CONTROL, "Cs": F_CONTROL,
    "Ll": F_LETTER, "Lm": F_LETTER, "Lo": F_LETTER, "Lt": F_LETTER, "Lu": F_LETTER,
    "Mc": F_MARK, "Me": F_MARK, "Mn": F_MARK,
    "Nd": F_NUMBER, "Nl": F_NUMBER, "No": F_NUMBER,
    "Pc": F_PUNCT, "Pd": F_PUNCT, "Pe": F_PUNCT, "Pf": F_PUNCT, "Pi": F_PUNCT,
    "Po": F_PUNCT, "Ps": F_PUNCT,
    "Sc": F_SYMBOL, "Sk": F_SYMBOL, "Sm": F_SYMBOL, "So": F_SYMBOL,
    "Zl": F_SEPARATOR, "Zp": F_SEPARATOR, "Zs": F_SEPARATOR,
}

# llama.cpp's fixed White_Space list (gen-unicode-data.py)
_WHITESPACE_CPTS = frozenset(
    list(range(0x09, 0x0E)) + list(range(0x2000, 0x200B))
    + [0x20, 0x85, 0xA0, 0x1680, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
)

# Code points assigned in Unicode 15.0/15.1 (llama.cpp's table) that Python 3.11's
# unicodedata (Unicode 14.0) still reports as unassigned: (first, last, flag).
_UNICODE_15_ADDITIONS = (
    (0x00CF3, 0x00CF3, 16), (0x00ECE, 0x00ECE, 16), (0x02FFC, 0x02FFF, 64), (0x031EF, 0x031EF, 64),
    (0x10EFD, 0x10EFF, 16), (0x1123F, 0x11240, 4), (0x11241, 0x11241, 16), (0x11B00, 0x11B09, 32),
    (0x11F00, 0x11F01, 16), (0x11F02, 0x11F02, 4), (0x11F03, 0x11F03, 16), (0x11F04, 0x11F10, 4),
    (0x11F12, 0x11F33, 4), (0x11F34, 0x11F3A, 16), (0x11F3E, 0x11F42, 16), (0x11F43, 0x11F4F, 32),
    (0x11F50, 0x11F59, 2), (0x1342F, 0x1342F, 4), (0x13439, 0x1343F, 128), (0x13440, 0x13440, 16),
    (0x13441, 0x13446, 4), (0x13447, 0x13455, 16), (0x1B132, 0x1B132, 4), (0x1B155, 0x1B155, 4),
    (0x1D2C0, 0x1D2D3, 2), (0x1DF25, 0x1DF2A, 4), (0x1E030, 0x1E06D, 4), (0x1E08F, 0x1E08F, 16),
    (0x1E4D0, 0x1E4EB, 4), (0x1E4EC, 0x1E4EF, 16), (0x1E4F0, 0x1E4F9, 2), (0x1F6DC, 0x1F6DC, 64),
    (0x1F774, 0x1F776, 64), (0x1F77B, 0x1F77F, 64), (0x1F7D9, 0x1F7D9, 64), (0x1FA75, 0x1FA77, 64),
    (0x1FA87, 0x1FA88, 64), (0x1FAAD, 0x1FAAF, 64), (0x1FABB, 0x1FABD, 64), (0x1FABF, 0x1FABF, 64),
    (0x1FACE, 0x1FACF, 64), (0x1FADA, 0x1FADB, 64), (0x1FAE8, 0x1FAE8, 64), (0x1FAF7, 0x1FAF8, 64),
    (0x2B739, 0x2B739, 4), (0x2EBF0, 0x2EE5D, 4), (0x31350, 0x323AF, 4),
)

_FLAG_CACHE: dict[str, int] = {}


def _char_flags(ch: str) -> int:
    flags = _FLAG_CACHE.get(ch)
    if flags is None:
        cpt = ord(ch)
        category = unicodedata.category(ch)
        flags = _CATEGORY_FLAGS[category]
        if category == "Cn":
            for first, last, newer in _UNICODE_15_ADDITIONS:
                if first <= cpt <= last:
                    flags = newer
                    break
        if cpt in _WHITESPACE_CPTS:
            flags |= F_WHITESPACE
        _FLAG_CACHE[ch] = flags
    return flags


def _text_flags(text: str) -> list[int]:
    cache = _FLAG_CACHE
    return [cache[c] if c in cache else _char_flags(c) for c in text]


def _gpt2_byte_alphabet() -> list[str]:
    """GPT-2's reversible byte -> printable code point mapping (unicode_byte_to_utf8_map)."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    alphabet = [""] * 256
    for b in keep:
        alphabet[b] = chr(b)
    n = 0
    for b in range(256):
        if not alphabet[b]:
            alphabet[b] = chr(256 + n)
            n += 1
    return alphabet


_BYTE_TO_CHAR = _gpt2_byte_alphabet()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_TO_CHAR)}
# used as text.encode().decode("latin-1").translate(...): latin-1 maps byte b to chr(b)
_LATIN1_TO_BYTE_CHAR = {b: c for b, c in enumerate(_BYTE_TO_CHAR) if chr(b) != c}


def _byte_encode(word: str) -> str:
    return word.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_BYTE_CHAR)


def _raw_byte_str(b: int) -> str:
    """The str our vocab uses for a single raw byte (token texts are decoded with
    surrogateescape, so invalid-UTF-8 bytes >= 0x80 appear as lone surrogates)."""
    return chr(b) if b < 0x80 else chr(0xDC00 + b)


# ---------------------------------------------------------------------------------------
# Pre-tokenizer: regex splitting (unicode.cpp: unicode_regex_split)
# ---------------------------------------------------------------------------------------

# Regexes exactly as in llm_tokenizer_bpe (llama-vocab.cpp).  Hand-written splitters are
# selected by exact string match, as llama.cpp does in unicode_regex_split_custom().
_RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_RE_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_RE_LLAMA3 = (_RE_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_QWEN2 = (_RE_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_QWEN35 = (_RE_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
              r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_NEWLINES = r"[^\n]+|[\n]+"
_RE_BLOOM = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_RE_TEKKEN = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
              r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
              r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_GPT4O = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
             + _RE_CONTRACTIONS + r"?"
             r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
             + _RE_CONTRACTIONS + r"?"
             r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_DEEPSEEK_LLM_LETTERS = (
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293"
    "\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c"
    "\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0"
    "-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-"
    "\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b"
    "\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-"
    "\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113"
    "\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00"
    "-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-"
    "\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-"
    "\U000118df\U0001e900-\U0001e943]+"
)
_RE_DEEPSEEK_LLM_PUNCT = "\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+"
_RE_CJK_HANGUL = "[一-龥ࠀ-一가-\ud7ff]+"
_RE_DEEPSEEK3_MAIN = ("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
                      "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*"
                      "|\\s*[\r\n]+|\\s+(?!\\S)|\\s+")

_PRE_REGEXES: dict[str, list[str]] = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _RE_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "gpt2": [_RE_GPT2],
    "llama3": [_RE_LLAMA3],
    "qwen2": [_RE_QWEN2],
    "qwen35": [_RE_QWEN35],
    "starcoder": [r"\p{N}", _RE_GPT2],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _RE_GPT2, r"[0-9][0-9][0-9]"],
    "deepseek-llm": ["[\r\n]", _RE_DEEPSEEK_LLM_LETTERS, _RE_DEEPSEEK_LLM_PUNCT, r"\s+$",
                     _RE_CJK_HANGUL, r"\p{N}+"],
    "deepseek-coder": ["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _RE_CJK_HANGUL, r"\p{N}"],
    "deepseek-v3": [r"\p{N}{1,3}", "[一-龥\u3040-ゟ゠-ヿ]+", _RE_DEEPSEEK3_MAIN],
    "bloom": [_RE_BLOOM],
    "viking": [_RE_BLOOM, r"\p{N}"],
    "tekken": [_RE_TEKKEN],
    "gpt-4o": [_RE_GPT4O],
    "seed-coder": [_RE_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}"
                   r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "minicpm5": [r"\p{N}{1,3}", _RE_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "newlines": [_RE_NEWLINES],
}


@dataclass(frozen=True)
class _PreSpec:
    """What one ``tokenizer.ggml.pre`` name selects in llama_vocab::impl::load."""

    regexes: str  # key of _PRE_REGEXES
    clean_spaces: bool = True
    ignore_merges: bool = False
    add_bos: bool = False
    no_bos: bool = False  # chatglm: special_bos_id = LLAMA_TOKEN_NULL
    escape_whitespaces: bool = False  # SPM-style BPE (gemma4)
    gemma4: bool = False  # LLAMA_VOCAB_PRE_TYPE_GEMMA4 special cases


def _pre_table() -> dict[str, _PreSpec]:
    table: dict[str, _PreSpec] = {}

    def add(names: Iterable[str], spec: _PreSpec) -> None:
        for name in names:
            table[name] = spec

    add(["default"], _PreSpec("default"))
    add(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
         "lfm2", "jina-v5-nano"], _PreSpec("llama3", ignore_merges=True, add_bos=True))
    add(["dbrx", "smaug-bpe"], _PreSpec("llama3"))
    add(["chatglm-bpe"], _PreSpec("llama3", no_bos=True))
    add(["glm4", "glm5"], _PreSpec("llama3", no_bos=True, ignore_merges=True))
    add(["deepseek-llm"], _PreSpec("deepseek-llm", clean_spaces=False))
    add(["deepseek-coder"], _PreSpec("deepseek-coder", clean_spaces=False))
    add(["deepseek-v3", "hunyuan-dense", "hy_v4", "joyai-llm"],
        _PreSpec("deepseek-v3", clean_spaces=False))
    add(["falcon"], _PreSpec("falcon"))
    add(["starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"],
        _PreSpec("starcoder"))
    add(["command-r", "smollm"], _PreSpec("starcoder", clean_spaces=False))
    add(["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
         "a.x-4.0", "mellum", "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe",
         "exaone4", "mpt", "olmo", "jais"], _PreSpec("gpt2"))
    add(["trillion", "granite-docling"], _PreSpec("gpt2", clean_spaces=False))
    add(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "solar-open", "grok-2"],
        _PreSpec("qwen2", clean_spaces=False))
    add(["stablelm2", "megrez"], _PreSpec("qwen2"))
    add(["qwen35"], _PreSpec("qwen35", clean_spaces=False))
    add(["poro-chat"], _PreSpec("bloom", clean_spaces=False))
    add(["bloom", "gpt3-finnish"], _PreSpec("bloom"))
    add(["viking"], _PreSpec("viking", clean_spaces=False))
    add(["tekken"], _PreSpec("tekken", clean_spaces=False, ignore_merges=True, add_bos=True))
    add(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"],
        _PreSpec("gpt-4o", clean_spaces=False))
    add(["seed-coder"], _PreSpec("seed-coder", clean_spaces=False))
    add(["minicpm5"], _PreSpec("minicpm5", ignore_merges=True))
    add(["gemma4", "granite-embed-multi-311m"], _PreSpec("newlines", escape_whitespaces=True, gemma4=True))
    add(["sarvam-moe"], _PreSpec("newlines", escape_whitespaces=True, clean_spaces=False))
    return table


_PRE_TOKENIZERS = _pre_table()

_Offsets = list  # lengths (in code points) of consecutive pieces of the text


def _split_custom_gpt2(text: str, flags: list[int], offsets: _Offsets) -> _Offsets:
    """unicode_regex_split_custom_gpt2, i.e. _RE_GPT2 followed by a final ``|\\s+``."""
    out: _Offsets = []
    start = 0
    for seg in offsets:
        pos, end = start, start + seg
        start = end
        while pos < end:
            c = text[pos]
            # contractions
            if c == "'" and pos + 1 < end:
                c1 = text[pos + 1]
                if c1 in "stmd":
                    out.append(2)
                    pos += 2
                    continue
                if pos + 2 < end and c1 + text[pos + 2] in ("re", "ve", "ll"):
                    out.append(3)
                    pos += 3
                    continue
            skip = 1 if c == " " else 0
            f2 = (flags[pos + 1] if pos + 1 < end else 0) if skip else flags[pos]
            run_class = 0
            if f2 & F_LETTER:
                run_class = F_LETTER
            elif f2 & F_NUMBER:
                run_class = F_NUMBER
            if run_class:  # ` ?\p{L}+` or ` ?\p{N}+`
                p = pos + skip
                while p < end and flags[p] & run_class:
                    p += 1
                out.append(p - pos)
                pos = p
                continue
            if f2 and not f2 & (F_WHITESPACE | F_LETTER | F_NUMBER):  # ` ?[^\s\p{L}\p{N}]+`
                p = pos + skip
                while p < end and not flags[p] & (F_WHITESPACE | F_LETTER | F_NUMBER):
                    p += 1
                out.append(p - pos)
                pos = p
                continue
            pos = _take_whitespace_run(flags, pos, end, out)
    return out


def _take_whitespace_run(flags: list[int], pos: int, end: int, out: _Offsets) -> int:
    """Shared tail of the gpt2 splitter: `\\s+(?!\\S)|\\s+`, else a single code point."""
    n = 0
    while pos + n < end and flags[pos + n] & F_WHITESPACE:
        n += 1
    if n > 1 and pos + n < end:  # leave the last space to prefix the next word
        n -= 1
    n = max(n, 1)
    out.append(n)
    return pos + n


def _split_custom_llama3_like(text: str, flags: list[int], offsets: _Offsets,
                              max_digits: int, letter_mask: int) -> _Offsets:
    """unicode_regex_split_custom_llama3 / _qwen2 / _qwen35 (they only differ in the
    digit group size and in whether combining marks count as letters)."""
    out: _Offsets = []
    start = 0
    other_mask = F_WHITESPACE | F_NUMBER | letter_mask
    for seg in offsets:
        pos, end = start, start + seg
        start = end
        while pos < end:
            c = text[pos]
            f = flags[pos]
            # (?i:'s|'t|'re|'ve|'m|'ll|'d)
            if c == "'" and pos + 1 < end:
                c1 = text[pos + 1].lower() if text[pos + 1] < "\x80" else text[pos + 1]
                if c1 in "stmd":
                    out.append(2)
                    pos += 2
                    continue
                if pos + 2 < end:
                    c2 = text[pos + 2].lower() if text[pos + 2] < "\x80" else text[pos + 2]
                    if c1 + c2 in ("re", "ve", "ll"):
                        out.append(3)
                        pos += 3
                        continue
            # [^\r\n\p{L}\p{N}]?\p{L}+
            if not (c == "\r" or c == "\n" or f & F_NUMBER):
                if f & letter_mask or (pos + 1 < end and flags[pos + 1] & letter_mask):
                    p = pos + 1
                    while p < end and flags[p] & letter_mask:
                        p += 1
                    out.append(p - pos)
                    pos = p
                    continue
            # \p{N}{1,max_digits}
            if f & F_NUMBER:
                p = pos
                while p < end and flags[p] & F_NUMBER:
                    p += 1
                run = p - pos
                out.extend([max_digits] * (run // max_digits))
                if run % max_digits:
                    out.append(run % max_digits)
                pos = p
                continue
            # ` ?[^\s\p{L}\p{N}]+[\r\n]*`  (llama.cpp tests the flags of `c` itself here,
            # which are never 0 inside the segment, so only f2 matters)
            f2 = (flags[pos + 1] if pos + 1 < end else 0) if c == " " else f
            if not f2 & other_mask:
                p = pos + (1 if c == " " else 0)
                while p < end and not flags[p] & other_mask:
                    p += 1
                while p < end and text[p] in "\r\n":
                    p += 1
                out.append(p - pos)
                pos = p
                continue
            # \s*[\r\n]+ | \s+(?!\S) | \s+
            n = 0
            last_newline_end = 0
            while pos + n < end and flags[pos + n] & F_WHITESPACE:
                if text[pos + n] in "\r\n":
                    last_newline_end = pos + n + 1
                n += 1
            if last_newline_end:
                out.append(last_newline_end - pos)
                pos = last_newline_end
                continue
            if n > 1 and pos + n < end:
                n -= 1
            n = max(n, 1)
            out.append(n)
            pos += n
    return out


def _split_custom_newlines(text: str, flags: list[int], offsets: _Offsets) -> _Offsets:
    """unicode_regex_split_custom_newlines: alternating runs of non-newline / newline."""
    out: _Offsets = []
    start = 0
    for seg in offsets:
        pos, end = start, start + seg
        start = end
        while pos < end:
            is_newline = text[pos] == "\n"
            run_start = pos
            while pos < end and (text[pos] == "\n") == is_newline:
                pos += 1
            out.append(pos - run_start)
    return out


_CUSTOM_SPLITTERS: dict[str, Callable[[str, list[int], _Offsets], _Offsets]] = {
    _RE_GPT2: _split_custom_gpt2,
    _RE_LLAMA3: lambda t, f, o: _split_custom_llama3_like(t, f, o, 3, F_LETTER),
    _RE_QWEN2: lambda t, f, o: _split_custom_llama3_like(t, f, o, 1, F_LETTER),
    _RE_QWEN35: lambda t, f, o: _split_custom_llama3_like(t, f, o, 1, F_LETTER | F_MARK),
    _RE_NEWLINES: _split_custom_newlines,
}

# Collapsed representation used by llama.cpp to feed Unicode categories to std::regex:
# every non-ASCII code point becomes one byte naming its category.
_UCAT_FLAGS = {
    r"\p{N}": F_NUMBER, r"\p{L}": F_LETTER, r"\p{P}": F_PUNCT, r"\p{M}": F_MARK,
    r"\p{S}": F_SYMBOL, r"\p{Lu}": F_LETTER, r"\p{Ll}": F_LETTER, r"\p{Lt}": F_LETTER,
    r"\p{Lm}": F_LETTER, r"\p{Lo}": F_LETTER,
}
_UCAT_CHAR = {F_NUMBER: "\xd1", F_LETTER: "\xd2", F_PUNCT: "\xd3", F_MARK: "\xd4",
              F_SYMBOL: "\xd5"}
# the ASCII members of each category, as std::regex class contents
_UCAT_ASCII = {
    F_NUMBER: "0-9",
    F_LETTER: "A-Za-z",
    F_PUNCT: r"!-#%-*,-/:-;?-@\[-\]_\{\}",
    F_MARK: "",
    F_SYMBOL: r"\$\+<->^`\|\~",
}


def _collapse_text(text: str, flags: list[int]) -> str:
    out = []
    for c, f in zip(text, flags):
        if c < "\x80":
            out.append(c)
        elif f & F_WHITESPACE:
            out.append("\x0b")  # std::regex \s only knows ASCII whitespace
        else:
            out.append(_UCAT_CHAR.get(f & 0xFF, "\xd0"))
    return "".join(out)


def _wide_text(text: str, flags: list[int]) -> str:
    """Text as given to std::wregex: non-ASCII whitespace replaced by \\v."""
    if text.isascii():
        return text
    return "".join("\x0b" if c >= "\x80" and f & F_WHITESPACE else c
                   for c, f in zip(text, flags))


def _uses_unicode_categories(regex: str) -> bool:
    return any(ucat in regex for ucat in _UCAT_FLAGS)


def _collapse_regex(regex: str) -> str:
    """Port of the regex rewriting loop in unicode_regex_split()."""
    out = []
    inside = False
    i = 0
    while i < len(regex):
        ch = regex[i]
        if ch == "[" and (i == 0 or regex[i - 1] != "\\"):
            out.append("[")
            inside = True
            i += 1
            continue
        if inside and ch == "]" and regex[i - 1] != "\\":
            out.append("]")
            inside = False
            i += 1
            continue
        if regex.startswith("\\p{", i):
            close = regex.find("}", i + 3)
            if close != -1 and close <= i + 10 and regex[i:close + 1] in _UCAT_FLAGS:
                flag = _UCAT_FLAGS[regex[i:close + 1]]
                body = _UCAT_CHAR[flag] + _UCAT_ASCII[flag]
                out.append(body if inside else "[" + body + "]")
                i = close + 1
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def _ecmascript_to_python(regex: str) -> str:
    """The few ECMAScript-vs-Python differences that matter for these patterns:
    ECMAScript `$` (non-multiline) only matches at the very end, Python's also before a
    trailing newline."""
    out = []
    inside = False
    escaped = False
    for ch in regex:
        if escaped:
            out.append(ch)
            escaped = False
            continue
        if ch == "\\":
            escaped = True
        elif ch == "[":
            inside = True
        elif ch == "]":
            inside = False
        elif ch == "$" and not inside:
            out.append(r"\Z")
            continue
        out.append(ch)
    return "".join(out)


@dataclass(frozen=True)
class _SplitStep:
    kind: str  # "custom" | "collapsed" | "wide"
    custom: Callable[[str, list[int], _Offsets], _Offsets] | None = None
    pattern: re.Pattern | None = None


def _compile_split_steps(regexes: Sequence[str]) -> list[_SplitStep]:
    steps = []
    for regex in regexes:
        if regex in _CUSTOM_SPLITTERS:
            steps.append(_SplitStep("custom", custom=_CUSTOM_SPLITTERS[regex]))
        elif _uses_unicode_categories(regex):
            # re.ASCII: \s is exactly [ \t\n\v\f\r] like std::regex in the C locale
            pattern = re.compile(_ecmascript_to_python(_collapse_regex(regex)), re.ASCII)
            steps.append(_SplitStep("collapsed", pattern=pattern))
        else:
            steps.append(_SplitStep("wide", pattern=re.compile(_ecmascript_to_python(regex), re.ASCII)))
    return steps


def _split_with_regex(text: str, pattern: re.Pattern, offsets: _Offsets) -> _Offsets:
    """unicode_regex_split_stl: matches and the gaps between them both become pieces."""
    out: _Offsets = []
    start = 0
    for seg in offsets:
        end = start + seg
        last = start
        for m in pattern.finditer(text, start, end):
            m_start, m_end = m.span()
            if m_start > last:
                out.append(m_start - last)
            out.append(m_end - m_start)
            last = m_end
        if last < end:
            out.append(end - last)
        start = end
    return out


def _regex_split(text: str, steps: Sequence[_SplitStep]) -> list[str]:
    flags = _text_flags(text)
    collapsed = wide = None
    offsets: _Offsets = [len(text)]
    for step in steps:
        if step.kind == "custom":
            offsets = step.custom(text, flags, offsets)
        elif step.kind == "wide":
            wide = wide if wide is not None else _wide_text(text, flags)
            offsets = _split_with_regex(wide, step.pattern, offsets)
        else:
            collapsed = collapsed if collapsed is not None else _collapse_text(text, flags)
            offsets = _split_with_regex(collapsed, step.pattern, offsets)
    words = []
    pos = 0
    for n in offsets:
        words.append(text[pos:pos + n])
        pos += n
    return words


# ---------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------

# token texts llama.cpp uses to find end-of-turn / end-of-generation tokens
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
              "<end_of_utterance>")
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
})
_FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                "▁<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                "▁<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                "▁<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
# special token id -> GGUF key (the later deprecated keys override the earlier ones)
_SPECIAL_ID_KEYS = (
    ("bos", "tokenizer.ggml.bos_token_id"),
    ("eos", "tokenizer.ggml.eos_token_id"),
    ("eot", "tokenizer.ggml.eot_token_id"),
    ("eom", "tokenizer.ggml.eom_token_id"),
    ("unk", "tokenizer.ggml.unknown_token_id"),
    ("sep", "tokenizer.ggml.seperator_token_id"),  # sic, llama.cpp's key name
    ("pad", "tokenizer.ggml.padding_token_id"),
    ("mask", "tokenizer.ggml.mask_token_id"),
    ("fim_pre", "tokenizer.ggml.fim_pre_token_id"),
    ("fim_suf", "tokenizer.ggml.fim_suf_token_id"),
    ("fim_mid", "tokenizer.ggml.fim_mid_token_id"),
    ("fim_pad", "tokenizer.ggml.fim_pad_token_id"),
    ("fim_rep", "tokenizer.ggml.fim_rep_token_id"),
    ("fim_sep", "tokenizer.ggml.fim_sep_token_id"),
    ("fim_pre", "tokenizer.ggml.prefix_token_id"),
    ("fim_suf", "tokenizer.ggml.suffix_token_id"),
    ("fim_mid", "tokenizer.ggml.middle_token_id"),
)

_WORD_CACHE_LIMIT = 1 << 16


def _ids_with(attrs: list[int], mask: int) -> list[int]:
    """Ascending ids whose attribute has any bit of ``mask`` (one vectorised pass)."""
    a = np.frombuffer(attrs, dtype=np.int32) if isinstance(attrs, array) else \
        np.fromiter(attrs, dtype=np.int64, count=len(attrs))
    return np.flatnonzero(a & mask).tolist()


def _pair_rank(ranks: dict[str, int], a: str, b: str) -> int | None:
    """The rank of merging symbols a and b, from ranks keyed by merge text. llama.cpp splits a merge
    "x y" at its first space after the first character into the pair (x, y) (no such space: the
    pair ("", "")), so (a, b) is ranked exactly under a + " " + b when a has no space after its
    first character, and not at all when it has one."""
    return None if a.find(" ", 1) >= 0 else ranks.get(a + " " + b)


class Tokenizer:
    """llama.cpp-compatible tokenizer built from GGUF metadata.

    Use :meth:`from_gguf` (path or ``gguf.GGUFReader``) or :meth:`from_metadata`.
    """

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_gguf(cls, path_or_reader: Any) -> "Tokenizer":
        """From a GGUF path (read with ggml's reader, :class:`toy_llm.gguf_meta.GGUFMeta`), an open
        ``GGUFMeta`` (left open) or a ``gguf.GGUFReader``. An unreadable file or a key of the wrong
        type raises :class:`toy_llm.gguf_meta.GGUFLoadError` (a ValueError)."""
        from .gguf_meta import GGUFLoadError, open_meta   # (TypeError for anything else)

        with open_meta(path_or_reader) as meta:
            try:
                return cls(_MetaView(meta), _own_arrays=True)
            except GGUFLoadError:
                raise
            except ValueError as e:   # a vocabulary the file describes wrongly: name the file
                raise GGUFLoadError(f"{meta.path}: {e}") from e

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "Tokenizer":
        """Builds the tokenizer from a ``{gguf_key: value}`` mapping: strings as ``str``,
        string arrays as ``list[str]``, numeric arrays as sequences/numpy arrays."""
        return cls(meta)

    def __init__(self, meta: Mapping[str, Any], *, _own_arrays: bool = False) -> None:
        # _own_arrays: the string lists in meta were read for this tokenizer (from_gguf), so the
        # token list is kept as is instead of copied
        self._own_arrays = _own_arrays
        if meta.get("tokenizer.ggml.model") is None:
            raise ValueError("GGUF has no tokenizer.ggml.model")
        self.model: str = str(meta["tokenizer.ggml.model"])
        self.pre: str = str(meta.get("tokenizer.ggml.pre", "") or "")
        self.chat_template: str | None = meta.get("tokenizer.chat_template")
        self._ids: dict[str, int | None] = {}
        self._configure_type(meta)
        self._load_vocab(meta)
        self._load_special_ids(meta)
        self._detect_special_tokens()
        self._apply_model_specific_attrs(meta)
        # special tokens longest-first so that e.g. "<|im_start|>" wins over "<|im"
        self._special_cache = sorted(
            _ids_with(self._attrs, ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN),
            key=lambda i: (-len(self._texts[i].encode("utf-8", "surrogateescape")), i))
        self._pieces: list[bytes | None] = [None] * len(self._texts)
        self._word_cache: dict[str, list[int]] = {}

    def _configure_type(self, meta: dict[str, Any]) -> None:
        """Tokenizer kind and the flags llama.cpp derives from model + pre names."""
        model = self.model
        self.clean_spaces = False
        self.ignore_merges = False
        self.escape_whitespaces = True
        self.byte_encode = True
        self.add_eos = False
        self._no_bos = False
        self._gemma4 = False
        if model == "llama":
            self._kind = "spm"
            self._ids.update(bos=1, eos=2, unk=0)
            self.add_space_prefix = True
            self.add_bos = True
        elif model in ("gpt2", "gemma4"):
            self._kind = "bpe"
            if model == "gemma4":
                self.pre = "gemma4"  # llama.cpp overrides the pre name for this model type
                self._ids.update(bos=None, eos=None, unk=None)
            else:
                self._ids.update(bos=11, eos=11, unk=None)
            pre = self.pre or "default"  # missing pre: llama.cpp warns and uses "default"
            spec = _PRE_TOKENIZERS.get(pre)
            if spec is None:
                raise ValueError(f"unsupported pre-tokenizer type (tokenizer.ggml.pre): {pre!r}")
            self.add_space_prefix = False
            self.add_bos = spec.add_bos
            self.clean_spaces = spec.clean_spaces
            self.ignore_merges = spec.ignore_merges
            self.escape_whitespaces = spec.escape_whitespaces
            self.byte_encode = not spec.escape_whitespaces
            self._no_bos = spec.no_bos
            self._gemma4 = spec.gemma4
            self._split_steps = _compile_split_steps(_PRE_REGEXES[spec.regexes])
            self._load_merges(meta)
        else:
            raise ValueError(f"unsupported tokenizer model (tokenizer.ggml.model): {model!r}")
        if "tokenizer.ggml.add_space_prefix" in meta:
            self.add_space_prefix = bool(meta["tokenizer.ggml.add_space_prefix"])

    def _load_merges(self, meta: dict[str, Any]) -> None:
        merges = meta.get("tokenizer.ggml.merges")
        if merges is None:
            raise ValueError("BPE tokenizer without tokenizer.ggml.merges")
        # ranked by the merge's own text (no (a, b) tuple per merge: 50k of them were a third of
        # SmolLM2's start-up); _pair_rank reads it as llama.cpp's pairs. emplace() keeps the first
        # rank of a duplicated merge: insert in reverse order.
        n = len(merges)
        self._bpe_ranks = dict(zip(reversed(merges), range(n - 1, -1, -1)))

    def _load_vocab(self, meta: dict[str, Any]) -> None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError("GGUF has no tokenizer.ggml.tokens")
        n = len(tokens)
        # the list read from the file is kept (no copy); a caller's list is copied
        texts = tokens if self._own_arrays and type(tokens) is list else list(tokens)
        if not all(texts):
            for i, t in enumerate(texts):
                if not t:
                    texts[i] = f"[EMPTY_{i}]"
        self._texts = texts
        scores = meta.get("tokenizer.ggml.scores")
        # compact arrays, not lists of Python numbers: 262k-token vocabularies (Gemma) would
        # spend ~10 MiB on float and list objects (README, peak RSS)
        self._scores = array("f", np.asarray(scores, dtype=np.float32)[:n].tobytes()) if scores is not None \
            else array("f", bytes(4 * n))
        if len(self._scores) < n:
            raise ValueError("tokenizer.ggml.scores is shorter than the vocab")
        types = meta.get("tokenizer.ggml.token_type")
        if types is None:
            self._attrs = array("i", [ATTR_NORMAL]) * n
        else:
            t = np.asarray(types)[:n].astype(np.int64)
            if len(t) < n:
                raise ValueError("tokenizer.ggml.token_type is shorter than the vocab")
            known = (t >= 0) & (t < len(_TOKEN_TYPE_ATTR_LUT))
            self._attrs = array("i", np.where(known, _TOKEN_TYPE_ATTR_LUT[np.where(known, t, 0)],
                                              ATTR_UNDEFINED).astype(np.int32).tobytes())
        # later duplicates win, like token_to_id[word] = i in llama.cpp
        self._token_to_id = dict(zip(texts, range(n)))

    def _load_special_ids(self, meta: dict[str, Any]) -> None:
        n = len(self._texts)
        ids = self._ids
        for name in ("bos", "eos", "eot", "eom", "unk", "sep", "pad", "mask",
                     "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep"):
            ids.setdefault(name, None)
        if self._no_bos:
            ids["bos"] = None
        for name, key in _SPECIAL_ID_KEYS:
            if ids[name] is not None and ids[name] >= n:
                ids[name] = None  # default id out of range: disabled
            if key in meta:
                new_id = int(meta[key])
                if 0 <= new_id < n:
                    ids[name] = new_id
        if "tokenizer.ggml.add_bos_token" in meta:
            self.add_bos = bool(meta["tokenizer.ggml.add_bos_token"])
        if "tokenizer.ggml.add_eos_token" in meta:
            self.add_eos = bool(meta["tokenizer.ggml.add_eos_token"])
        if self._gemma4:
            self.add_bos = True  # llama.cpp workaround for Gemma 4

    def _detect_special_tokens(self) -> None:
        """Text-based EOT/FIM/EOG detection of llama_vocab::impl::load, including the
        attribute fix-ups, because they change how the text is partitioned."""
        ids, attrs, texts, to_id = self._ids, self._attrs, self._texts, self._token_to_id
        # (llama.cpp scans its token_to_id map; here the few candidate texts are looked up instead,
        # and only control tokens are scanned for "unused": the same tokens, without a pass over the vocab)
        # llama.cpp takes the first match in unordered_map order, i.e. an unspecified
        # one when a vocab has several candidates; we prefer the order of the list
        # ("<|eot_id|>" over "<|end_of_text|>", "<|im_end|>" over "<|endoftext|>"),
        # which is also what llama.cpp happens to pick for llama3, qwen2 and phi-3.
        detect = [("eot", _EOT_TEXTS), ("eom", ("<|eom_id|>",))] + list(_FIM_TEXTS.items())
        for name, candidates in detect:
            if ids[name] is not None:
                continue
            for text in candidates:
                tid = self._token_to_id.get(text)
                if tid is not None:
                    ids[name] = tid
                    attrs[tid] |= ATTR_CONTROL
                    break
        # control tokens named "...unused..." are unused (each text once: the id token_to_id keeps)
        for tid in _ids_with(attrs, ATTR_CONTROL):
            text = texts[tid]
            if "unused" in text and to_id[text] == tid:
                attrs[tid] |= ATTR_UNUSED

        eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids[k] is not None}
        for text in _EOG_TEXTS:
            tid = to_id.get(text)
            if tid is not None:
                eog.add(tid)
                attrs[tid] |= ATTR_CONTROL
        # gpt-oss: these are always rendered
        for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
            tid = to_id.get(text)
            if tid is not None:
                attrs[tid] = ATTR_USER_DEFINED
        eog.update(ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None)

        eog_texts = {texts[t]: t for t in eog if 0 <= t < len(texts)}
        # o200k_harmony / solar-open: "<|end|>" is not EOG there
        has_call = "<|call|>" in eog_texts or "<|calls|>" in eog_texts
        if "<|end|>" in eog_texts and has_call and ("<|return|>" in eog_texts or "<|flush|>" in eog_texts):
            end_id = eog_texts["<|end|>"]
            eog.discard(end_id)
            attrs[end_id] = ATTR_USER_DEFINED
        # gemma4 / plamo have a normal "</s>"
        if "</s>" in eog_texts and ("<|tool_response>" in eog_texts or "<|plamo:eos|>" in eog_texts):
            s_id = eog_texts["</s>"]
            eog.discard(s_id)
            attrs[s_id] = ATTR_NORMAL
        self._eog = frozenset(eog)

    def _apply_model_specific_attrs(self, meta: dict[str, Any]) -> None:
        """The per-model LSTRIP/RSTRIP attributes llama.cpp sets by name."""
        name = str(meta.get("general.name", "")).lower()
        pre = str(meta.get("tokenizer.ggml.pre", ""))
        arch = str(meta.get("general.architecture", ""))
        attrs, to_id = self._attrs, self._token_to_id

        def set_attr(text: str, flag: int, on: bool) -> None:
            tid = to_id.get(text)
            if tid is not None:
                attrs[tid] = attrs[tid] | flag if on else attrs[tid] & ~flag

        if (any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code"))
                or any(s in arch for s in ("nomic-bert-moe", "jina-bert-v3"))):
            set_attr("<mask>", ATTR_LSTRIP, True)
        elif "phi-3" in name or "phi3" in name:
            for tid, a in enumerate(attrs):
                if a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN):
                    attrs[tid] = a | ATTR_RSTRIP
            set_attr("</s>", ATTR_RSTRIP, True)
            for text in ("<unk>", "<s>", "<|endoftext|>"):
                set_attr(text, ATTR_RSTRIP, False)
        elif "modern-bert" in name:
            set_attr("[MASK]", ATTR_LSTRIP, True)

    # ----------------------------------------------------------------- properties

    @property
    def n_vocab(self) -> int:
        return len(self._texts)

    @property
    def bos_id(self) -> int | None:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int | None:
        return self._ids["eos"]

    @property
    def eot_id(self) -> int | None:
        return self._ids["eot"]

    @property
    def unk_id(self) -> int | None:
        return self._ids["unk"]

    @property
    def pad_id(self) -> int | None:
        return self._ids["pad"]

    @property
    def eog_ids(self) -> frozenset[int]:
        """Tokens that end generation (llama_vocab_is_eog)."""
        return self._eog

    def is_eog(self, token_id: int) -> bool:
        return token_id in self._eog

    def same_vocabulary(self, other: "Tokenizer") -> bool:
        """Whether ``other`` has the same token texts under the same ids (a draft model's check)."""
        return self._texts == other._texts

    def token_text(self, token_id: int) -> str:
        """The raw vocab entry (e.g. "Ġhello", "▁world", "<0x0A>")."""
        return self._texts[self._check_id(token_id)]

    def token_attr(self, token_id: int) -> int:
        return self._attrs[self._check_id(token_id)]

    def token_score(self, token_id: int) -> float:
        return self._scores[self._check_id(token_id)]

    def token_to_id(self, text: str) -> int | None:
        return self._token_to_id.get(text)

    def __len__(self) -> int:
        return self.n_vocab

    def __repr__(self) -> str:
        return f"Tokenizer(model={self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab})"

    # ----------------------------------------------------------------- encoding

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Same ids as llama.cpp's ``llama_tokenize(vocab, text, add_special, parse_special)``
        applied to ``text.encode("utf-8")``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                # lone surrogates have no UTF-8 form that llama.cpp could be given
                raise ValueError(f"text is not valid Unicode: {e}") from None
        fragments = self._partition(text, parse_special) if text else []
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self._required_id("bos"))
        if self._kind == "spm":
            self._encode_spm_fragments(text, fragments, out)
        else:
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    continue
                piece = text[frag[0]:frag[1]]
                if self.escape_whitespaces:
                    piece = piece.replace(" ", _SPACE_ESCAPE)
                self._encode_bpe(piece, out)
        if add_special and self.add_eos:
            out.append(self._required_id("eos"))
        return out

    def _required_id(self, name: str) -> int:
        tid = self._ids[name]
        if tid is None:
            raise ValueError(f"the vocab asks for a {name.upper()} token but does not define one")
        return tid

    def _partition(self, text: str, parse_special: bool) -> list:
        """tokenizer_st_partition: split out special tokens; returns a list whose items are
        either token ids or (start, end) spans of raw text."""
        fragments: list = [(0, len(text))]
        attrs, texts = self._attrs, self._texts
        for tid in self._special_cache:
            attr = attrs[tid]
            if not parse_special and attr & (ATTR_CONTROL | ATTR_UNKNOWN):
                continue  # user-defined tokens are split out even without parse_special
            special = texts[tid]
            if special not in text:
                continue  # cheap pre-check: most special tokens do not occur at all
            fragments = [piece for frag in fragments
                         for piece in self._split_fragment(text, frag, tid, special, attr)]
        return fragments

    @staticmethod
    def _split_fragment(text: str, frag: Any, tid: int, special: str, attr: int) -> list:
        if isinstance(frag, int):
            return [frag]
        start, end = frag
        pieces: list = []
        while True:
            match = text.find(special, start, end)
            if match < 0:
                if start < end:
                    pieces.append((start, end))
                return pieces
            left_end = match
            if attr & ATTR_LSTRIP:
                while left_end > start and text[left_end - 1] in _C_ISSPACE:
                    left_end -= 1
            if left_end > start:
                pieces.append((start, left_end))
            pieces.append(tid)
            start = match + len(special)
            if attr & ATTR_RSTRIP:
                while start < end and text[start] in _C_ISSPACE:
                    start += 1

    # --- SentencePiece (llm_tokenizer_spm_session) ---

    def _encode_spm_fragments(self, text: str, fragments: list, out: list[int]) -> None:
        is_prev_special = True  # the first fragment gets the space prefix too
        for frag in fragments:
            if isinstance(frag, int):
                out.append(frag)
                is_prev_special = True
                continue
            piece = text[frag[0]:frag[1]]
            if self.add_space_prefix and is_prev_special:
                piece = " " + piece
            self._encode_spm(piece.replace(" ", _SPACE_ESCAPE), out)
            is_prev_special = False

    def _encode_spm(self, text: str, out: list[int]) -> None:
        """Greedy bigram merging by token score (highest first, leftmost on ties)."""
        n = len(text)
        if n == 0:
            return
        syms = list(text)  # one symbol per code point; "" once merged away
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        to_id, scores = self._token_to_id, self._scores

        def bigram(left: int, right: int) -> tuple | None:
            # only pairs that form a vocab token are candidates; best score pops first
            merged = syms[left] + syms[right]
            tid = to_id.get(merged)
            return None if tid is None else (-scores[tid], left, right, len(merged))

        heap = [b for b in (bigram(i - 1, i) for i in range(1, n)) if b is not None]
        heapq.heapify(heap)

        def push(left: int, right: int) -> None:
            if left >= 0 and right >= 0:
                item = bigram(left, right)
                if item is not None:
                    heapq.heappush(heap, item)

        while heap:
            _, left, right, size = heapq.heappop(heap)
            ls, rs = syms[left], syms[right]
            if not ls or not rs or len(ls) + len(rs) != size:
                continue  # stale: one side was merged since
            syms[left] = ls + rs
            syms[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])

        i = 0
        while i != -1:
            self._spm_resegment(syms[i], out)
            i = nxt[i]

    def _spm_resegment(self, sym: str, out: list[int]) -> None:
        tid = self._token_to_id.get(sym)
        if tid is not None:
            out.append(tid)
            return
        # merged symbols are always tokens, so this is a single unknown code point:
        # emit its UTF-8 bytes as byte tokens
        for b in sym.encode("utf-8", "surrogateescape"):
            out.append(self._spm_byte_token(b))

    def _spm_byte_token(self, b: int) -> int:
        tid = self._token_to_id.get(f"<0x{b:02X}>")
        if tid is None:
            tid = self._token_to_id.get(_raw_byte_str(b))
        if tid is None:
            raise ValueError(f"vocab has no byte token for 0x{b:02X}")
        return tid

    # --- BPE (llm_tokenizer_bpe_session) ---

    def _encode_bpe(self, text: str, out: list[int]) -> None:
        cache = self._word_cache
        for word in _regex_split(text, self._split_steps):
            if self.byte_encode:
                word = _byte_encode(word)
            ids = cache.get(word)
            if ids is None:
                ids = self._bpe_word(word)
                if len(cache) >= _WORD_CACHE_LIMIT:
                    cache.clear()
                cache[word] = ids
            out.extend(ids)

    def _bpe_word(self, word: str) -> list[int]:
        to_id = self._token_to_id
        if not word:
            return []
        if self.ignore_merges and word in to_id:
            return [to_id[word]]
        if self._gemma4 and not word.strip("\n") and word in to_id:
            return [to_id[word]]  # gemma4 keeps runs of newlines whole
        ids = []
        for part in self._bpe_merge(word):
            tid = to_id.get(part)
            if tid is not None:
                ids.append(tid)
                continue
            for b in part.encode("utf-8", "surrogateescape"):  # byte fallback, if any
                key = _raw_byte_str(b) if self.byte_encode else f"<0x{b:02X}>"
                tid = to_id.get(key)
                if tid is not None:
                    ids.append(tid)
        return ids

    def _bpe_merge(self, word: str) -> list[str]:
        """Applies merges lowest rank first (leftmost on ties) until none applies."""
        n = len(word)
        if n == 1:
            return [word]
        ranks = self._bpe_ranks
        syms = list(word)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            rank = _pair_rank(ranks, syms[i], syms[i + 1])
            if rank is not None:
                heap.append((rank, i, i + 1, syms[i] + syms[i + 1]))
        heapq.heapify(heap)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            ls, rs = syms[left], syms[right]
            if not ls or not rs or ls + rs != merged:
                continue  # stale entry
            syms[left] = merged
            syms[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            p, q = prv[left], nxt[left]
            if p >= 0:
                rank = _pair_rank(ranks, syms[p], merged)
                if rank is not None:
                    heapq.heappush(heap, (rank, p, left, syms[p] + merged))
            if q >= 0:
                rank = _pair_rank(ranks, merged, syms[q])
                if rank is not None:
                    heapq.heappush(heap, (rank, left, q, merged + syms[q]))
        return [s for s in syms if s]

    # ----------------------------------------------------------------- decoding

    def _check_id(self, token_id: int) -> int:
        if not 0 <= token_id < len(self._texts):
            raise IndexError(f"token id {token_id} out of range [0, {len(self._texts)})")
        return token_id

    def _piece(self, token_id: int) -> bytes:
        """token_to_piece with special=true, cached like llama.cpp's cache_token_to_piece."""
        piece = self._pieces[token_id]
        if piece is None:
            piece = self._compute_piece(token_id)
            self._pieces[token_id] = piece
        return piece

    def _compute_piece(self, token_id: int) -> bytes:
        attr, text = self._attrs[token_id], self._texts[token_id]
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED):
            return text.encode("utf-8", "surrogateescape")
        if attr & ATTR_NORMAL:
            if self._kind == "spm" or self.escape_whitespaces:
                return text.replace(_SPACE_ESCAPE, " ").encode("utf-8", "surrogateescape")
            return _decode_byte_level(text)
        if attr & ATTR_BYTE:
            return bytes([int(text[3:5], 16)])
        return b""  # unused / undefined tokens render as nothing

    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        """Bytes of one token (``llama_token_to_piece``); with ``special=False`` control
        and unknown tokens render as b""."""
        self._check_id(token_id)
        if not special and self._attrs[token_id] & (ATTR_UNKNOWN | ATTR_CONTROL):
            return b""
        return self._piece(token_id)

    def decode_bytes(self, ids: Iterable[int], remove_special: bool = False,
                     unparse_special: bool = False) -> bytes:
        """``llama_detokenize`` returning raw bytes (a token may end mid-UTF-8 sequence)."""
        ids = [int(i) for i in ids]
        remove_space = self.add_space_prefix
        if remove_special and self.add_bos and ids and ids[0] == self._ids["bos"]:
            remove_space = False
            ids = ids[1:]
        if remove_special and self.add_eos and ids and ids[-1] == self._ids["eos"]:
            ids = ids[:-1]
        buf = bytearray()
        for tid in ids:
            piece = self.token_to_piece(tid, special=unparse_special)
            if remove_space and piece.startswith(b" "):
                piece = piece[1:]  # the space SentencePiece prefixed to the text
            remove_space = False
            buf += piece
        if self.clean_spaces:
            _clean_up_spaces(buf)
        return bytes(buf)

    def decode(self, ids: Iterable[int], remove_special: bool = False,
               unparse_special: bool = False) -> str:
        """``llama_detokenize``; invalid UTF-8 (partial characters) becomes U+FFFD."""
        return self.decode_bytes(ids, remove_special, unparse_special).decode("utf-8", "replace")


def _decode_byte_level(text: str) -> bytes:
    """llama_decode_text: GPT-2 byte alphabet back to bytes."""
    out = bytearray()
    for c in text:
        b = _CHAR_TO_BYTE.get(c)
        if b is not None:
            out.append(b)
            continue
        # llama.cpp's marker for code points outside the byte alphabet
        if "\ud800" <= c <= "\udfff":
            c = "\ufffd"  # invalid UTF-8 in the token text
        out += b"[UNK_BYTE_0x" + c.encode("utf-8").hex().encode() \
            + text.encode("utf-8", "surrogateescape") + b"]"
    return bytes(out)


def _clean_up_spaces(text: bytearray) -> None:
    """The three in-place passes of llama_vocab::impl::detokenize (clean_spaces)."""
    SPACE, APOS = 0x20, 0x27
    # pass 1: " ?", " !", " .", " ," -> drop the space
    n = len(text)
    total = 1 if n else 0
    for i in range(1, n):
        x = text[i]
        if text[i - 1] == SPACE and x in b"?!.,":
            total -= 1
        text[total] = x
        total += 1
    # pass 2: " ' " -> "'"
    n, total = total, 1 if total else 0
    i = 1
    while i < n:
        x = text[i]
        if x == APOS and i + 1 < n and text[i - 1] == SPACE and text[i + 1] == SPACE:
            total -= 1
            i += 1
            text[i] = 0
        text[total] = x
        total += 1
        i += 1
    # pass 3: " 's", " 'm", " 're", " 've" -> drop the space
    n, total = total, 1 if total else 0
    for i in range(1, n):
        x = text[i]
        if text[i - 1] == SPACE and x == APOS and i + 1 < n:
            x1 = text[i + 1]
            if x1 in b"sm":
                total -= 1
            elif x1 not in b"td" and i + 2 < n:
                x2 = text[i + 2]
                if (x1, x2) in ((ord("r"), ord("e")), (ord("v"), ord("e"))):
                    total -= 1
        text[total] = x
        total += 1
    del text[total:]
