"""Win rates, pairing, the bootstrap interval and the sign test on hand-made score files."""

import json
import os

import numpy as np
import pytest

from eval.versus import bootstrap_interval, compare, main, pair_by_prompt, sign_test, summarize


def rec(prompt, score, path="x.png"):
    return {"prompt": prompt, "gen_image_path": path, "raw_image_path": "", "metadata": {}, "score": score}


def test_win_rate_with_ties_and_duplicate_prompts():
    a = [rec("cat", 0.9), rec("dog", 0.5), rec("cat", 0.1), rec("sun", 0.3), rec("only-a", 1.0)]
    b = [rec("dog", 0.5), rec("cat", 0.2), rec("cat", 0.4), rec("sun", 0.7), rec("cat", 0.0)]
    pairs, unpaired = pair_by_prompt(a, b)
    # cat: (0.9, 0.2), (0.1, 0.4) paired in order, B's third "cat" unpaired; dog tie; sun B; only-a unpaired
    assert [(x["score"], y["score"]) for x, y in pairs] == [(0.9, 0.2), (0.1, 0.4), (0.5, 0.5), (0.3, 0.7)]
    assert unpaired == 2
    d = compare(a, b, "A", "B")
    assert (d["wins_a"], d["ties"], d["wins_b"], d["total_pairs"]) == (1, 1, 2, 4)
    assert d["win_rate_a_over_b"] == pytest.approx((1 + 0.5) / 4)
    assert d["mean_score_a"] == pytest.approx((0.9 + 0.1 + 0.5 + 0.3) / 4)
    assert d["mean_score_b"] == pytest.approx((0.2 + 0.4 + 0.5 + 0.7) / 4)
    assert [r["winner"] for r in d["results"]] == ["A", "B", "tie", "B"]


def test_macro_and_micro_means():
    rows = {"m1": {"model_a": "A", "model_b": "B", "win_rate_a_over_b": 0.8, "total_pairs": 10},
            "m2": {"model_a": "A", "model_b": "B", "win_rate_a_over_b": 0.2, "total_pairs": 30}}
    avg = summarize(rows)["averages"]
    assert avg["macro_win_rate_a_over_b"] == pytest.approx(0.5)
    assert avg["micro_win_rate_a_over_b"] == pytest.approx((0.8 * 10 + 0.2 * 30) / 40)


def test_sign_test_known_cases():
    assert sign_test(9, 1) == pytest.approx(2 * (1 + 10) / 1024)  # exact binomial tail
    assert sign_test(0, 3) == pytest.approx(0.25)
    assert sign_test(5, 5) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(2000, 1200) < 1e-40  # large n stays exact and finite


def test_bootstrap_contains_the_estimate_and_narrows():
    rng = np.random.default_rng(1)
    widths = []
    for n in (30, 300, 3000):
        results = rng.choice([0.0, 0.5, 1.0], size=n, p=[0.35, 0.05, 0.6])
        low, high = bootstrap_interval(results)
        assert low <= results.mean() <= high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    assert bootstrap_interval(np.ones(20)) == (1.0, 1.0)
    # The percentile bootstrap written out: 10,000 resamples of the pairs from default_rng(0).
    r = rng.choice([0.0, 1.0], size=100)
    means = r[np.random.default_rng(0).integers(0, 100, size=(10_000, 100))].mean(axis=1)
    assert bootstrap_interval(r) == (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))
    few = r[np.random.default_rng(1).integers(0, 100, size=(7, 100))].mean(axis=1)  # the seed is used
    assert bootstrap_interval(r, samples=7, seed=1) == (float(np.quantile(few, 0.025)), float(np.quantile(few, 0.975)))
    assert bootstrap_interval(r, samples=7, seed=1) != bootstrap_interval(r, samples=7, seed=2)


def test_no_common_prompt_is_an_error():
    from sdpo.errors import InputError

    with pytest.raises(InputError, match="no prompt in common"):
        compare([rec("a", 1.0)], [rec("b", 1.0)], "A", "B")


def test_versus_reuses_score_files_without_loading_models(tmp_path, capsys):
    """With X_<metric>.json already there, made by this scorer for these images, nothing is scored:
    the outputs come from the files."""
    from PIL import Image

    from eval.score import image_identities, score_file
    from eval.scorers import scorer_identity

    manifests = []
    for side, scores in (("a", [0.3, 0.9, 0.5]), ("b", [0.4, 0.1, 0.5])):
        folder = tmp_path / side / "suite_seed0_8x8_1s_7.5cfg"
        folder.mkdir(parents=True)
        records = []
        for i, prompt in enumerate(["p0", "p1", "p2"]):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}_8x8.png")
            records.append({"prompt": prompt, "gen_image_path": str(folder / f"{i}_8x8.png"),
                            "raw_image_path": "", "metadata": {}})
        manifest = str(folder) + ".json"
        json.dump(records, open(manifest, "w"))
        scored = [{**r, "score": s} for r, s in zip(records, scores)]
        content = score_file("clip", scorer_identity("clip"), image_identities(records, manifest), scored)
        json.dump(content, open(str(folder) + "_clip.json", "w"))
        manifests.append(manifest)
    out = tmp_path / "vs"
    summary = main(["--json_a", manifests[0], "--json_b", manifests[1], "--label_a", "A", "--label_b", "B",
                    "--outdir", str(out), "--metrics", "clip", "--device", "cpu"])
    assert summary["metrics"][0]["win_rate_a_over_b"] == pytest.approx(0.5)  # A wins p1, B wins p0, p2 ties
    assert sorted(os.listdir(out)) == ["index.html", "pair_clip.json", "summary.json", "winrates.png"]
    page = (out / "index.html").read_text()
    assert page.count("<img src=") == 1 + 3 * 2 and "../a/suite_seed0_8x8_1s_7.5cfg/1_8x8.png" in page
    out = capsys.readouterr().out
    assert "| clip |" in out and "scoring again" not in out
