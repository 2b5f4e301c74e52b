"""Win rates, pairing, the bootstrap interval and the sign test on hand-made score files; score files
and pair files in the reference's layouts as score sources."""

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


# ---- the reference's pair files (its test_vs.sh's output) as score sources ----------------------------


def reference_alignment(prompts_a, prompts_b):
    """The reference's pairing (align_pairs in utils/*_vs_utils.py), written out: for each prompt common
    to both, in sorted order, the k-th record of A with the k-th of B, leftovers dropped: [(prompt, i, j)]."""
    out = []
    for prompt in sorted(set(prompts_a) & set(prompts_b)):
        ia = [i for i, p in enumerate(prompts_a) if p == prompt]
        ib = [j for j, p in enumerate(prompts_b) if p == prompt]
        out += [(prompt, i, j) for i, j in zip(ia, ib)]
    return out


def write_reference_comparison(outdir, stamp, side_a, side_b):
    """What the reference's `test_vs.sh --label_a A --label_b B --outdir OUTDIR` leaves:
    OUTDIR/<A>_vs_<B>_<MMDD-HHMMSS>/pair_<metric>.json for the five metrics, as its utils/*_vs_utils.py
    write them (json.dump, indent 2), and summary.json from utils/summary_vs_scores.py. A side is
    (label, records, {metric: per-record scores})."""
    (label_a, records_a, scores_a), (label_b, records_b, scores_b) = side_a, side_b
    folder = outdir / f"{label_a}_vs_{label_b}_{stamp}"
    folder.mkdir(parents=True)
    rows = []
    for metric in ("pickscore", "hpsv2", "aesthetics", "clip", "imagereward"):
        results = []
        for k, (prompt, i, j) in enumerate(reference_alignment([r["prompt"] for r in records_a],
                                                               [r["prompt"] for r in records_b])):
            sa, sb = scores_a[metric][i], scores_b[metric][j]
            results.append({"pair_index": k, "prompt": prompt, "image_a": records_a[i]["gen_image_path"],
                            "image_b": records_b[j]["gen_image_path"], "score_a": float(sa), "score_b": float(sb),
                            "winner": label_a if sa > sb else label_b if sb > sa else "tie"})
        n = len(results)
        wins_a = sum(r["score_a"] > r["score_b"] for r in results)
        wins_b = sum(r["score_b"] > r["score_a"] for r in results)
        content = {"model_a": label_a, "model_b": label_b, "total_pairs": n, "wins_a": wins_a, "wins_b": wins_b,
                   "ties": n - wins_a - wins_b, "win_rate_a_over_b": (wins_a + 0.5 * (n - wins_a - wins_b)) / n,
                   "mean_score_a": sum(r["score_a"] for r in results) / n,
                   "mean_score_b": sum(r["score_b"] for r in results) / n, "ties_policy": "half", "results": results}
        with open(folder / f"pair_{metric}.json", "w") as f:
            json.dump(content, f, indent=2)
        rows.append({"metric": metric, "win_rate_a_over_b": content["win_rate_a_over_b"], "total_pairs": n})
    with open(folder / "summary.json", "w") as f:  # in the same folder, and not a pair file
        json.dump({"pair": {"model_a": label_a, "model_b": label_b, "ties_policy": "half"}, "metrics": rows,
                   "averages": {"macro_win_rate_a_over_b": 0.5, "micro_win_rate_a_over_b": 0.5}}, f, indent=2)
    return folder


PROMPTS_BASE = ["tree", "dog", "cat", "sun", "cat", "moon", "cat", "only-base", "dog"]
PROMPTS_A = ["tree", "dog", "cat", "sun", "cat", "cat", "dog"]
PROMPTS_B = ["dog", "cat", "moon", "cat", "sun", "tree", "dog"]


@pytest.fixture()
def earlier_comparisons(tmp_path):
    """Three models' manifests (A, B, base) and the reference's results of two earlier comparisons,
    A vs base and base vs B, under tmp_path/vs_eval: every image of A and B has its scores there, A's
    on the A side of its comparison and B's on the B side of its own."""
    rng = np.random.default_rng(3)
    models = {}
    for name, prompts in (("A", PROMPTS_A), ("B", PROMPTS_B), ("base", PROMPTS_BASE)):
        colours = [tuple(int(c) for c in rng.integers(0, 256, size=3)) for _ in prompts]
        manifest, records = reference_manifest(tmp_path / name, prompts, colours)
        # few distinct values, so that A and B tie on some prompts
        scores = {m: [float(v) for v in rng.choice([0.25, 0.5, 0.75, 1.0], size=len(prompts))]
                  for m in REFERENCE_NAMES}
        models[name] = (manifest, records, scores)
    outdir = tmp_path / "vs_eval"
    a_vs_base = write_reference_comparison(outdir, "0305-141502", ("A", *models["A"][1:]), ("base", *models["base"][1:]))
    base_vs_b = write_reference_comparison(outdir, "0306-093011", ("base", *models["base"][1:]), ("B", *models["B"][1:]))
    return {"models": models, "outdir": outdir, "folders": {"A": a_vs_base, "B": base_vs_b}}


def no_scorer(monkeypatch):
    """Every way to a reward model fails the test."""
    import eval.score
    import eval.scorers

    for module in (eval.score, eval.scorers):
        monkeypatch.setattr(module, "build_scorer", lambda metric, **kw: pytest.fail(f"{metric}: a scorer was built"))
    monkeypatch.setattr(eval.score, "score_manifest", lambda *a, **kw: pytest.fail("a manifest was scored"))


def expected_from_reference_rules(models, metric):
    (_, _, scores_a), (_, _, scores_b) = models["A"], models["B"]
    return reference_win_rate(PROMPTS_A, scores_a[metric], PROMPTS_B, scores_b[metric])


def test_versus_takes_every_score_from_the_references_pair_files_offline(earlier_comparisons, tmp_path, capsys,
                                                                         monkeypatch):
    """A vs B, never compared by the reference, from its results of A vs base and base vs B alone: no
    scorer is built, nothing is scored, and every win rate, count, mean, pairing and the macro and
    micro means equal the reference's rules applied to the scores in its pair files. One warning per
    manifest and metric names the pair file the scores came from; nothing is written beside the
    manifests."""
    models, folders = earlier_comparisons["models"], earlier_comparisons["folders"]
    manifest_a, manifest_b = models["A"][0], models["B"][0]
    before = {m: sorted(os.listdir(os.path.dirname(m))) for m in (manifest_a, manifest_b)}
    no_scorer(monkeypatch)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "vs"
    summary = main(["--json_a", manifest_a, "--json_b", manifest_b, "--label_a", "A", "--label_b", "B",
                    "--outdir", str(out), "--device", "cpu", "--scores_from", str(earlier_comparisons["outdir"])])
    printed = capsys.readouterr().out.splitlines()

    warnings = [line for line in printed if line.startswith("warning:")]
    assert len(warnings) == 2 * 5
    for name, manifest in (("A", manifest_a), ("B", manifest_b)):
        for metric in REFERENCE_NAMES:
            assert (f"warning: {manifest}: {metric} scores taken from the reference's pair file "
                    f"{folders[name] / f'pair_{metric}.json'}: scores used unverified: the file holds no record of "
                    f"the scorer or of the images behind them (--recompute scores again)") in warnings
    assert not [line for line in printed if "scoring" in line and not line.startswith("warning:")]
    assert {m: sorted(os.listdir(os.path.dirname(m))) for m in (manifest_a, manifest_b)} == before

    rates, counts = [], []
    for row in summary["metrics"]:
        expected = expected_from_reference_rules(models, row["metric"])
        pairs = json.load(open(out / f"pair_{row['metric']}.json"))
        for key in ("total_pairs", "wins_a", "wins_b", "ties", "win_rate_a_over_b", "mean_score_a", "mean_score_b"):
            assert pairs[key] == pytest.approx(expected[key]) and row[key] == pytest.approx(expected[key]), key
        assert [(r["prompt"], r["score_a"], r["score_b"]) for r in pairs["results"]] == expected["pairs"]
        assert pairs["unpaired"] == 2  # A's third "cat", B's "moon"
        rates.append(expected["win_rate_a_over_b"])
        counts.append(expected["total_pairs"])
    assert [row["metric"] for row in summary["metrics"]] == list(REFERENCE_NAMES)
    assert len(set(rates)) >= 3 and sum(row["ties"] for row in summary["metrics"]) > 0
    assert summary["averages"]["macro_win_rate_a_over_b"] == pytest.approx(sum(rates) / len(rates))
    assert summary["averages"]["micro_win_rate_a_over_b"] == pytest.approx(
        sum(r * n for r, n in zip(rates, counts)) / sum(counts))


def test_pair_file_paths_match_the_manifests_images_as_resolved(earlier_comparisons, tmp_path, capsys, monkeypatch):
    """B's manifest moved with its images and rewritten with paths relative to its folder, while the
    pair files hold the absolute paths the reference read: the images are the same files, so the
    scores are found (score.resolve_image's rules); the pair files are given as single files."""
    models, folders = earlier_comparisons["models"], earlier_comparisons["folders"]
    manifest_b, records_b, _ = models["B"]
    moved = tmp_path / "moved"
    moved.mkdir()
    images = os.path.basename(os.path.dirname(records_b[0]["gen_image_path"]))
    os.symlink(os.path.dirname(records_b[0]["gen_image_path"]), moved / images)  # the same files, another path
    relative = str(moved / os.path.basename(manifest_b))
    json.dump([{**r, "gen_image_path": os.path.join(images, os.path.basename(r["gen_image_path"]))}
               for r in records_b], open(relative, "w"))
    no_scorer(monkeypatch)
    monkeypatch.chdir(tmp_path)
    files = [str(folders[name] / f"pair_{m}.json") for name in ("A", "B") for m in ("clip", "hpsv2")]
    summary = main(["--json_a", models["A"][0], "--json_b", relative, "--label_a", "A", "--label_b", "B",
                    "--outdir", str(tmp_path / "vs"), "--device", "cpu", "--metrics", "clip", "hpsv2",
                    *[x for f in files for x in ("--scores_from", f)]])
    assert len([line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]) == 4
    for row in summary["metrics"]:
        assert row["win_rate_a_over_b"] == pytest.approx(
            expected_from_reference_rules(models, row["metric"])["win_rate_a_over_b"])


def test_eval_score_takes_the_pair_files_scores_too(earlier_comparisons, tmp_path, capsys, monkeypatch):
    """python -m eval.score with --scores_from: the means of A's and B's images are the means of their
    scores in the pair files, and no scorer is built."""
    from eval import score

    models = earlier_comparisons["models"]
    no_scorer(monkeypatch)
    means = score.main([models["A"][0], models["B"][0], "--table", str(tmp_path / "t.md"),
                        "--scores_from", str(earlier_comparisons["outdir"])])
    for name in ("A", "B"):
        manifest, _, scores = models[name]
        assert means[manifest] == pytest.approx({m: np.mean(scores[m]) for m in REFERENCE_NAMES})
    assert len([line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]) == 10


def edit_manifest(manifest, edit):
    records = json.load(open(manifest))
    edit(records)
    json.dump(records, open(manifest, "w"), indent=2)


def add_record(manifest):
    """A record whose image no earlier comparison scored."""
    from PIL import Image

    path = os.path.join(os.path.splitext(manifest)[0], "99_512x512.png")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    edit_manifest(manifest, lambda r: r.append({"prompt": "kite", "gen_image_path": path, "raw_image_path": "",
                                                 "metadata": {}}))


# (name, what changes after the reference's comparisons, extra flags, which (manifest, metric) must be scored,
#  a part of the line that says why)
FALLBACKS = [
    ("an image in no pair file", lambda c: add_record(c["models"]["A"][0]), [],
     {("A", m) for m in REFERENCE_NAMES}, "record 7: image {image} is in none of them; scoring"),
    ("another prompt", lambda c: edit_manifest(c["models"]["B"][0], lambda r: r[2].update(prompt="a moon")), [],
     {("B", m) for m in REFERENCE_NAMES}, "made for another manifest (record 2's prompt differs); scoring"),
    ("no pair file of the metric", lambda c: [os.remove(f / "pair_clip.json") for f in c["folders"].values()], [],
     {("A", "clip"), ("B", "clip")}, "no pair_clip.json among them; scoring"),
    ("--recompute", lambda c: None, ["--recompute"], {(s, m) for s in "AB" for m in REFERENCE_NAMES}, None),
]


@pytest.mark.parametrize("name, change, extra, expected, why", FALLBACKS, ids=[c[0] for c in FALLBACKS])
def test_what_the_pair_files_cannot_serve_is_scored(earlier_comparisons, tmp_path, capsys, monkeypatch,
                                                    name, change, extra, expected, why):
    """A manifest whose images are not all in the pair files, or are there with another prompt, is
    scored, with the reason; the other manifest still takes the pair files' scores. --recompute
    scores everything."""
    import eval.score

    c = earlier_comparisons
    change(c)
    calls = []

    def counting(metric, **kw):
        scorer = ColourScorer(metric, [])
        real = scorer.score
        scorer.score = lambda images, prompts: calls.append((metric, tuple(prompts))) or real(images, prompts)
        return scorer

    monkeypatch.setattr(eval.score, "build_scorer", counting)
    manifests = {side: c["models"][side][0] for side in "AB"}
    main(["--json_a", manifests["A"], "--json_b", manifests["B"], "--label_a", "A", "--label_b", "B",
          "--outdir", str(tmp_path / "vs"), "--device", "cpu", "--scores_from", str(c["outdir"]), *extra])
    printed = capsys.readouterr().out.splitlines()
    scored = {(side, metric) for side, m in manifests.items() for metric in REFERENCE_NAMES
              if os.path.exists(eval.score.score_path(m, metric))}
    assert scored == expected
    prompts = {side: tuple(r["prompt"] for r in json.load(open(m))) for side, m in manifests.items()}
    assert sorted(calls) == sorted((metric, p) for side, metric in expected
                                   for p in [prompts[side][i:i + 4] for i in range(0, len(prompts[side]), 4)])
    warned = {(side, line.split(": ")[2].split()[0]) for line in printed for side, m in manifests.items()
              if line.startswith(f"warning: {m}: ")}
    assert warned == {(s, m) for s in "AB" for m in REFERENCE_NAMES} - expected
    if why:
        image = os.path.join(os.path.splitext(manifests["A"])[0], "99_512x512.png")
        for side, metric in expected:
            assert (f"{manifests[side]}: {metric}: not taken from the reference's pair files (--scores_from): "
                    f"{why.format(image=image)}") in printed


def pair_file_edit(edit, name="pair_clip.json", text=lambda content: json.dumps(content, indent=2)):
    """Write a copy of A vs base's pair_clip.json, changed by `edit`, as `text` makes it, under `name` in a
    new comparison folder."""
    def make(c):
        content = json.load(open(c["folders"]["A"] / "pair_clip.json"))
        edit(content)
        folder = c["outdir"] / "A_vs_base_0401-000000"
        folder.mkdir()
        (folder / name).write_text(text(content))
        return str(folder / name)
    return make


def set_result(index, **fields):
    return pair_file_edit(lambda c: c["results"][index].update(fields))


def nudge(content, index, relative, side="b"):
    """Move result `index`'s score on `side` by `relative` of max(1, |score|)."""
    r = content["results"][index]
    r[f"score_{side}"] += relative * max(1.0, abs(r[f"score_{side}"]))


def drop_field(index, field):
    return pair_file_edit(lambda c: c["results"][index].pop(field))


# (name, the --scores_from path made from the fixture, what the one error line must say)
MALFORMED = [
    ("a name of no metric", pair_file_edit(lambda c: None, "pair_fid.json"),
     "not a pair file of the reference's test_vs.sh (the name must be pair_<metric>.json"),
    ("another name, given as a file", pair_file_edit(lambda c: None, "clip_results.json"), "the name must be"),
    ("truncated", pair_file_edit(lambda c: None, text=lambda c: json.dumps(c)[:200]), "not valid JSON"),
    ("a list", pair_file_edit(lambda c: None, text=lambda c: json.dumps(c["results"])), "(a JSON list, not an object)"),
    ("no label", pair_file_edit(lambda c: c.pop("model_b")), "(no 'model_b' label)"),
    ("no results", pair_file_edit(lambda c: c.update(results=[])), "(no 'results' list of pairs)"),
    ("a score missing", drop_field(1, "score_b"), "(result 1 has no numeric 'score_b')"),
    ("a score as text", set_result(2, score_a="0.5"), "(result 2 has no numeric 'score_a')"),
    ("a score that is NaN", set_result(0, score_b=float("nan")), "(result 0 has no numeric 'score_b')"),
    ("no image", set_result(3, image_a=""), "(result 3 has no text 'image_a')"),
    ("a result that is not an object", pair_file_edit(lambda c: c["results"].append(7)), "is not an object"),
    ("an image with two scores", set_result(4, score_b=7.0), "has two clip scores: "),
    ("two scores beyond rounding", pair_file_edit(lambda c: nudge(c, 4, 1.5e-3)), "has two clip scores: "),
    ("an image with two prompts", set_result(4, prompt="a cat"), "has two clip prompts: "),
    ("a folder without pair files", lambda c: str(c["outdir"].parent / "A"), "no pair_<metric>.json file under"),
    ("no such file", lambda c: str(c["outdir"] / "pair_clip.json"), "no such file"),
]


@pytest.mark.parametrize("name, make, problem", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_a_malformed_pair_file_ends_in_one_error_line(earlier_comparisons, tmp_path, capsys, monkeypatch,
                                                      name, make, problem):
    """Anything that is not the reference's pair file, and an image given two scores (or prompts) for
    one metric, is refused in one `error:` line with exit status 2, before anything is scored or
    written. The whole folder is read, so a bad file anywhere under it is found."""
    c = earlier_comparisons
    path = make(c)
    no_scorer(monkeypatch)
    source = path if name in ("another name, given as a file", "a folder without pair files", "no such file") \
        else str(c["outdir"])
    with pytest.raises(SystemExit) as stop:
        main(["--json_a", c["models"]["A"][0], "--json_b", c["models"]["B"][0], "--outdir", str(tmp_path / "vs"),
              "--device", "cpu", "--scores_from", source])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert stop.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: --scores_from") and problem in err[0], err[0]
    assert not os.path.exists(tmp_path / "vs")


def test_scores_that_differ_by_batch_rounding_are_one(earlier_comparisons, tmp_path, capsys, monkeypatch):
    """The same image scored in two of the reference's comparisons went through the scorer in other
    batches: scores within 1e-3 (relative) are taken as one, the first file's is used and one line
    says by how much they differed; further apart is refused (the malformed cases above)."""
    c = earlier_comparisons
    pair_file_edit(lambda content: nudge(content, 4, 5e-4, "a"))(c)  # a later folder: read after A vs base's
    no_scorer(monkeypatch)
    first = json.load(open(c["folders"]["A"] / "pair_clip.json"))["results"][4]
    summary = main(["--json_a", c["models"]["A"][0], "--json_b", c["models"]["B"][0], "--label_a", "A",
                    "--label_b", "B", "--outdir", str(tmp_path / "vs"), "--device", "cpu",
                    "--scores_from", str(c["outdir"])])
    printed = capsys.readouterr().out
    gap = 5e-4 * max(1.0, abs(first["score_a"]))
    assert f"some images have clip scores in several pair files that differ by up to {gap:.3g}" in printed
    clip = json.load(open(tmp_path / "vs" / "pair_clip.json"))["results"]
    used = {r["image_a"]: r["score_a"] for r in clip} | {r["image_b"]: r["score_b"] for r in clip}
    assert used[first["image_a"]] == first["score_a"]  # A's image, with the first file's score
    assert summary["metrics"]
