"""benchmarks/bench_dit_cache.py --quick on the tiny random Flux transformer: one table row per
variant, dcfx compiled with fullgraph=True without graph breaks or recompiles, full steps matched."""

import pytest
from _benchmarks import script

# One compiled dcfx row: compiling is this test's cost (compile=True is the same graphs).
ROWS = ["eager", "fbc-2", "dcfx-2", "dcfx-2-fullgraph"]
COLUMNS = ["variant", "full steps", "s/gen", "ms/step", "vs compiled", "graph breaks", "recompiles", "fullgraph=True",
           "rel. L2 to plain"]


@pytest.mark.inductor
def test_bench_dit_cache_quick_table(tmp_path):
    bench = script("bench_dit_cache")
    out = tmp_path / "dit_cache.md"
    text = bench.main(["--quick", "--steps", "4", "--repeats", "1", "--rows", *ROWS, "--out", str(out)])
    assert out.read_text() == text + "\n"
    assert text.startswith("`python -P benchmarks/bench_dit_cache.py --quick")
    assert "torch " in text and "diffusers " in text

    rows = script("dit_cache").parse_table(text)
    assert list(rows[0]) == COLUMNS
    assert [r["variant"].split(" ")[0] for r in rows] == ROWS
    by_name = {r["variant"].split(" ")[0]: r for r in rows}
    assert all(not r["s/gen"].startswith("failed") and float(r["s/gen"]) > 0 for r in rows)
    assert by_name["eager"]["full steps"] == "4/4"
    assert by_name["dcfx-2"]["full steps"] == "2/4"
    assert by_name["fbc-2"]["full steps"] == by_name["dcfx-2"]["full steps"]  # its threshold searched to match
    fullgraph = by_name["dcfx-2-fullgraph"]
    assert fullgraph["graph breaks"] == "0" and fullgraph["recompiles"] == "0" and fullgraph["full steps"] == "2/4"
    assert by_name["dcfx-2-fullgraph"]["fullgraph=True"] == "yes"
    assert float(by_name["dcfx-2"]["rel. L2 to plain"]) > 0  # shallow steps change the result
