"""The kvsift command: listing, bad input (clear error, exit code 2), a real run."""

import json
import subprocess
import sys

import pytest

from kvsift.cli import main
from tests.conftest import SMALL_MODEL, needs_model


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "kvsift.cli", *args], capture_output=True, text=True, timeout=300)


def test_methods_lists_registry(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("full", "streaming", "snapkv", "pyramidkv"):
        assert name in out


@pytest.mark.parametrize("name,joins,mode,host", [
    ("full", "yes", "graph", "no"), ("squeezed", "yes", "graph", None), ("shadowkv", "yes", None, "yes"),
    ("kivi", "yes", None, "no"), ("h2o", "at one token budget", "eager", "no"), ("decoding", "yes", "eager", "no")])
def test_methods_name_says_what_it_means_for_serving(capsys, name, joins, mode, host):
    from kvsift.cli import serving_traits

    assert main(["methods", name]) == 0
    out = capsys.readouterr().out
    t = serving_traits(name)
    assert f"  joins running batches: {t['joins running batches']}" in out
    assert t["joins running batches"].startswith(joins)
    assert mode is None or t["fastest decode mode"].startswith(mode)
    assert host is None or t["host memory"].startswith(host)


def test_methods_name_says_what_a_prefix_store_saves():
    from kvsift.cli import serving_traits

    assert serving_traits("kvzip")["shares prefix"].endswith("its reread passes run once per prompt, for every budget")
    snap = serving_traits("snapkv")["shares prefix"]
    assert snap.startswith("yes") and "reread" not in snap
    assert serving_traits("chunked")["shares prefix"].startswith("no")


@pytest.mark.parametrize("args,msg", [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--method", "snapkv", "--budget", "0"], "budget must be >= 1"),
    (["--method", "snapkv", "--budget", "150%"], "percentage"),
    (["--method", "snapkv"], "needs a budget"),
    (["--method", "snapkv", "--budget", "8", "--method-opt", "bogus=1"], "unknown option"),
])
def test_bad_method_or_budget_fails_fast(tmp_path, capsys, args, msg):
    doc = tmp_path / "doc.txt"
    doc.write_text("hello world")
    assert main(["generate", "--prompt-file", str(doc), *args]) == 2
    assert msg in capsys.readouterr().err


def test_missing_prompt_file(capsys):
    assert main(["generate", "--prompt-file", "/nonexistent/doc.txt"]) == 2
    assert "prompt file not found" in capsys.readouterr().err


@pytest.mark.real
@needs_model(SMALL_MODEL)
def test_generate_real_model_with_summary(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("The lighthouse keeper's cat is named Pepper. " * 3)
    r = run_cli("generate", "--prompt-file", str(doc), "--question", "What is the cat's name?",
                "--method", "snapkv", "--budget", "32", "--max-tokens", "12", "--model", SMALL_MODEL)
    assert r.returncode == 0, r.stderr
    assert "Pepper" in r.stdout
    assert "[kvsift]" in r.stderr and "KV kept" in r.stderr


@pytest.mark.real
@needs_model(SMALL_MODEL)
def test_budget_larger_than_context_and_too_long_prompt(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("short document")
    r = run_cli("generate", "--prompt-file", str(doc), "--method", "snapkv", "--budget", "5000", "--json",
                "--model", SMALL_MODEL)
    assert r.returncode == 2 and "larger than the context" in r.stderr and r.stdout == ""
    doc.write_text("word " * 9000)  # SmolLM2 allows 8192 tokens
    r = run_cli("generate", "--prompt-file", str(doc), "--max-tokens", "2", "--model", SMALL_MODEL)
    assert r.returncode == 2 and "exceeds the model's limit" in r.stderr


@pytest.mark.real
@needs_model(SMALL_MODEL)
def test_json_output(tmp_path):
    r = run_cli("generate", "--prompt", "Say hi.", "--max-tokens", "4", "--json", "--model", SMALL_MODEL)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["stats"]["generated_tokens"] >= 1 and "text" in data


def test_every_environment_variable_the_package_reads_is_in_the_readme_table():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    read = set()
    for f in (root / "kvsift").rglob("*.py"):
        read |= set(re.findall(r"environ(?:\.get)?\(?\[?\"(KVSIFT_[A-Z_]+)\"", f.read_text(encoding="utf-8")))
    table = re.findall(r"^\| `(KVSIFT_[A-Z_]+)` \|", (root / "README.md").read_text(encoding="utf-8"), re.M)
    assert "KVSIFT_PREFILL_CUDNN" in read and len(read) >= 9
    assert read <= set(table), sorted(read - set(table))
