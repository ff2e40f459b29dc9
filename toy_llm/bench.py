"""The bench table: toy_llm (fused and per-head graphs) against llama-cpp-python, one run.

    python -m toy_llm bench [-m MODEL] [-t THREADS] [--rounds 3] [--rows ...] [--graphs ...] [--markdown]

Every measurement runs in a fresh worker process (``python -m toy_llm.bench --worker``, its spec as
JSON on stdin, its result as one JSON line on stdout): one process per (round, measurement, engine),
so no engine inherits another's page cache state, threads or heap, and start-up and peak RSS are a
new process's by construction. Rounds are interleaved (round 1 runs every measurement of every
engine, then round 2, ...; the engine order rotates each round) and each cell is the median of the
rounds. The parent tokenizes every workload once (toy_llm's tokenizer) and hands both engines the
same token ids; only the start-up worker tokenizes, since that is part of what it times.

This module imports only the standard library at the top: the start-up worker's clock starts
before the parent spawns it, so whatever the worker entry imports is counted, for both engines.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

ENGINES = ("fused", "per_head", "llama_cpp")
ENGINE_LABEL = {"fused": "toy_llm fused", "per_head": "toy_llm per_head", "llama_cpp": "llama-cpp-python"}
# measurement groups: one worker per (round, group, engine); a group gives one or more rows
GROUPS = ("startup", "prefill", "deep", "parallel", "speculative", "rss")
ROW_CHOICES = GROUPS
# the per-head graph evaluates one position per graph (~half speed): left out where that makes a row slow
PER_HEAD_GROUPS = ("startup", "prefill", "rss")

STARTUP_PROMPT = "The capital of France is"
PARALLEL_PROMPTS = (
    "The history of the printing press begins in",
    "In the early morning the fishermen of the village",
    "The most important thing to know about volcanoes is that",
    "When the first railways were built across the country,",
    "A good recipe for bread starts with flour, water and",
    "The old lighthouse keeper climbed the stairs and",
    "Scientists studying the migration of birds have found that",
    "The city council met on Tuesday to discuss the new",
)
WORKER_TIMEOUT_S = 900


@dataclass(frozen=True)
class Sizes:
    """Token counts of the workloads (the defaults are issue 10's; ``quick()`` a smoke test's)."""
    prefill: int = 512          # row 2: prompt tokens prefilled in one timed eval
    decode: int = 128           # row 3: greedy tokens decoded right after it
    deep_pos: int = 1500        # row 4: untimed prefill, then
    deep_decode: int = 64       #        this many timed decode steps
    parallel_tokens: int = 64   # row 5: new tokens per sequence, 8 sequences
    spec_tokens: int = 128      # row 6: most new tokens of the input-grounded task
    rss_ctx: int = 8192         # row 7: max_T = n_ctx of the peak-RSS process
    startup_ctx: int = 2048     # row 1: max_T = n_ctx of the start-up process

    @staticmethod
    def quick() -> "Sizes":
        return Sizes(prefill=64, decode=16, deep_pos=128, deep_decode=8, parallel_tokens=16, spec_tokens=32,
                     rss_ctx=2048, startup_ctx=512)


# ----------------------------------------------------------------------------------------- worker side

def _toy_load(spec: dict, max_t: int, **kw):
    import toy_llm

    opts = dict(max_T=max_t, n_threads=spec["threads"], kv_type=spec["kv_type"], graph=spec["graph"],
                threadpool=spec.get("threadpool", False), tiles=spec.get("tiles", True))
    opts.update(kw)
    return toy_llm.load(spec["model"], **opts)


def _llama(spec: dict, n_ctx: int, kv_type: str | None = None, **kw):
    import llama_cpp

    kv_type = kv_type or spec["kv_type"]
    kv = {"f32": 0, "f16": 1, "q8_0": 8}[kv_type]
    return llama_cpp.Llama(spec["model"], n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=spec["threads"],
                           n_threads_batch=spec["threads"], type_k=kv, type_v=kv, flash_attn=kv_type == "q8_0",
                           verbose=False, **kw)


def _llama_eval_last(llm):
    import numpy as np

    def eval_last(toks):
        llm.eval(toks)   # without logits_all llama-cpp-python keeps no logits; the context has the last row
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    return eval_last


def _warm_up(eval_last, ids, reset) -> None:
    """One small eval before timing, then back to position 0: the timed part then measures
    steady-state kernels, not the first touch of every weight page (both engines alike)."""
    eval_last(ids[:8])
    reset()


def _time_prompt_and_decode(eval_last, ids, n):
    from .cli import _time_prompt_and_decode as timed

    return timed(eval_last, ids, n)


def _greedy_llama(llm, ids, n, eog):
    """llama-cpp-python's generate loop, greedy, stopping at an end-of-generation token or n tokens
    (as cli._bench_speculative does); returns the generated ids and the seconds to the first token
    (the prompt's eval and the first sample)."""
    out, first_s = [], 0.0
    if n <= 0:
        return out, first_s
    t = time.perf_counter()
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if not out:
            first_s = time.perf_counter() - t
        if tok in eog:
            break
        out.append(tok)
        if len(out) == n:
            break
    return out, first_s


def worker(spec: dict) -> dict:
    """Run one measurement of one engine in this process; the result as a JSON-able dict."""
    group, engine = spec["group"], spec["engine"]
    toy = engine != "llama_cpp"
    if toy:
        spec = dict(spec, graph=engine)
    sz = Sizes(**spec["sizes"])
    if group == "startup":
        if toy:
            m = _toy_load(spec, sz.startup_ctx)
            logits = m.eval(m.tokenize(STARTUP_PROMPT), all_logits=False)
            tok = int(logits[-1].argmax())
        else:
            llm = _llama(spec, sz.startup_ctx)
            ids = llm.tokenize(STARTUP_PROMPT.encode())
            tok = int(_llama_eval_last(llm)(ids).argmax())
        return {"t_first": time.time(), "token": tok}
    if group == "rss":
        import resource

        kv = spec["rss_kv"]   # f32 or q8_0 (q8_0 turns flash attention on, on both sides)
        if toy:
            m = _toy_load(dict(spec, kv_type=kv), sz.rss_ctx)
            tok = int(m.eval(m.tokenize(STARTUP_PROMPT), all_logits=False)[-1].argmax())
        else:
            llm = _llama(spec, sz.rss_ctx, kv_type=kv)
            tok = int(_llama_eval_last(llm)(llm.tokenize(STARTUP_PROMPT.encode())).argmax())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux, bytes on macOS
        return {"rss_mib": rss / (2**20 if sys.platform == "darwin" else 1024.0), "token": tok}
    if group in ("prefill", "deep"):
        ids = spec["ids"]
        n_prompt, n_dec = (sz.prefill, sz.decode) if group == "prefill" else (sz.deep_pos, sz.deep_decode)
        ids = ids[:n_prompt]
        ctx = n_prompt + n_dec + 16
        if toy:
            m = _toy_load(spec, ctx)
            eval_last = lambda toks: m.eval(toks, all_logits=False)[-1]   # noqa: E731
            reset = m.reset
        else:
            llm = _llama(spec, ctx)
            eval_last, reset = _llama_eval_last(llm), llm.reset
        _warm_up(eval_last, ids, reset)
        tp, td = _time_prompt_and_decode(eval_last, ids, n_dec)
        return {"prompt_tokens": len(ids), "prompt_s": tp, "decode_tokens": n_dec, "decode_s": td}
    if group == "parallel":
        prompts, n = spec["parallel_ids"], sz.parallel_tokens
        ctx = max(len(p) for p in prompts) + n + 16
        if toy:
            m = _toy_load(spec, ctx, n_seq=len(prompts))
            _warm_up(lambda toks: m.eval(toks, all_logits=False), prompts[0], m.reset)
            t = time.perf_counter()
            texts = m.generate([list(p) for p in prompts], max_new_tokens=n)
            dt = time.perf_counter() - t
            st = m.last_stats
            return {"gen_tokens": st["gen_tokens"], "seconds": dt, "decode_steps": st.get("decode_steps"),
                    "sequences": st.get("sequences"), "texts": texts}
        llm = _llama(spec, ctx)
        _warm_up(_llama_eval_last(llm), prompts[0], llm.reset)
        eog = set(spec["eog"])
        t = time.perf_counter()
        outs = [_greedy_llama(llm, list(p), n, eog)[0] for p in prompts]
        dt = time.perf_counter() - t
        texts = [llm.detokenize(o).decode("utf-8", errors="replace") for o in outs]
        return {"gen_tokens": sum(len(o) for o in outs), "seconds": dt, "per_seq": [len(o) for o in outs],
                "texts": texts}
    if group == "speculative":
        ids, n = spec["spec_ids"], sz.spec_tokens
        ctx = len(ids) + n + 16
        res = {}
        if toy:
            m = _toy_load(spec, ctx)
            _warm_up(lambda toks: m.eval(toks, all_logits=False), ids, m.reset)
            for label, how in (("plain", None), ("lookup", "prompt_lookup")):
                t = time.perf_counter()
                m.generate(ids, max_new_tokens=n, speculative=how, draft_max=10)
                dt = time.perf_counter() - t
                st = m.last_stats
                res[label] = {"gen_tokens": st["gen_tokens"], "seconds": dt, "first_s": st["prompt_s"],
                              "accepted": st.get("accepted", 0), "drafted": st.get("drafted", 0)}
            return res
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        class CountingDraft(LlamaPromptLookupDecoding):
            """Counts the draft calls and drafted tokens (llama-cpp-python reports neither)."""
            calls = drafted = 0

            def __call__(self, input_ids, *a, **kw):
                d = super().__call__(input_ids, *a, **kw)
                self.calls += 1
                self.drafted += len(d)
                return d

        eog = set(spec["eog"])
        for label in ("plain", "lookup"):
            draft = CountingDraft(num_pred_tokens=10) if label == "lookup" else None
            llm = _llama(spec, ctx, draft_model=draft)
            _warm_up(_llama_eval_last(llm), ids, llm.reset)
            t = time.perf_counter()
            out, first_s = _greedy_llama(llm, list(ids), n, eog)
            dt = time.perf_counter() - t
            r = {"gen_tokens": len(out), "seconds": dt, "first_s": first_s, "accepted": 0, "drafted": 0}
            if draft is not None:
                # every draft call is followed by one verify batch giving accepted + 1 tokens; the
                # first token comes from the prompt's batch
                r.update(drafted=draft.drafted, accepted=max(0, len(out) - 1 - draft.calls))
            res[label] = r
            llm.close()
        return res
    raise ValueError(f"unknown measurement group {group!r}; expected one of {GROUPS}")


def _worker_main() -> None:
    spec = json.loads(sys.stdin.read())
    res = worker(spec)
    sys.stdout.write("BENCH_JSON " + json.dumps(res) + "\n")
    sys.stdout.flush()
    os._exit(0)   # no teardown in the timing's shadow (both engines alike)


# ----------------------------------------------------------------------------------------- parent side

@dataclass
class Row:
    key: str
    label: str
    lower_is_better: bool = False


ROWS = (
    Row("startup", "start-up to first token (s)", True),
    Row("prefill", "prefill {prefill} tokens (tok/s)"),
    Row("decode", "decode {decode} tokens after it (tok/s)"),
    Row("deep", "decode {deep_decode} tokens at position {deep_pos} (tok/s)"),
    Row("parallel", "8 parallel greedy generations x {parallel_tokens} tokens (aggregate tok/s)"),
    Row("spec_plain", "input-grounded task, plain greedy (tok/s)"),
    Row("spec_lookup", "input-grounded task, prompt lookup (tok/s)"),
    Row("spec_plain_gen", "input-grounded task after the first token, plain greedy (tok/s)"),
    Row("spec_lookup_gen", "input-grounded task after the first token, prompt lookup (tok/s)"),
    Row("rss_f32", "peak RSS, max_T {rss_ctx}, KV F32 (MiB)", True),
    Row("rss_q8_0", "peak RSS, max_T {rss_ctx}, KV Q8_0 (MiB)", True),
)
GROUP_ROWS = {"startup": ("startup",), "prefill": ("prefill", "decode"), "deep": ("deep",),
              "parallel": ("parallel",),
              "speculative": ("spec_plain", "spec_lookup", "spec_plain_gen", "spec_lookup_gen"),
              "rss": ("rss_f32", "rss_q8_0")}


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return None if not n else (xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2]))


def _spawn(spec: dict, python: str) -> tuple[dict | None, float, str]:
    """Run one worker; (result or None, the parent's time.time() just before spawning, error text)."""
    cmd = [python, "-m", "toy_llm.bench", "--worker"]
    t_spawn = time.time()
    try:
        p = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, t_spawn, f"timed out after {WORKER_TIMEOUT_S} s"
    for line in p.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):]), t_spawn, ""
    err = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}, no output"])[-1]
    return None, t_spawn, err


def _values(group: str, spec: dict, res: dict, t_spawn: float) -> dict[str, float]:
    """The row values one worker result gives."""
    if group == "startup":
        return {"startup": res["t_first"] - t_spawn}
    if group == "prefill":
        return {"prefill": res["prompt_tokens"] / res["prompt_s"], "decode": res["decode_tokens"] / res["decode_s"]}
    if group == "deep":
        return {"deep": res["decode_tokens"] / res["decode_s"]}
    if group == "parallel":
        return {"parallel": res["gen_tokens"] / res["seconds"]}
    if group == "speculative":   # and, for the notes, the rate after the first token (no prompt)
        out = {f"spec_{k}": v["gen_tokens"] / v["seconds"] for k, v in res.items()}
        out.update({f"spec_{k}_gen": (v["gen_tokens"] - 1) / (v["seconds"] - v["first_s"])
                    for k, v in res.items() if v["gen_tokens"] > 1 and v["seconds"] > v["first_s"]})
        return out
    if group == "rss":
        return {f"rss_{spec['rss_kv']}": res["rss_mib"]}
    raise ValueError(group)


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        import platform

        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores"


def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def _llama_cpp_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("llama_cpp_python")
    except Exception:  # noqa: BLE001 - not installed, or metadata missing: llama_cpp may still import
        try:
            import llama_cpp

            return llama_cpp.__version__
        except ImportError:
            return None


def _workloads(model: str, sizes: Sizes) -> dict:
    """Token ids of every workload, from toy_llm's tokenizer (both engines get the same ids)."""
    import toy_llm
    from .cli import BENCH_PROMPT, SPEC_PASSAGE

    m = toy_llm.load(model, max_T=16, n_threads=1)
    try:
        text_ids = m.tokenize(BENCH_PROMPT)
        n_long = max(sizes.prefill, sizes.deep_pos)
        base = m.tokenize(BENCH_PROMPT, add_bos=False)
        while len(text_ids) < n_long:
            text_ids += base
        task = "Repeat this text exactly:\n" + SPEC_PASSAGE
        if m.tokenizer.chat_template:
            spec_ids = m.tokenize(m.apply_chat_template([{"role": "user", "content": task}]), add_bos=False,
                                  special=True)
        else:   # a GGUF without a chat template (the synthetic models): the task as plain text
            spec_ids = m.tokenize(task + "\n\n" + SPEC_PASSAGE[:40])
        return {"ids": text_ids[:n_long], "parallel_ids": [m.tokenize(p) for p in PARALLEL_PROMPTS],
                "spec_ids": spec_ids, "eog": sorted(int(t) for t in m.tokenizer.eog_ids),
                "parallel_prompts": list(PARALLEL_PROMPTS)}
    finally:
        m.close()


def run_table(model: str, threads: int, rounds: int = 3, groups=GROUPS, graphs=("fused", "per_head"),
              kv_type: str = "f16", sizes: Sizes = Sizes(), threadpool: bool = False, python: str | None = None,
              progress=None, tiles: bool = True) -> dict:
    """Run the bench; returns {"header": [(key, value)], "rows": [Row], "cells": {row: {engine: median}},
    "runs": {(row, engine): [values]}, "results": {(group, engine): [worker dicts]}, "errors": [...],
    "engines": [...], "sizes": Sizes, "rounds": n}. ``progress(str)`` is told of every worker."""
    python = python or sys.executable
    lv = _llama_cpp_version()
    engines = [e for e in ("fused", "per_head") if e in graphs] + (["llama_cpp"] if lv else [])
    model = os.path.abspath(model)
    work = _workloads(model, sizes)
    base = {"model": model, "threads": threads, "kv_type": kv_type, "threadpool": threadpool, "tiles": tiles,
            "sizes": asdict(sizes), "eog": work["eog"]}
    runs: dict = {}
    results: dict = {}
    errors: list = []
    t_all = time.time()
    for r in range(rounds):
        for group in groups:
            order = engines[r % len(engines):] + engines[:r % len(engines)]   # rotate: no engine always first
            for engine in order:
                if engine == "per_head" and group not in PER_HEAD_GROUPS:
                    continue
                for rss_kv in (("f32", "q8_0") if group == "rss" else (None,)):
                    spec = dict(base, group=group, engine=engine, rss_kv=rss_kv)
                    if group in ("prefill", "deep"):
                        spec["ids"] = work["ids"]
                    elif group == "parallel":
                        spec["parallel_ids"] = work["parallel_ids"]
                    elif group == "speculative":
                        spec["spec_ids"] = work["spec_ids"]
                    t = time.time()
                    res, t_spawn, err = _spawn(spec, python)
                    what = f"round {r + 1}/{rounds} {group}{'/' + rss_kv if rss_kv else ''} {ENGINE_LABEL[engine]}"
                    if res is None:
                        errors.append(f"{what}: {err}")
                    else:
                        results.setdefault((group, engine), []).append(res)
                        for key, v in _values(group, spec, res, t_spawn).items():
                            runs.setdefault((key, engine), []).append(v)
                    if progress:
                        progress(f"{what}: {time.time() - t:.1f} s{' FAILED: ' + err if res is None else ''}")
    rows = [replace(row, label=row.label.format(**asdict(sizes))) for row in ROWS
            if any(row.key in GROUP_ROWS[g] for g in groups)]
    cells = {row.key: {e: _median(runs.get((row.key, e), [])) for e in engines} for row in rows}
    header = [("date", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_all))), ("machine", _machine()),
              ("threads", str(threads)), ("toy_llm", f"git {_git_commit()}"),
              ("llama-cpp-python", lv or "not installed (no ratios)"),
              ("model", f"{os.path.basename(model)} ({os.path.getsize(model) / 2**20:.1f} MiB)"),
              ("KV type", f"{kv_type} (the peak RSS rows: theirs), n_batch = n_ubatch = 512, "
                          f"threadpool {'on' if threadpool else 'off'}, Q4_1/Q5_0/Q8_0 weights by "
                          f"{'the tiled kernels' if tiles else 'ggml_mul_mat'}"),
              ("method", f"one fresh process per (round, measurement, engine), interleaved, median of {rounds} "
                         f"round{'s' if rounds != 1 else ''}; ratios: the median of the rounds' ratios; the whole "
                         f"run took {time.time() - t_all:.0f} s")]
    return {"header": header, "rows": rows, "cells": cells, "runs": runs, "results": results, "errors": errors,
            "engines": engines, "sizes": sizes, "rounds": rounds, "work": work}


def _ratio(t: dict, key: str, engine: str):
    """The median over rounds of each round's ours / llama-cpp-python (the two measured minutes
    apart, so the machine's drift over the run cancels); the ratio of the medians when a worker
    failed and the rounds do not pair up."""
    ours, theirs = t["runs"].get((key, engine), []), t["runs"].get((key, "llama_cpp"), [])
    if ours and len(ours) == len(theirs) and all(theirs):
        return _median([a / b for a, b in zip(ours, theirs)])
    c = t["cells"][key]
    return None if c[engine] is None or not c["llama_cpp"] else c[engine] / c["llama_cpp"]


def _fmt(v, key: str) -> str:
    if v is None:
        return "n/a"
    if key == "startup":
        return f"{v:.2f}"
    return f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def table_lines(t: dict, markdown: bool = False) -> list[str]:
    """The table (plain text or Markdown) and the notes under it."""
    engines = t["engines"]
    ratio_cols = [e for e in engines if e != "llama_cpp"] if "llama_cpp" in engines else []
    head = ["measurement"] + [ENGINE_LABEL[e] for e in engines] + [f"{e} / llama-cpp-python" for e in ratio_cols]
    body = []
    for row in t["rows"]:
        c = t["cells"][row.key]
        label = row.label[:-1] + ", lower is better)" if row.lower_is_better else row.label
        line = [label] + [_fmt(c[e], row.key) for e in engines]
        for e in ratio_cols:
            r = None if c[e] is None else _ratio(t, row.key, e)
            line.append("n/a" if r is None else f"{r:.2f}x")
        body.append(line)
    out = []
    if markdown:
        out += [f"- {k}: {v}" for k, v in t["header"]] + [""]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
        out += ["| " + " | ".join(line) + " |" for line in body]
    else:
        w = max(len(k) for k, _ in t["header"])
        out += [f"{k:<{w}}  {v}" for k, v in t["header"]] + [""]
        widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
        fmt = lambda r: "  ".join([r[0].ljust(widths[0])] + [x.rjust(wd) for x, wd in zip(r[1:], widths[1:])])  # noqa: E731
        out.append(fmt(head))
        out.append("-" * len(out[-1]))
        out += [fmt(r) for r in body]
    out.append("")
    out += [("- " if markdown else "") + n for n in _notes(t)]
    return out


def _notes(t: dict) -> list[str]:
    notes = []
    cells, res = t["cells"], t["results"]
    last = lambda g, e: (res.get((g, e)) or [None])[-1]   # noqa: E731
    if "parallel" in cells:
        c = cells["parallel"]
        parts = []
        r = last("parallel", "fused")
        if r:
            parts.append(f"toy_llm fused {r['gen_tokens']} tokens in {r['decode_steps']} decode steps "
                         f"({r['sequences']} sequences in one graph)")
        r = last("parallel", "llama_cpp")
        if r:
            parts.append(f"llama-cpp-python {r['gen_tokens']} tokens ({'+'.join(map(str, r['per_seq']))}), "
                         f"one prompt after another")
        if parts:
            notes.append("parallel: " + "; ".join(parts) + "; prompt processing included on both sides.")
        dec, pre = cells.get("decode", {}).get("fused"), cells.get("prefill", {}).get("fused")
        if c.get("fused") and dec:
            ceil = f"; prefill/decode = {pre / dec:.2f}x is this CPU's batched ceiling" if pre else ""
            notes.append(f"parallel vs single-stream decode (toy_llm fused): {c['fused'] / dec:.2f}x{ceil}.")
    if "spec_lookup" in cells:
        for e in ("fused", "llama_cpp"):
            r = last("speculative", e)
            if not r:
                continue
            lk = r["lookup"]
            acc = f"{lk['accepted']}/{lk['drafted']} drafted tokens accepted" + (
                f" ({100 * lk['accepted'] / lk['drafted']:.0f}%)" if lk["drafted"] else "")
            how = "prompt_lookup, draft_max 10, from matches of 2 tokens" if e == "fused" else \
                "LlamaPromptLookupDecoding(num_pred_tokens=10); accepted = tokens - 1 - draft calls"
            notes.append(f"speculative {ENGINE_LABEL[e]} ({how}): {r['plain']['gen_tokens']} / {lk['gen_tokens']} "
                         f"tokens (plain / lookup), {acc}; the first two rows: tok/s over prompt + generation.")
        for suffix, when in (("", ""), ("_gen", ", after the first token (no prompt)")):
            c, p = cells.get(f"spec_lookup{suffix}", {}), cells.get(f"spec_plain{suffix}", {})
            if c.get("fused") and p.get("llama_cpp"):
                notes.append(f"speculative{when}: toy_llm prompt lookup / llama-cpp-python plain greedy = "
                             f"{c['fused'] / p['llama_cpp']:.2f}x.")
    if "startup" in cells:
        notes.append("start-up: from the parent's clock just before it spawns the process to the child's clock at "
                     "its first token (interpreter start, import, load, tokenize, eval, argmax).")
    firsts = {e: {x.get("token") for x in (res.get(("startup", e)) or [])} for e in t["engines"]}
    if any(len(v) > 1 for v in firsts.values()) or len({frozenset(v) for v in firsts.values() if v}) > 1:
        notes.append("warning: the start-up runs' first tokens differ: "
                     + ", ".join(f"{ENGINE_LABEL[e]} {sorted(v)}" for e, v in firsts.items()))
    if "per_head" in t["engines"]:
        notes.append("n/a for per_head: rows the per-head graph (one position per graph, ~half speed) is left out of.")
    for row in t["rows"]:   # a cell whose rounds disagree: something else was running, say so
        for e in t["engines"]:
            vs = t["runs"].get((row.key, e), [])
            if len(vs) > 1 and min(vs) > 0 and max(vs) / min(vs) > 1.25:
                notes.append(f"noisy: {row.label}, {ENGINE_LABEL[e]}: rounds "
                             + ", ".join(_fmt(v, row.key) for v in vs))
    notes += [f"error: {e}" for e in t["errors"]]
    return notes


def main(args) -> int:
    """``toy_llm bench`` (the table); ``args`` from cli.build_parser."""
    sizes = Sizes.quick() if args.quick else Sizes()
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    groups = _choose(args.rows, GROUPS, "--rows")
    graphs = _choose(args.graphs, ("fused", "per_head"), "--graphs")
    model = args.model
    if model is None:
        from .fetch import default_model_path

        model = str(default_model_path())
    if not os.path.exists(model):
        raise FileNotFoundError(f"bench: no model file {model}")
    threads = args.threads or os.cpu_count()
    t = run_table(model, threads, rounds, groups, graphs, args.kv_type, sizes, args.threadpool,
                  progress=lambda s: print(s, file=sys.stderr, flush=True), tiles=args.tiles)
    print("\n".join(table_lines(t, markdown=args.markdown)))
    return 1 if t["errors"] else 0


def _choose(spec: str | None, allowed, flag: str):
    if not spec:
        return tuple(allowed)
    got = tuple(x.strip() for x in spec.split(",") if x.strip())
    bad = [x for x in got if x not in allowed]
    if bad or not got:
        raise ValueError(f"{flag}: unknown {', '.join(bad) or 'empty list'}; choose from {','.join(allowed)}")
    return tuple(x for x in allowed if x in got)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker_main()
    else:
        raise SystemExit("usage: python -m toy_llm bench ... (this module's own entry is the worker's: --worker, "
                         "its spec as JSON on stdin)")
