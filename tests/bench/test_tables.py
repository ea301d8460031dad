"""Results tables keep their measurement: a study's JSON renders into the docs, and a rerun
replaces the old text."""

from __future__ import annotations

import json

import pytest

from kvant.bench.tables import markdown, table_doc, write_table
from tests.conftest import load_tool

render_docs = load_tool("render_docs")
INFO = {"cpu": "Intel Test CPU", "cpu_count": 2, "ram_gib": 24.0}


def test_a_changed_measurement_changes_the_page(tmp_path):
    """The renderer fills a block from the JSON, and a rerun's JSON replaces the old text."""
    docs = tmp_path / "docs"
    (docs / "results").mkdir(parents=True)
    first = table_doc("t", ["a", "b"], [["1", "2"]], "python -m x", machine_info=INFO)
    (docs / "results" / "t.json").write_text(json.dumps(first))
    page = "intro\n<!-- table: results/t.json -->\nstale text\n<!-- /table -->\nend\n"
    text, used = render_docs.render(page, docs)
    assert used == ["results/t.json"] and "stale text" not in text
    assert markdown(first) in text and "2 cores of an Intel Test CPU" in text
    second = table_doc("t", ["a", "b"], [["1", "3"]], "python -m x", machine_info=INFO)
    (docs / "results" / "t.json").write_text(json.dumps(second))
    again, _ = render_docs.render(text, docs)
    assert "| 1 | 3 |" in again and "| 1 | 2 |" not in again


def test_a_table_with_a_short_row_is_refused_and_a_written_one_reads_back(tmp_path):
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        table_doc("t", ["a", "b"], [["1"]], "python -m x", machine_info=INFO)
    doc = table_doc("t", ["a", "b"], [["1", "2"]], "python -m x", machine_info=INFO)
    path = write_table(tmp_path / "sub" / "t.json", doc)
    assert json.loads(path.read_text()) == doc and not list(tmp_path.rglob("*.part"))


def test_a_missing_json_is_one_clear_line(tmp_path):
    page = "<!-- table: results/gone.json -->\n<!-- /table -->\n"
    with pytest.raises(SystemExit, match="gone.json is missing; run the study"):
        render_docs.render(page, tmp_path)


def test_the_agreement_table_ranks_each_method_against_direct_and_against_itself():
    """A second calibration text that swaps two q6_k costs of direct's: direct against itself
    is then below 1 in q6_k only (Spearman of four ranks with two neighbours swapped:
    1 - 6 * 2 / (4 * 15) = 0.8), torch (unchanged) against itself is 1, and torch against
    direct on the second text carries the same swap. Torch's costs carry a constant per
    tensor (its Q8_0 cost) that ranks the tensors in reverse: compared on what the
    knapsack sees, it agrees with direct exactly."""
    from kvant.bench.studies.mix_proof import agreement_table, rank_agreement, repeatability

    names = [f"blk.{i}.ffn_down.weight" for i in range(4)]
    first = {n: {"q8_0": 0.0, "q5_k": 10.0 * (i + 1), "q6_k": 1.0 * (i + 1)}
             for i, n in enumerate(names)}
    second = {n: dict(c) for n, c in first.items()}
    second[names[1]]["q6_k"], second[names[2]]["q6_k"] = 3.0, 2.0

    def files(ratio):
        return {"q5_k_m-mix": {"mean_kld": 1e-4 * ratio}}

    def method(costs, ratio):
        return {"sensitivity": {"costs": costs}, "files": files(ratio)}

    # torch measures against bf16: each tensor's costs carry its Q8_0 cost, which ranks
    # the tensors the other way; the knapsack's choice (and the agreement) ignore it
    torch_first = {n: {t: v + 100.0 * (4 - i) for t, v in c.items()}
                   for i, (n, c) in enumerate(first.items())}
    results = {"calib": "/a/one.txt", "methods": {
        "direct": method(first, 1.0), "torch": method(torch_first, 1.0)}}
    results["methods"]["torch"]["rank_vs_direct"] = rank_agreement(torch_first, first)
    again = {"calib": "/a/two.txt", "methods": {
        "direct": method(second, 1.0), "torch": method(torch_first, 1.2)}}
    results["repeat"] = {**again, "rank": repeatability(results, again)}
    rank = results["repeat"]["rank"]
    assert rank["direct"]["vs_itself"]["within"] == pytest.approx({"q5_k": 1.0, "q6_k": 0.8})
    assert rank["torch"]["vs_itself"]["within"] == pytest.approx({"q5_k": 1.0, "q6_k": 1.0})
    assert rank["torch"]["vs_direct"]["within"]["q6_k"] == pytest.approx(0.8)

    doc = agreement_table(results, "python -m x", "a test")
    rows = {(r[0], r[1], r[2]): r for r in doc["rows"]}
    q6 = doc["columns"].index("q6_k (within)")
    assert rows["direct", "direct on one.txt", "two.txt"][q6] == "0.800"
    assert rows["torch", "direct", "two.txt"][q6] == "0.800"
    assert rows["torch", "direct", "one.txt"][q6] == "1.000"
    assert rows["torch", "direct", "one.txt"][doc["columns"].index("q2_k (within)")] == "-"
    assert "on one.txt: Q5_K_M-MIX 1.00" in doc["notes"]
    assert "on two.txt: Q5_K_M-MIX 1.20" in doc["notes"]


def test_the_real_model_mix_table_sets_each_mix_against_its_twin_and_the_frontier():
    """A Q4_K_M twin that lies above the line from Q3_K_M to Q5_K_M is dominated, and the
    mix is measured against that line at its own bytes as well as against its twin."""
    from kvant.bench.studies.real_model import mix_table

    def scored(size, kld):
        return {"size_bytes": size, "mean_kld": kld, "top1_agreement_pct": 90.0,
                "delta_ppl_pct": 1.0,
                "per_language": {lang: {"mean_kld": kld} for lang in
                                 ("nob", "nno", "sme", "dan", "swe")}}

    files = {"q3_k_m": scored(100, 0.16), "q4_k_m": scored(140, 0.08),
             "q5_k_m": scored(150, 0.01), "q3_k_m-mix": scored(99, 0.12),
             "q4_k_m-mix": scored(140, 0.02), "iq4_xs": scored(130, 0.09),
             "iq4_xs-mix": {**scored(129, 0.1), "withheld": "its held-out mean KLD is not below"},
             "q5_k_m-mix": {"withheld": "no trade", "same_as_uniform": True}}
    results = {"methods": {"fisher": {"files": files, "export_wall_s": 60.0,
                                      "sensitivity": {"time_estimate": {"estimated_s": 50}}}}}
    doc = mix_table(results, "python -m x", "a model")
    rows = {(r[0], r[1]): r for r in doc["rows"]}
    twin = rows["Q4_K_M", "(llama.cpp's rule)"]
    assert twin[-2] == "dominated"  # 0.08 against 0.16 * (0.01 / 0.16) ** 0.8 = 0.0174
    mix = rows["Q4_K_M-MIX", "fisher"]
    assert mix[-3] == "0.25"  # 0.02 / 0.08
    assert mix[-2] == f"{0.02 / (0.16 * (0.01 / 0.16) ** 0.8):.2f}"
    assert mix[-1] == "yes"
    assert rows["Q3_K_M-MIX", "fisher"][-2] == "-"  # below every uniform file: no frontier
    assert rows["IQ4_XS-MIX", "fisher"][-1].startswith("no: its held-out")
    assert rows["Q3_K_M", "(llama.cpp's rule)"][-2] == "on the frontier"
