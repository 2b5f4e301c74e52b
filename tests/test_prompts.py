"""The prompt suites: the shipped files, evaluation reading them without building anything, and the
builders reproducing them from each upstream format (Parti on its own TSV where it is available)."""

import hashlib
import json
import os
import shutil

import pytest

import eval.prompts as prompts
from conftest import ROOT
from eval.prompts import ensure_suite, main, parse_parti_tsv, parti_record, record, write_suite
from sdpo.errors import InputError

SHIPPED = {name: os.path.join(ROOT, "prompts", f"{name}.json") for name in ("papv2", "hpsv2", "partiprompts")}
# Published with the reference's files: sha256 of the prompts joined by "\n", and the sizes.
FINGERPRINTS = {
    "papv2": "b2fad8d9a1c532cff01e6883953075d09407a9d4db553c4e3c4b8d368d4fadf3",
    "hpsv2": "6bacc5f43dab0d8357e22486d2f35173bcb75787b4474dfa5ce56bc02543340a",
    "partiprompts": "75f9a6570ffb3ccbaefbe32c91606a87ca62ea60d5818232d83caff9bba63d80",
}
SIZES = {"papv2": 487, "hpsv2": 3200, "partiprompts": 1632}
KEYS = {"papv2": ["prompt", "gen_image_path", "raw_image_path", "metadata"],
        "hpsv2": ["prompt", "gen_image_path", "raw_image_path", "metadata"],
        "partiprompts": ["prompt", "neg_prompt", "raw_image_path", "metadata"]}
# Parti's own file, beside the checkout in the project's shared data (a plain clone lacks it).
PARTI_TSV = os.path.join(ROOT, "..", "shared", "data", "upstream", "PartiPrompts.tsv")


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def run_cli(capsys, *argv):
    """eval.prompts' command line; returns (exit status, stdout, stderr)."""
    try:
        main(list(argv))
        status = 0
    except SystemExit as stop:
        status = stop.code
    out = capsys.readouterr()
    return status, out.out, out.err


# ---- the shipped files ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_suite_has_the_published_fingerprint_size_and_layout(name, tmp_path):
    raw = read_bytes(SHIPPED[name])
    suite = json.loads(raw)
    assert len(suite) == SIZES[name]
    joined = "\n".join(r["prompt"] for r in suite).encode("utf-8")
    assert hashlib.sha256(joined).hexdigest() == FINGERPRINTS[name]
    assert prompts.fingerprint(suite) == prompts.FINGERPRINTS[name] == FINGERPRINTS[name]
    assert all(list(r) == KEYS[name] and r["metadata"] == {} and r["raw_image_path"] == "" for r in suite)
    # Our writer, with the suite's setting, gives back the very same bytes (indent 2, no final newline).
    write_suite(suite, str(tmp_path / "again.json"), ensure_ascii=prompts.ENSURE_ASCII[name])
    assert read_bytes(tmp_path / "again.json") == raw
    assert raw.endswith(b"\n  }\n]")
    assert raw.isascii() == (name != "papv2")  # hpsv2 and partiprompts escape non-ASCII, papv2 does not


def test_records_have_the_reference_layouts():
    assert record("a cat") == {"prompt": "a cat", "gen_image_path": "", "raw_image_path": "", "metadata": {}}
    assert parti_record("a cat") == {"prompt": "a cat", "neg_prompt": "", "raw_image_path": "", "metadata": {}}


def test_ensure_suite_returns_the_shipped_files_without_building(monkeypatch):
    def no_building(source):
        raise AssertionError(f"a builder ran (source {source!r})")

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    for name in SHIPPED:
        monkeypatch.setitem(prompts.BUILDERS, name, no_building)
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    before = {name: (os.path.getmtime(path), read_bytes(path)) for name, path in SHIPPED.items()}
    for name, path in SHIPPED.items():
        assert os.path.samefile(ensure_suite(name), path)
    assert before == {name: (os.path.getmtime(path), read_bytes(path)) for name, path in SHIPPED.items()}


def test_ensure_suite_builds_only_a_missing_file(monkeypatch, tmp_path):
    calls = []

    def fake_hpsv2(source):
        calls.append(source)
        return [record("caf\u00e9"), record("a dog")]

    monkeypatch.setattr(prompts, "PROMPTS_DIR", str(tmp_path))
    monkeypatch.setitem(prompts.BUILDERS, "hpsv2", fake_hpsv2)
    path = ensure_suite("hpsv2", source="local-copy")
    assert path == str(tmp_path / "hpsv2.json") and calls == ["local-copy"]
    assert b'"caf\\u00e9"' in read_bytes(path)  # written as the shipped hpsv2.json is: ASCII-escaped
    assert ensure_suite("hpsv2", source="local-copy") == path and calls == ["local-copy"]  # not built again


# ---- Parti ----------------------------------------------------------------------------------------

def test_parti_parser_unquotes_a_quoted_start_and_keeps_inner_quotes():
    text = ("Prompt\tCategory\tChallenge\tNote\n"
            "bond\tAbstract\tBasic\tBiology-inspired\n"
            '"G I G G L E" painted on a wall\tIllustrations\tWriting & Symbols\t\n'
            'The words "Fly" on a wall\tOutdoor Scenes\tComplex\t\n'
            "a caf\u00e9 at night\tOutdoor Scenes\tBasic\t\n")
    suite = parse_parti_tsv(text)
    assert [r["prompt"] for r in suite] == ["bond", "G I G G L E painted on a wall", 'The words "Fly" on a wall',
                                            "a caf\u00e9 at night"]
    assert suite[1] == parti_record("G I G G L E painted on a wall")
    with pytest.raises(InputError, match="Prompt"):
        parse_parti_tsv("foo\tbar\n")
    with pytest.raises(InputError, match="line 3: expected 4"):
        parse_parti_tsv("Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\nlife\tAbstract\n")


def test_parti_builder_reproduces_the_shipped_file_from_partis_tsv(tmp_path, capsys):
    if not os.path.isfile(PARTI_TSV):
        pytest.skip("Parti's PartiPrompts.tsv is not available: it is in the project's shared data folder "
                    "beside the checkout, which a plain clone does not have")
    out = tmp_path / "partiprompts.json"
    status, stdout, _ = run_cli(capsys, "--suite", "partiprompts", "--source", PARTI_TSV, "--output", str(out))
    assert status == 0 and "1632 prompts" in stdout and "identical prompts to the shipped suite" in stdout
    assert read_bytes(out) == read_bytes(SHIPPED["partiprompts"])
    giggle = json.loads(read_bytes(out))[1560]["prompt"]
    assert giggle.startswith("G I G G L E painted in thick ")


# ---- HPDv2 and Pick-a-Pic, on fixtures in their upstream formats ----------------------------------

HPS_FIXTURE = {"anime": ["a fox in a forest", "same"], "concept-art": ["caf\u00e9 on Mars", "same"],
               "paintings": ["same"], "photo": ["a red bus", "same", "a red bus"]}


@pytest.mark.parametrize("layout", ["benchmark", "flat"])
def test_hpsv2_builder_concatenates_the_four_styles_in_order(tmp_path, capsys, layout):
    folder = tmp_path / "HPDv2"
    styles = folder / "benchmark" if layout == "benchmark" else folder
    styles.mkdir(parents=True)
    for style in ("photo", "paintings", "anime", "concept-art"):  # written out of order: the order is fixed
        (styles / f"{style}.json").write_text(json.dumps(HPS_FIXTURE[style]), encoding="utf-8")
    out = tmp_path / "hpsv2.json"
    status, stdout, _ = run_cli(capsys, "--suite", "hpsv2", "--source", str(folder), "--output", str(out))
    assert status == 0 and "8 prompts" in stdout and "NOT the shipped suite's prompts" in stdout
    prompts_in_order = ["a fox in a forest", "same", "caf\u00e9 on Mars", "same", "same", "a red bus", "same",
                        "a red bus"]
    raw = read_bytes(out)
    assert json.loads(raw) == [{"prompt": p, "gen_image_path": "", "raw_image_path": "", "metadata": {}}
                               for p in prompts_in_order]
    assert raw.startswith(b'[\n  {\n    "prompt": "a fox in a forest",\n    "gen_image_path": "",\n'
                          b'    "raw_image_path": "",\n    "metadata": {}\n  },\n  {\n')
    assert b'"prompt": "caf\\u00e9 on Mars"' in raw and raw.endswith(b'"metadata": {}\n  }\n]')
    assert raw == json.dumps(json.loads(raw), indent=2).encode("ascii")


def test_hpsv2_builder_names_a_missing_style(tmp_path):
    (tmp_path / "anime.json").write_text("[]")
    with pytest.raises(InputError, match="concept-art.json"):
        prompts.build_hpsv2(str(tmp_path))


def pickapic_table(captions):
    import pyarrow as pa

    n = len(captions)
    return pa.table({"caption": captions, "jpg_0": [b"\xff\xd8"] * n, "jpg_1": [b"\xff\xd8"] * n,
                     "label_0": [1.0, 0.0, 0.5, 1.0, 0.0, 1.0][:n], "label_1": [0.0, 1.0, 0.5, 0.0, 1.0, 0.0][:n]})


def test_papv2_builder_keeps_unique_test_captions_in_first_seen_order(tmp_path, capsys):
    import pyarrow.parquet as pq

    data = tmp_path / "pickapic_v2_no_images" / "data"
    data.mkdir(parents=True)
    pq.write_table(pickapic_table(["b cat", "a caf\u00e9", "b cat", "c dog"]), data / "test-00000-of-00002.parquet")
    pq.write_table(pickapic_table(["c dog", "d owl", "a caf\u00e9"]), data / "test-00001-of-00002.parquet")
    pq.write_table(pickapic_table(["train only"]), data / "train-00000-of-00001.parquet")  # not the test split
    out = tmp_path / "papv2.json"
    status, stdout, _ = run_cli(capsys, "--suite", "papv2", "--source", str(data.parent), "--output", str(out))
    assert status == 0 and "4 prompts" in stdout
    expected = [{"prompt": p, "gen_image_path": "", "raw_image_path": "", "metadata": {}}
                for p in ["b cat", "a caf\u00e9", "c dog", "d owl"]]
    raw = read_bytes(out)
    assert json.loads(raw) == expected
    assert '"prompt": "a caf\u00e9"'.encode("utf-8") in raw  # UTF-8, not escaped, as in the shipped papv2.json
    assert raw == json.dumps(expected, indent=2, ensure_ascii=False).encode("utf-8")
    # One parquet file works as a source too.
    single = prompts.build_papv2(str(data / "test-00000-of-00002.parquet"))
    assert [r["prompt"] for r in single] == ["b cat", "a caf\u00e9", "c dog"]


# ---- the command line -----------------------------------------------------------------------------

def test_cli_refuses_to_replace_a_shipped_file_without_force(tmp_path, capsys, monkeypatch):
    def no_building(source):
        raise AssertionError("built before refusing")

    monkeypatch.setitem(prompts.BUILDERS, "partiprompts", no_building)
    before = read_bytes(SHIPPED["partiprompts"])
    for argv in ([], ["--output", SHIPPED["partiprompts"]]):
        status, _, err = run_cli(capsys, "--suite", "partiprompts", *argv)
        assert status == 2
        assert err.startswith("error: ") and "--force" in err and err.count("\n") == 1
    assert read_bytes(SHIPPED["partiprompts"]) == before

    # --force replaces it; shown on a copy of prompts/ so that the real files stay untouched.
    copy = tmp_path / "prompts"
    shutil.copytree(os.path.join(ROOT, "prompts"), copy)
    monkeypatch.setattr(prompts, "PROMPTS_DIR", str(copy))
    monkeypatch.setitem(prompts.BUILDERS, "partiprompts", lambda source: [parti_record("bond")])
    assert run_cli(capsys, "--suite", "partiprompts")[0] == 2
    status, stdout, _ = run_cli(capsys, "--suite", "partiprompts", "--force")
    assert status == 0 and "1 prompts" in stdout
    assert json.loads(read_bytes(copy / "partiprompts.json")) == [parti_record("bond")]
    assert read_bytes(SHIPPED["partiprompts"]) == before
