"""The bench table (toy_llm.bench) on a synthetic F32 model, tiny sizes, one round: every row and
engine is there and parses, and the parallel row's 8 texts (one graph per decode step) are what each
prompt gives alone, ours one sequence at a time and llama-cpp-python's one after another. No timing
is asserted: speed is what bench measures, not what tests check."""
from __future__ import annotations

import re
import statistics

import pytest

import toy_llm
from toy_llm import bench
from toy_llm.testing import synthetic

pytest.importorskip("llama_cpp", reason="the llama-cpp-python oracle is installed by `make test`")

SIZES = bench.Sizes(prefill=16, decode=4, deep_pos=32, deep_decode=4, parallel_tokens=8, spec_tokens=8,
                    rss_ctx=256, startup_ctx=128)
ROW_KEYS = ("startup", "prefill", "decode", "deep", "parallel", "spec_plain", "spec_lookup", "spec_plain_gen", "spec_lookup_gen",
            "rss_f32", "rss_q8_0")
PER_HEAD_NA = {"deep", "parallel", "spec_plain", "spec_lookup", "spec_plain_gen", "spec_lookup_gen"}


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    path = synthetic.write_model(tmp_path_factory.mktemp("bench") / "llama.gguf", "llama")
    return path, bench.run_table(str(path), threads=1, rounds=1, kv_type="f32", sizes=SIZES)


def test_every_row_and_engine_parses(table):
    _, t = table
    assert t["errors"] == []
    assert t["engines"] == ["fused", "per_head", "llama_cpp"]
    assert [r.key for r in t["rows"]] == list(ROW_KEYS)
    md = bench.table_lines(t, markdown=True)
    grid = [[c.strip() for c in line.strip("|").split("|")] for line in md if line.startswith("| ")]
    head, body = grid[0], grid[1:]
    assert head == ["measurement", "toy_llm fused", "toy_llm per_head", "llama-cpp-python",
                    "fused / llama-cpp-python", "per_head / llama-cpp-python"]
    assert len(body) == len(ROW_KEYS)
    for key, row, cells in zip(ROW_KEYS, t["rows"], body):
        assert cells[0].startswith(row.label[:-1])
        fused, per_head, llama, r_fused, r_per_head = cells[1:]
        assert float(fused) > 0 and float(llama) > 0, (key, cells)
        # the ratio is the median of the rounds' ratios, of the unrounded values
        ours, theirs = t["runs"][(key, "fused")], t["runs"][(key, "llama_cpp")]
        want = statistics.median(a / b for a, b in zip(ours, theirs))
        assert float(r_fused.rstrip("x")) == pytest.approx(want, abs=0.006)
        if key in PER_HEAD_NA:
            assert per_head == r_per_head == "n/a"
        else:
            assert float(per_head) > 0 and r_per_head.endswith("x"), (key, cells)
    plain = "\n".join(bench.table_lines(t))
    for label in ("date", "machine", "threads", "toy_llm", "llama-cpp-python", "model", "KV type"):
        assert re.search(rf"^{re.escape(label)}\s+\S", plain, re.M), label
    assert "drafted tokens accepted" in plain


def test_parallel_texts_equal_each_prompt_alone(table):
    path, t = table
    work = t["work"]
    together = t["results"][("parallel", "fused")][0]
    theirs = t["results"][("parallel", "llama_cpp")][0]
    assert together["sequences"] == 8 and len(together["texts"]) == 8
    assert together["gen_tokens"] == theirs["gen_tokens"] > 8   # not all stopped at once
    with toy_llm.load(path, n_threads=1, kv_type="f32", max_T=128) as m:
        alone = [m.generate(ids, max_new_tokens=SIZES.parallel_tokens) for ids in work["parallel_ids"]]
    assert together["texts"] == alone
    assert together["texts"] == theirs["texts"]   # llama-cpp-python, one prompt after another


def test_cli_runs_the_table(table, capsys):
    path, _ = table
    from toy_llm.cli import main

    assert main(["bench", "--quick", "-t", "1", "-m", str(path), "--rows", "startup", "--graphs", "fused"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^start-up to first token \(s, lower is better\)\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+x$", out, re.M)
    with pytest.raises(ValueError, match="--rows: unknown decode"):
        bench._choose("decode", bench.GROUPS, "--rows")
