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


# ---- score files in the reference's format -----------------------------------------------------------

# What the reference's tools write for a manifest X.json (utils/*_utils.py): X_<name>.json, a copy of the
# manifest's records; ImageReward's adds each image's score as "image_reward_score", the other four tools
# print their mean and add nothing.
REFERENCE_NAMES = {"pickscore": "pickscore", "hpsv2": "hpsv2score", "aesthetics": "aesscore", "clip": "clipscore",
                   "imagereward": "image_reward_score"}


def reference_manifest(folder, prompts, colours):
    """A manifest as the reference's test_sd15.py writes it (indent 2), with its images: one flat
    colour per prompt, so that a stand-in scorer can read the score off the pixels."""
    from PIL import Image

    images = folder / "papv2_seed0_512x512_50s_7.5cfg"
    images.mkdir(parents=True)
    records = []
    for index, (prompt, colour) in enumerate(zip(prompts, colours)):
        path = str(images / f"{index}_512x512.png")
        Image.new("RGB", (8, 8), colour).save(path)
        records.append({"prompt": prompt, "gen_image_path": path, "raw_image_path": "", "metadata": {}})
    manifest = str(images) + ".json"
    with open(manifest, "w") as f:
        json.dump(records, f, indent=2)
    return manifest, records


def reference_score_files(manifest, records, image_reward):
    """The five files the reference's tools leave beside the manifest (json_path.replace(".json", ...))."""
    for metric, name in REFERENCE_NAMES.items():
        content = [{**r, "image_reward_score": s} for r, s in zip(records, image_reward)] \
            if metric == "imagereward" else records
        with open(manifest.replace(".json", f"_{name}.json"), "w") as f:
            json.dump(content, f, indent=2)


def reference_win_rate(prompts_a, scores_a, prompts_b, scores_b):
    """The reference's rule (utils/*_vs_utils.py), written out: prompts common to both in sorted order;
    within a prompt the k-th image of A meets the k-th of B, leftovers dropped; a tie counts half."""
    pairs = []
    for prompt in sorted(set(prompts_a) & set(prompts_b)):
        mine = [s for p, s in zip(prompts_a, scores_a) if p == prompt]
        theirs = [s for p, s in zip(prompts_b, scores_b) if p == prompt]
        pairs += [(prompt, mine[k], theirs[k]) for k in range(min(len(mine), len(theirs)))]
    n = len(pairs)
    wins_a = sum(1 for _, a, b in pairs if a > b)
    wins_b = sum(1 for _, a, b in pairs if b > a)
    ties = n - wins_a - wins_b
    return {"total_pairs": n, "wins_a": wins_a, "wins_b": wins_b, "ties": ties,
            "win_rate_a_over_b": (wins_a + 0.5 * ties) / n, "mean_score_a": sum(a for _, a, _ in pairs) / n,
            "mean_score_b": sum(b for _, _, b in pairs) / n, "pairs": pairs}


class ColourScorer:
    """A stand-in for a reward model: the score is one colour channel of the (flat) image, negated for
    some metrics, so that the metrics disagree. It counts what it scored."""

    CHANNEL = {"pickscore": (0, 1), "hpsv2": (0, -1), "aesthetics": (1, 1), "clip": (1, -1), "imagereward": (2, 1)}

    def __init__(self, metric, scored):
        self.metric, self.scored, self.batch_size = metric, scored, 4

    def score(self, images, prompts):
        channel, sign = self.CHANNEL[self.metric]
        self.scored.append((self.metric, len(images)))
        return [sign * float(im.getpixel((0, 0))[channel]) for im in images]


def test_win_rates_from_score_files_in_the_reference_format(tmp_path, capsys, monkeypatch):
    """Manifests and score files laid out as the reference's tools leave them: ImageReward's scores are
    used from X_image_reward_score.json (unverified, with a warning, no model loaded); the four files
    without scores are scored. Every win rate, count, mean, the pairing and the macro and micro means
    equal the reference's rules applied to the per-image scores."""
    import eval.score

    prompts_a = ["tree", "dog", "cat", "sun", "only-a", "cat", "cat"]
    prompts_b = ["dog", "cat", "tree", "cat", "sun", "cat", "only-b", "cat"]
    colours_a = [(10, 50, 0), (20, 20, 0), (30, 70, 0), (40, 40, 0), (50, 0, 0), (60, 60, 0), (70, 10, 0)]
    colours_b = [(20, 20, 0), (15, 60, 0), (60, 60, 0), (35, 60, 0), (45, 45, 0), (70, 10, 0), (0, 0, 0), (5, 5, 0)]
    reward_a = [0.9, 0.5, 0.1, 0.3, 1.0, -0.2, 0.7]
    reward_b = [0.5, 0.2, -0.2, 0.4, 0.7, 0.7, 2.0, 0.0]
    manifest_a, records_a = reference_manifest(tmp_path / "a", prompts_a, colours_a)
    manifest_b, records_b = reference_manifest(tmp_path / "b", prompts_b, colours_b)
    reference_score_files(manifest_a, records_a, reward_a)
    reference_score_files(manifest_b, records_b, reward_b)
    kept = ("hpsv2score", "aesscore", "clipscore", "image_reward_score")
    untouched = {path: open(path).read() for path in
                 (m.replace(".json", f"_{name}.json") for m in (manifest_a, manifest_b) for name in kept)}
    scored = []
    monkeypatch.setattr(eval.score, "build_scorer", lambda metric, **kw: ColourScorer(metric, scored))

    out = tmp_path / "vs"
    summary = main(["--json_a", manifest_a, "--json_b", manifest_b, "--label_a", "A", "--label_b", "B",
                    "--outdir", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out.splitlines()

    # ImageReward: not scored, its scores used with one warning per file; the other four scored, each saying why.
    totals = {}
    for metric, n in scored:
        totals[metric] = totals.get(metric, 0) + n
    assert totals == {m: 7 + 8 for m in ("pickscore", "hpsv2", "aesthetics", "clip")}
    for manifest in (manifest_a, manifest_b):
        warning = [line for line in printed if line.startswith(f"warning: {manifest.replace('.json', '')}")]
        assert warning == [f"warning: {manifest.replace('.json', '_image_reward_score.json')}: "
                           f"scores used unverified: the file holds no record of the scorer or of the images behind "
                           f"them (--recompute scores again)"]
        for name in ("pickscore", "hpsv2score", "aesscore", "clipscore"):
            assert (f"{manifest.replace('.json', f'_{name}.json')}: holds no per-image scores (the reference's tool "
                    f"printed only the mean): scoring") in printed
    assert not [line for line in printed if "scoring again" in line]
    assert all(open(p).read() == text for p, text in untouched.items())  # the reference's files stay as they were

    per_image = {"imagereward": (reward_a, reward_b)}
    for metric in ("pickscore", "hpsv2", "aesthetics", "clip"):  # what the stand-in gave, as our score files hold it
        files = [json.load(open(m.replace(".json", f"_{metric}.json"))) for m in (manifest_a, manifest_b)]
        per_image[metric] = tuple([r["score"] for r in content["records"]] for content in files)
    rates, counts = [], []
    for row in summary["metrics"]:
        expected = reference_win_rate(prompts_a, per_image[row["metric"]][0], prompts_b, per_image[row["metric"]][1])
        pairs = json.load(open(out / f"pair_{row['metric']}.json"))
        for key in ("total_pairs", "wins_a", "wins_b", "ties", "win_rate_a_over_b", "mean_score_a", "mean_score_b"):
            assert pairs[key] == pytest.approx(expected[key]) and row[key] == pytest.approx(expected[key]), key
        assert [(r["prompt"], r["score_a"], r["score_b"]) for r in pairs["results"]] == expected["pairs"]
        rates.append(expected["win_rate_a_over_b"])
        counts.append(expected["total_pairs"])
    assert [row["metric"] for row in summary["metrics"]] == ["pickscore", "hpsv2", "aesthetics", "clip", "imagereward"]
    assert len(set(rates)) >= 3 and any(json.load(open(out / f"pair_{m}.json"))["ties"] for m in REFERENCE_NAMES)
    assert summary["averages"]["macro_win_rate_a_over_b"] == pytest.approx(sum(rates) / len(rates))
    assert summary["averages"]["micro_win_rate_a_over_b"] == pytest.approx(
        sum(r * n for r, n in zip(rates, counts)) / sum(counts))
    # X_pickscore.json, the one name both tools write, now holds our scores with their record.
    assert json.load(open(manifest_a.replace(".json", "_pickscore.json")))["format"] == "sdpo-scores/1"
