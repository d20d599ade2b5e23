"""The quality benchmark's plumbing on a tiny setting (digits, a few steps), so it cannot rot."""

import json
import sys
from pathlib import Path

import pytest

from ranksearch.config import Choice, Config
from ranksearch.space import RankSpace

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_quality
        yield bench_quality
    finally:
        sys.path.remove(str(BENCH))


def test_largest_fraction_inverts_a_monotone_cost(bench):
    assert bench.largest_fraction(lambda f: f**2, 0.25) == pytest.approx(0.5, abs=1e-5)
    assert bench.largest_fraction(lambda f: f, 2.0) == 1.0
    assert bench.largest_fraction(lambda f: 1 + f, 0.5) is None


def test_round_ranks_to_multiples_within_the_maximum(bench, digits_model, digits):
    space = RankSpace.discover(digits_model, digits.example_input())
    # features.0 is 1→16 (tucker2 ranks at most (1, 9)); features.7 is 32→64
    config = space.validate(Config({"features.0": Choice("tucker2", (1, 3)),
                                    "features.7": Choice("tucker2", (11, 29)),
                                    "classifier.1": Choice("svd", 5)}))
    rounded = bench.round_ranks(space, config, 8)
    assert rounded["features.0"].rank == (1, 8)
    assert rounded["features.7"].rank == (8, 32)
    assert rounded["classifier.1"].rank == 8


def test_tiny_run_writes_consistent_report(bench, tmp_path, digits):
    s = bench.Settings(
        task="digits", models={"digits-cnn": {"epochs": 4}},
        budgets=("params<=0.5", "flops<=0.5"), strategies=("uniform", "pca_energy"),
        evaluations=3, proxy_steps=2, proxy_images=256, finetune_images=1000,
        latency_repeats=3, out=tmp_path / "out", results=tmp_path / "results",
        checkpoints=tmp_path / "ckpt",
    )
    report = bench.run(s)
    saved = json.loads((s.results / "quality.json").read_text())
    assert saved["models"].keys() == {"digits-cnn"}
    assert "pca_energy" in (s.results / "quality.md").read_text()
    data = report["models"]["digits-cnn"]
    assert 0.8 < data["dense_test_accuracy"] <= 1.0
    for cell in data["cells"]:
        metric, limit = cell["budget"].split("<=")
        rows = {r["label"]: r for r in cell["rows"]}
        assert {"uniform", "pca_energy", "uniform tucker2", "uniform cp3_tpm", "uniform svd",
                "vbmf one-shot"} <= rows.keys()
        for label, r in rows.items():
            if label != "tensorly-torch tucker":
                assert r[f"{metric}_ratio"] <= float(limit) + 1e-9, label
                assert r["rounded_speedup_b1"] > 0
            correct = r["test_accuracy"] * len(digits.test)  # counted on the whole test split
            assert correct == pytest.approx(round(correct)) and 0 <= correct <= len(digits.test)
            assert r["speedup_b1"] > 0 and r["speedup_b64"] > 0
        assert rows["pca_energy"]["test_accuracy"] > 0.8  # fine-tuned well above chance
        summary = cell["summary"]
        uniform = max(r["test_accuracy"] for k, r in rows.items() if k.startswith("uniform"))
        assert summary["gain_points"] == pytest.approx(
            100 * (rows["pca_energy"]["test_accuracy"] - uniform))
        assert summary["hypervolume_ratio"] > 0
        assert (s.results / cell["plot"]).stat().st_size > 1000
        if metric == "flops":
            efficiency = summary["speed_efficiency"]["uniform tucker2"]["b1"]
            assert efficiency == pytest.approx(
                rows["uniform tucker2"]["speedup_b1"] * rows["uniform tucker2"]["flops_ratio"])
    # a second run resumes: fine-tuned accuracies and search times come from the caches
    def cached(cells, key):  # tensorly-torch's time is its fraction fit, redone every run
        return [[r[key] for r in c["rows"]
                 if not r["config"].startswith("tensorly")] for c in cells]

    again = bench.run(s)["models"]["digits-cnn"]["cells"]
    for key in ("test_accuracy", "search_seconds"):
        assert cached(again, key) == cached(data["cells"], key)
