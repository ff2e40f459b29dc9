"""close() frees everything at once: 200 load/eval/close cycles of SmolLM2 with the cycle collector
off leave RSS and open file descriptors where they were, and leave nothing for the collector; failed
loads free their session, mapping and gguf handle too. Each run is a fresh process; the figures are
printed (pytest -s)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from toy_llm.fetch import fetch
from toy_llm.testing import synthetic

CYCLES = 200
WARMUP = 10          # the allocators reach the working set of one load (see README, "Leaks")
MAX_GROWTH_MIB = 5.0

_CHILD = textwrap.dedent("""
    import gc, json, os, sys
    import toy_llm
    from toy_llm.testing.procmem import status_kib

    def rss_mib():
        return status_kib('VmRSS') / 1024

    def fds():
        return len(os.listdir('/proc/self/fd'))

    spec = json.loads(sys.argv[1])

    def cycle():
        if spec['bad'] is None:
            m = toy_llm.load(spec['path'], max_T=64, n_threads=1, graph=spec['graph'])
            m.eval([1, 2, 3])
            m.close()
            return
        try:
            toy_llm.load(spec['bad'], max_T=64, n_threads=1, **spec['kw'])
        except Exception as e:         # the failure under test
            cycle.error = f"{type(e).__name__}: {e}"
        else:
            raise SystemExit(f"{spec['bad']} loaded")

    cycle()                           # imports what a load imports lazily (their import-time cycles)
    gc.collect()
    gc.disable()                      # from here on nothing may depend on the cycle collector
    rss_first = rss_mib()
    for _ in range(spec['warmup'] - 1):
        cycle()
    rss0, fd0 = rss_mib(), fds()
    for _ in range(spec['cycles']):
        cycle()
    rss1, fd1 = rss_mib(), fds()
    gc.set_debug(gc.DEBUG_SAVEALL)
    found = gc.collect()
    kinds = sorted({type(o).__name__ for o in gc.garbage})[:20]
    print(json.dumps({"rss_first": rss_first, "rss0": rss0, "rss1": rss1, "fd0": fd0, "fd1": fd1,
                      "garbage": found, "kinds": kinds, "error": getattr(cycle, "error", None)}))
""")


def _run(spec: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _check(what: str, res: dict, cycles: int) -> None:
    growth = res["rss1"] - res["rss0"]
    print(f"\n{what}: RSS {res['rss_first']:.1f} MiB after the first cycle, {res['rss0']:.1f} after {WARMUP}, "
          f"{res['rss1']:.1f} after {cycles} more ({growth:+.2f} MiB); fds {res['fd0']} -> {res['fd1']}; "
          f"objects left for the cycle collector: {res['garbage']}")
    assert growth < MAX_GROWTH_MIB, f"{what}: RSS grew {growth:.1f} MiB over {cycles} cycles"
    assert res["fd1"] == res["fd0"], f"{what}: open file descriptors {res['fd0']} -> {res['fd1']}"
    assert res["garbage"] == 0, f"{what}: reference cycles left for the collector: {res['kinds']}"


@pytest.mark.parametrize("graph", ["fused", "per_head"])
def test_200_load_eval_close_cycles(graph):
    path = str(fetch("smollm2"))
    _check(f"SmolLM2 {graph}", _run({"path": path, "graph": graph, "bad": None, "kw": {},
                                     "warmup": WARMUP, "cycles": CYCLES}), CYCLES)


def test_failed_loads_free_what_they_opened(tmp_path):
    llama = synthetic.write_model(tmp_path / "llama.gguf", "llama")
    per_head = synthetic.write_per_head(llama, tmp_path / "per_head.gguf")
    data = llama.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) - 4096])     # the header is whole, the last tensor is cut
    for what, bad, kw in (("per-head file on the fused graph", per_head, {"graph": "fused"}),
                          ("truncated data, mmap", truncated, {}),
                          ("truncated data, copy loader", truncated, {"loader": "copy"})):
        res = _run({"path": None, "graph": None, "bad": str(bad), "kw": kw, "warmup": WARMUP, "cycles": 100})
        print(f"\n{what}: {res['error']}")
        _check(what, res, 100)
