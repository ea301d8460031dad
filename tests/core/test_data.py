"""Text sets: extraction reproduces the shared eval files; digests are enforced."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from kvant.data import TEXT_SETS, conllu_to_text, get_mix, get_text, paragraphs
from kvant.errors import DataError
from tests.conftest import EVAL_DIR, EVAL_FILES, UD_DIR


@pytest.mark.parametrize("name", sorted(EVAL_FILES))
def test_extraction_matches_shared_eval_text_byte_for_byte(name, shared_data, tmp_path):
    text = get_text(name, tmp_path, data_dir=UD_DIR)
    expected = (EVAL_DIR / EVAL_FILES[name]).read_bytes()
    assert text.path.read_bytes() == expected
    assert text.pinned and text.sha256 == TEXT_SETS[name].sha256


def test_sha256_mismatch_is_refused(shared_data, tmp_path):
    data_dir = tmp_path / "ud"
    data_dir.mkdir()
    raw = (UD_DIR / TEXT_SETS["sme"].file).read_bytes()
    (data_dir / TEXT_SETS["sme"].file).write_bytes(raw.replace(b"# text = ", b"# text =  ", 1))
    with pytest.raises(DataError, match="sha256 mismatch"):
        get_text("sme", tmp_path / "cache", data_dir=data_dir)
    assert not (tmp_path / "cache" / "text").exists()  # nothing was extracted from it


def test_corrupt_cached_download_is_deleted_not_used(tmp_path):
    text_set = TEXT_SETS["dan"]
    cached = tmp_path / "raw" / text_set.commit[:12] / text_set.file
    cached.parent.mkdir(parents=True)
    cached.write_text("# text = not the treebank\n", encoding="utf-8")
    with pytest.raises(DataError, match="sha256 mismatch"):
        get_text("dan", tmp_path)
    assert not cached.exists()


def test_missing_file_in_data_dir_names_the_file(tmp_path):
    with pytest.raises(DataError, match="no_nynorsk-ud-test.conllu"):
        get_text("nno", tmp_path, data_dir=tmp_path)


def test_unknown_set_suggests_the_nearest(tmp_path):
    with pytest.raises(DataError, match="did you mean 'nno'"):
        get_text("nnoo", tmp_path)


def test_local_text_files_and_bad_encoding(tmp_path):
    good = tmp_path / "mine.txt"
    good.write_text("Hei.\n", encoding="utf-8")
    local = get_text(good, tmp_path)
    assert local.path == good and local.sha256 == hashlib.sha256(b"Hei.\n").hexdigest()
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("blåbær".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        get_text(bad, tmp_path)


def test_unpinned_sets_record_the_digest_of_what_was_used(tmp_path):
    # The UD train splits cannot be pinned in advance: the digest is recorded in the cache.
    data_dir = tmp_path / "ud"
    data_dir.mkdir()
    conllu = "# newpar\n# text = Første setning.\n# text = Andre.\n"
    (data_dir / TEXT_SETS["nob-train"].file).write_text(conllu, encoding="utf-8")
    text = get_text("nob-train", tmp_path / "cache", data_dir=data_dir)
    digest = hashlib.sha256(conllu.encode()).hexdigest()
    assert text.sha256 == digest and not text.pinned
    record = tmp_path / "cache" / "raw" / "recorded-sha256" / "nob-train.sha256"
    assert record.read_text().startswith(digest)
    assert text.read() == "Første setning. Andre.\n"


def test_mix_interleaves_paragraphs_round_robin(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a1\n\na2\n\na3\n", encoding="utf-8")
    b.write_text("b1\nb2\n", encoding="utf-8")
    mix = get_mix(f"{a},{b}", tmp_path / "cache")
    assert paragraphs(mix.read()) == ["a1", "b1", "a2", "b2", "a3"]
    assert mix.name == "a+b"


def test_weighted_mix_follows_character_shares(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(f"a{i:03d}" for i in range(100)) + "\n", encoding="utf-8")
    b.write_text("\n".join(f"b{i:03d}" for i in range(100)) + "\n", encoding="utf-8")
    units = paragraphs(get_mix(f"{a}:0.75,{b}:0.25", tmp_path / "cache").read())
    share_a = sum(u.startswith("a") for u in units) / len(units)
    assert abs(share_a - 0.75) < 0.02
    assert units[:4] == ["a000", "b000", "a001", "a002"]
    with pytest.raises(DataError, match="must be positive"):
        get_mix(f"{a}:0", tmp_path / "cache")
    with pytest.raises(DataError, match="'.*a.txt' is -0.3; shares must be positive"):
        get_mix(f"{a}:-0.3,{b}:0.5", tmp_path / "cache")
    with pytest.raises(DataError, match="add up to 1.5; they are fractions"):
        get_mix(f"{a}:1,{b}:0.5", tmp_path / "cache")
    with pytest.raises(DataError, match="gives shares to some texts only"):
        get_mix(f"{a}:0.5,{b}", tmp_path / "cache")


def test_conllu_without_markers_gives_one_sentence_per_line():
    conllu = "# text = En_to  tre.\n1\tx\n\n# text = Fire.\n"
    assert conllu_to_text(conllu, underscores_to_spaces=True) == "En to tre.\nFire.\n"
    assert conllu_to_text(conllu) == "En_to tre.\nFire.\n"


def test_data_dir_files_are_not_copied(shared_data, tmp_path):
    # Offline mode reads the folder in place; the cache gets only the extracted text.
    get_text("swe", tmp_path / "cache", data_dir=UD_DIR)
    assert not (tmp_path / "cache" / "raw" / TEXT_SETS["swe"].commit[:12]).exists()
    shutil.rmtree(tmp_path / "cache")
