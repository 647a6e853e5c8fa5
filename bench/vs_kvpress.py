#!/usr/bin/env python
"""kvsift's tasks through NVIDIA kvpress (https://github.com/NVIDIA/kvpress), side by side.

    python bench/vs_kvpress.py --suite standard --model /root/m/qwen2.5-coder-1.5b.gguf \
        --wheels .whl/kvpress --out results/kvpress.jsonl --max-minutes 8
    python bench/vs_kvpress.py --tasks niah --lengths 1024,2048 --budgets 0.1,0.25,0.5 --out results/results.jsonl
    kvsift bench report results/*.jsonl --out results/report    # kvsift + kvpress rows, one table

What it does:

1. Sets up a separate venv (default ``.venv-kvpress`` in the repo, ignored by git) with
   ``--system-site-packages`` so it reuses the installed torch, and installs ``kvpress==0.5.5``
   with ``transformers==5.2.0`` pinned inside it (kvpress 0.5.5 declares ``transformers<5.3,>=4.56``;
   the main environment has a newer transformers). ``--wheels DIR`` installs them offline from a
   wheel directory (``pip install --no-index --find-links DIR``; fill it on a machine with network
   with ``bench/download_kvpress_wheels.sh DIR``). Idempotent.
2. Resolves ``--model`` like kvsift does (``smollm2``, an HF directory or a ``.gguf`` file, which
   ``kvsift.models`` converts once into an HF directory: the same weights and tokenizer file).
3. Re-runs itself inside the venv as a worker that builds the *same* samples with
   ``kvsift.eval.tasks`` (same tokenizer file, same chat template, same seeds, same sample ids:
   ``--suite`` takes the suite's tasks, lengths, budgets, samples and depths), runs them through
   kvpress presses and appends rows in kvsift's schema (methods named ``kvpress:<press>``) through
   the same resumable runner (``--max-minutes`` cuts a run into parts as for ``kvsift bench run``).
   Prompts of equal length run as one batch (``--batch-size``, auto on CUDA; kvpress compresses
   every row of a batch alike and takes no padding mask, so mixed lengths run one at a time).

Budget mapping, at equal KV entries (so equal KV bytes for the same dtype): kvpress's
``compression_ratio`` is the fraction *removed*; for a prompt of ``n`` tokens the worker prefills
all ``n`` under a prefill press keeping ``k``, the first new token taken from that forward's last
position (as kvsift's prefill does: attention over the whole prompt there, the cache compressed
after it), where ``k`` is what kvsift keeps per layer and KV head for that budget (ratio ->
ceil(ratio * n), tokens -> min(budget, n)). So both compress the whole prompt (question
included) to the same number of KV entries per head (PyramidKV: on average over layers), scored
by queries that end at the same last token. (``full`` and the decode-time presses prefill ``n - 1``
tokens and feed the last one; until 2026-12-04 every press did, see :func:`press_scores_prompt`;
rows record which in ``settings["press_prefill"]``.) For
``ppl`` the whole context is compressed to ``k`` and the continuation is teacher-forced one token at
a time, as in kvsift (samples of one length as one batch: ``KvpressBackend.score_batch``). Presses keep their kvpress defaults (e.g. SnapKV window 64, kvsift's is 32).
``--compress context`` (the query-agnostic setting, kvpress's own pipeline semantics): the sample
is split once by the runner into context ids and question ids (the same ids kvsift gets); all
``c`` context tokens are prefilled under the press keeping ``k`` of them (``k`` from the same rule
on the *context* length: ratio -> ceil(ratio * c), tokens -> min(budget, c); compression_ratio
``1 - (k + 0.5)/c``), then the question ids are fed uncompressed at positions ``c, c+1, ...`` and
the answer decoded greedily, as ``KVPressTextGenerationPipeline`` does (a decode-time press: the
context is prefilled without it, the question and the answer run under it with ``target_size = k``).
KV bytes are the context cache's after its prefill. kvsift does the same through
``LLM.prefill_context`` + ``generate(..., context=ctx)``.
Note that kvpress's StreamingLLMPress compresses only at prefill (the cache then grows during
decode) whereas kvsift's ``streaming`` keeps rolling.

Presses (``PRESSES``, built by :func:`build_press`; kvpress 0.5.5's classes and arguments):
``full snapkv streaming pyramidkv expected_attention tova knorm`` (``compression_ratio``),
``h2o`` (ObservedAttentionPress: its prefill runs with eager attention, for the weights),
``adakv`` / ``adakv(<scorer>)`` (AdaKVPress around the scorer, default SnapKV), ``duo``
(DuoAttentionPress, ``head_compression_ratio`` from the budget, head scores computed on the fly
over local texts: kvpress would fetch patterns or BookSum from the network), ``kvzip``
(KVzipPress, one sequence per call) and ``decoding`` / ``decoding(<scorer>)`` (DecodingPress,
``target_size`` = the kept entries, default scorer TOVA, every ``--decoding-interval`` steps, on
from the last prompt token). kvpress's head-wise presses (adakv, duo, kvzip) only mask keys: their
rows hold 100% of the KV bytes (``kv_device_bytes``) and attend ``kv_kept_bytes`` of them.
``--wheels`` takes the full wheel set or the ``--minimal`` one of ``download_kvpress_wheels.sh``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
KVPRESS = "kvpress==0.5.5"
TRANSFORMERS_PIN = "transformers==5.2.0"
@dataclass(frozen=True)
class PressSpec:
    """How one of our method names maps onto kvpress 0.5.5 (read from its source).

    ``budget``: how the kept entries ``k`` become press arguments: ``ratio`` (``compression_ratio``,
    the fraction removed), ``heads`` (DuoAttention's ``head_compression_ratio``, the fraction of
    streaming heads), ``target`` (DecodingPress's ``target_size``) or ``none``. ``inner``: the
    default scorer of a wrapper (``adakv`` = ``adakv(snapkv)``), ``inners`` the scorers it takes.
    ``masked``: a head-wise press that only *masks* keys (kvpress's attention patch swaps them for
    fake keys at decode): every KV entry stays allocated. ``eager``: needs attention weights
    (prefill runs with ``attn_implementation="eager"``). ``batch1``: one sequence per call.
    ``decode``: acts at decode, so the press stays on for the whole generation."""

    cls: str | None
    budget: str = "ratio"
    inner: str | None = None
    inners: tuple[str, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()
    masked: bool = False
    eager: bool = False
    batch1: bool = False
    decode: bool = False


# scorers a wrapper may take: ScorerPress subclasses whose score works inside that wrapper. kvpress's
# DecodingPress scores with the hidden states of the steps since its last compression (one with
# --decoding-interval 1), so SnapKV (needs > window_size of them) and ExpectedAttention (needs
# > n_sink) do not work there; TOVA (the last query's attention, TOVA's own decode-time rule),
# KNorm and StreamingLLM do.
ADAKV_SCORERS = ("snapkv", "tova", "expected_attention", "knorm", "streaming")
DECODING_SCORERS = ("tova", "knorm", "streaming")

PRESSES: dict[str, PressSpec] = {  # our name -> kvpress press (cls None = no press, the full cache
    "full": PressSpec(None, budget="none"),  # through the same code path)
    "snapkv": PressSpec("SnapKVPress"),
    "streaming": PressSpec("StreamingLLMPress"),
    "pyramidkv": PressSpec("PyramidKVPress"),
    "expected_attention": PressSpec("ExpectedAttentionPress"),
    "tova": PressSpec("TOVAPress"),
    "knorm": PressSpec("KnormPress"),
    "h2o": PressSpec("ObservedAttentionPress", eager=True),
    "adakv": PressSpec("AdaKVPress", inner="snapkv", inners=ADAKV_SCORERS, masked=True),
    "duo": PressSpec("DuoAttentionPress", budget="heads", kwargs=(("on_the_fly_scoring", True),), masked=True),
    "kvzip": PressSpec("KVzipPress", masked=True, batch1=True),
    "decoding": PressSpec("DecodingPress", budget="target", inner="tova", inners=DECODING_SCORERS, decode=True),
}
DEFAULT_PRESSES = "full,snapkv,streaming,pyramidkv,expected_attention"
# DuoAttentionPress's on-the-fly mode fixes these (kvpress 0.5.5, post_init_from_model)
DUO_SINK, DUO_RECENT = 128, 256


def _labels():
    """``kvsift/eval/labels.py`` loaded on its own (the kvpress venv cannot import ``kvsift``'s
    engine): bracketed options and comma lists that keep them, as ``kvsift bench run`` reads them."""
    import importlib.util

    name = "_kvsift_labels"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "kvsift" / "eval" / "labels.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def split_presses(text: str) -> list[str]:
    """``--presses``: comma-separated labels, commas inside brackets kept (``snapkv[window_size=32,kernel_size=7]``)."""
    return _labels().split_items(text)


def press_options(name: str) -> dict[str, Any]:
    """A press label's bracketed options, passed to the press's constructor (to the scorer of a
    wrapper): ``"snapkv[window_size=32]"`` -> ``{"window_size": 32}``; the whole label names the rows
    (``kvpress:snapkv[window_size=32]``), so kvpress's SnapKV with kvsift's window is a cell of its own."""
    return _labels().split_label(name.split(":", 1)[-1].strip())[1]


def parse_press(name: str) -> tuple[str, PressSpec, str | None]:
    """``"adakv(tova)"`` -> ``("adakv", spec, "tova")``; ``"adakv"`` -> its default scorer (options
    in brackets, :func:`press_options`, are not part of the name); raises ValueError with what is
    available."""
    name = _labels().split_label(name.split(":", 1)[-1].strip())[0]
    outer, _, rest = name.partition("(")
    if outer not in PRESSES:
        raise ValueError(f"unknown press {name!r}; available: {', '.join(PRESSES)} "
                         f"(wrappers: adakv(<{'|'.join(ADAKV_SCORERS)}>), decoding(<{'|'.join(DECODING_SCORERS)}>))")
    spec = PRESSES[outer]
    inner = spec.inner
    if rest:
        if not rest.endswith(")") or not spec.inners:
            raise ValueError(f"press {name!r}: only adakv(...) and decoding(...) take a scorer")
        inner = rest[:-1].strip()
        if inner not in spec.inners:
            raise ValueError(f"press {name!r}: {outer} takes one of {', '.join(spec.inners)}, not {inner!r}")
    return outer, spec, inner


def compression_ratio(keep: int, n: int) -> float:
    """kvpress keeps ``int(n * (1 - ratio))`` entries (``compute_n_kept``): aim half a token above
    ``keep`` against float rounding."""
    return min(max(1.0 - (keep + 0.5) / n, 0.0), 0.999)


def duo_head_ratio(keep: int, n: int, sink: int = DUO_SINK, recent: int = DUO_RECENT) -> float:
    """DuoAttention's ``head_compression_ratio`` keeping ``keep`` of ``n`` entries per KV head on
    average: a streaming head keeps ``sink + recent``, a retrieval head all ``n``, so the fraction
    of streaming heads is ``(n - keep) / (n - sink - recent)`` (1 when even all streaming heads keep
    more than ``keep``; 0 when the prompt is no longer than the window: nothing to mask)."""
    if n <= sink + recent:
        return 0.0
    return min(max((n - keep) / (n - sink - recent), 0.0), 1.0)


def press_scores_prompt(name: str) -> bool:
    """Whether the prompt-mode worker prefills all ``n`` prompt tokens under the press (a prefill
    press: its scoring queries end at the last prompt token, as kvsift's do) rather than ``n - 1``
    (``full``, decode-time presses). Until 2026-12-04 every press got ``n - 1``: TOVA, which scores
    with one query, then ranked keys by the prompt's second-to-last token and lost most of its
    accuracy (``niah`` at 4k, 5%, 0.5B: 0.167 against kvsift's 0.667; kvsift's ``tova`` fed the
    same way gave kvpress's answers token for token)."""
    spec = parse_press(name)[1]
    return spec.cls is not None and not spec.decode


def build_press(kvpress, name: str, keep: int, n: int, keep_total: int | None = None,
                decoding_interval: int = 1):
    """The kvpress press for our method ``name`` keeping ``keep`` of the ``n`` prompt entries that
    go through the press (``keep_total``: what to hold after the last prompt token, for the
    decode-time ``target_size``). ``None`` for ``full``."""
    outer, spec, inner = parse_press(name)
    opts = press_options(name)
    if spec.cls is None:
        if opts:
            raise ValueError(f"press {name!r}: full takes no options")
        return None
    kw = dict(spec.kwargs)
    if spec.budget == "ratio" and spec.inner is None:
        kw["compression_ratio"] = compression_ratio(keep, n)
    elif spec.budget == "heads":
        kw["head_compression_ratio"] = duo_head_ratio(keep, n)
    if outer == "adakv":  # the ratio goes to the scorer (AdaKV reads it from there), the options too
        scorer = getattr(kvpress, PRESSES[inner].cls)(compression_ratio=compression_ratio(keep, n), **opts)
        return kvpress.AdaKVPress(press=scorer, **kw)
    if outer == "decoding":  # the scorer keeps its ratio 0: DecodingPress sets it per compression
        return kvpress.DecodingPress(base_press=getattr(kvpress, PRESSES[inner].cls)(**opts),
                                     compression_interval=decoding_interval,
                                     target_size=max(1, keep if keep_total is None else keep_total), **kw)
    return getattr(kvpress, spec.cls)(**{**kw, **opts})


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default=None, help="a kvsift bench suite (standard, quick): its tasks, lengths, "
                                                  "budgets, samples and depths; the options below narrow it")
    ap.add_argument("--tasks", default=None, help="comma list of kvsift.eval tasks (default: niah)")
    ap.add_argument("--presses", default=DEFAULT_PRESSES,
                    help=f"comma list of {', '.join(PRESSES)}, or all (default: {DEFAULT_PRESSES}); "
                         f"wrappers take a scorer: adakv(snapkv), decoding(tova); options of the press's constructor in "
                         f"brackets, the whole label naming the rows: snapkv[window_size=32,kernel_size=7]")
    ap.add_argument("--decoding-interval", type=int, default=1,
                    help="decoding presses: compress every this many decode steps, the last prompt token being the first "
                         "(kvpress's compression_interval; with N > 1 the KV after the prompt is the full cache's "
                         "and it grows to budget + N - 1 between compressions)")
    ap.add_argument("--compress", choices=("prompt", "context"), default="prompt",
                    help="prompt: compress the whole prompt, question included (default); context: compress only the "
                         "sample's context (budget from the context's length), then feed the question uncompressed "
                         "(kvpress's pipeline semantics)")
    ap.add_argument("--budgets", default=None, help="ratios (0.25) or token counts (256), comma list "
                                                    "(default: 0.1,0.25,0.5)")
    ap.add_argument("--lengths", default=None, help="default: 1024,2048")
    ap.add_argument("--seeds", default=None, help="default: 0")
    ap.add_argument("--depths", default=None, help="NIAH depths (default: 0,0.25,0.5,0.75,1)")
    ap.add_argument("--samples", type=int, default=None, help="samples per cell for every task (as kvsift bench run)")
    ap.add_argument("--ppl-tokens", type=int, default=None, help="default: 128")
    ap.add_argument("--ppl-text", default=None, help="text of the ppl task (as kvsift bench run --ppl-text)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop cleanly after the cell in flight once this many minutes have passed (rerun to continue)")
    ap.add_argument("--batch-size", default="auto",
                    help="prompts of equal length per model call: a number or auto (1 on CPU, a memory estimate on CUDA)")
    ap.add_argument("--mem-fraction", type=float, default=0.5, help="auto batch size: fraction of free GPU memory")
    ap.add_argument("--model", default=None, help="'smollm2' (default), an HF model directory or a .gguf file path")
    ap.add_argument("--device", default="auto", help="auto: cuda when available")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "results.jsonl")
    ap.add_argument("--venv", type=Path, default=REPO / ".venv-kvpress")
    ap.add_argument("--wheels", type=Path, default=None,
                    help="install kvpress and transformers offline from this wheel directory (pip --no-index)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the worker (default: torch's)")
    ap.add_argument("--setup-only", action="store_true", help="create the venv and convert the model, then stop")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-name", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.presses == "all":
        args.presses = ",".join(PRESSES)
    for p in split_presses(args.presses):
        try:
            parse_press(p)
        except ValueError as e:
            ap.error(str(e))
    if args.decoding_interval < 1:
        ap.error("--decoding-interval must be >= 1")
    return args


def resolve_grid(args, suites) -> dict:
    """Tasks, budgets, lengths, seeds, depths, samples and ppl tokens: the options, else the
    suite's (``suites``: the kvsift.eval.suites module), else the defaults of earlier versions."""
    if args.suite is not None:
        su = suites.get_suite(args.suite)
        base = dict(tasks=",".join(su.tasks), budgets=",".join(su.budgets), lengths=",".join(map(str, su.lengths)),
                    seeds=",".join(map(str, su.seeds)), depths=",".join(f"{d:g}" for d in su.depths),
                    samples=su.samples, ppl_tokens=su.ppl_tokens)
    else:
        base = dict(tasks="niah", budgets="0.1,0.25,0.5", lengths="1024,2048", seeds="0", depths="0,0.25,0.5,0.75,1",
                    samples=None, ppl_tokens=128)
    g = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}
    return dict(tasks=g["tasks"].split(","), budgets=g["budgets"].split(","),
                lengths=[int(x) for x in g["lengths"].split(",")], seeds=[int(x) for x in g["seeds"].split(",")],
                depths=tuple(float(x) for x in g["depths"].split(",")), samples=g["samples"],
                ppl_tokens=g["ppl_tokens"])


# ---- setup (main environment) ------------------------------------------------------------------

def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


REQUIREMENTS_FILE = "kvpress-requirements.txt"  # in a --minimal wheel directory
DATASETS_STUB = '''"""Stand-in for `datasets`, written by bench/vs_kvpress.py into its minimal kvpress venv.

`import kvpress` imports `datasets.load_dataset` (DuoAttention's on-the-fly scoring and the
ExpectedAttentionStats press read hub datasets); the benchmark feeds DuoAttention local texts
instead and runs offline, so the real package (and its 55 MB pyarrow) is not installed.
"""


def load_dataset(*args, **kwargs):
    raise RuntimeError("datasets is not installed in this kvpress venv (a --minimal wheel set); "
                       "install the full set (bench/download_kvpress_wheels.sh) to read hub datasets")
'''


def ensure_venv(venv: Path, wheels: Path | None = None) -> Path:
    """The kvpress venv's python, made if needed. ``wheels``: install offline from that directory;
    a ``--minimal`` one (it holds ``kvpress-requirements.txt``) installs those requirements without
    dependencies (pip skips what the machine's packages satisfy) and a ``datasets`` stand-in when the
    machine has no ``datasets``."""
    py = venv_python(venv)
    check = [str(py), "-c", "import kvpress, transformers, torch; print(transformers.__version__, torch.__version__)"]
    if py.exists():
        r = subprocess.run(check, capture_output=True, text=True)
        if r.returncode == 0:
            return py
    print(f"[vs_kvpress] creating {venv} (system site packages: reuses the installed torch)", file=sys.stderr)
    made = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
    if made.returncode != 0:  # no ensurepip (a distribution's python without its venv package): the caller's pip
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", "--clear", str(venv)],
                       check=True)
    _link_caller_packages(py)
    has_pip = subprocess.run([str(py), "-m", "pip", "--version"], capture_output=True).returncode == 0
    pip = [str(py), "-m", "pip"] if has_pip else [sys.executable, "-m", "pip", "--python", str(py)]
    src: list[str] = []
    reqs = None
    if wheels is not None:
        if not wheels.is_dir() or not any(wheels.glob("*.whl")):
            raise FileNotFoundError(f"--wheels {wheels}: no .whl files there (fill it with "
                                    f"bench/download_kvpress_wheels.sh [--minimal] {wheels} on a machine with network)")
        src = ["--no-index", "--find-links", str(wheels.resolve())]
        reqs = wheels / REQUIREMENTS_FILE if (wheels / REQUIREMENTS_FILE).is_file() else None
        print(f"[vs_kvpress] installing offline from {wheels}{' (minimal set)' if reqs else ''}", file=sys.stderr)
    if reqs is not None:
        subprocess.run([*pip, "install", "-q", *src, "--no-deps", "-r", str(reqs.resolve())], check=True)
        if subprocess.run([str(py), "-c", "import datasets"], capture_output=True).returncode != 0:
            site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip()
            stub = Path(site) / "datasets"
            stub.mkdir(parents=True, exist_ok=True)
            (stub / "__init__.py").write_text(DATASETS_STUB)
            print(f"[vs_kvpress] no `datasets` on this machine: wrote a stand-in ({stub})", file=sys.stderr)
    else:
        subprocess.run([*pip, "install", "-q", *src, KVPRESS, TRANSFORMERS_PIN], check=True)
    _hide_breaking_kernels(py)
    r = subprocess.run(check, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"kvpress venv is broken:\n{r.stderr[-2000:]}")
    print(f"[vs_kvpress] venv ready: transformers/torch {r.stdout.strip()}", file=sys.stderr)
    return py


KERNELS_STUB = '''"""Stand-in for `kernels`, written by bench/vs_kvpress.py into its kvpress venv: the machine's
`kernels` (the hub-kernel loader, e.g. installed beside a newer transformers) breaks the pinned
transformers' import (a newer `LayerRepository` wants a revision), so here it is absent, as
transformers expects when it is not installed."""
raise ImportError("kernels is hidden in the kvpress venv (the machine's version breaks its transformers)")
'''


def _hide_breaking_kernels(py: Path) -> None:
    """When the machine has a ``kernels`` package that the venv's transformers cannot import (a
    ``ValueError`` at ``import transformers.integrations.hub_kernels``, seen with kernels 0.19 and
    transformers 5.2), shadow it in the venv by a module that raises ``ImportError``: transformers
    then runs without hub kernels, as on a machine without the package."""
    probe = [str(py), "-c", "import transformers.integrations.hub_kernels"]
    r = subprocess.run(probe, capture_output=True, text=True)
    if r.returncode == 0 or "kernels" not in r.stderr:
        return
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stub = Path(site) / "kernels"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text(KERNELS_STUB)
    print(f"[vs_kvpress] the machine's `kernels` breaks transformers here: hidden by a stand-in ({stub})",
          file=sys.stderr)


def _link_caller_packages(py: Path) -> None:
    """Make the packages of the interpreter running this script (torch above all) visible in the
    venv, after the venv's own: ``--system-site-packages`` only reaches the *base* interpreter's,
    and this script may itself run in a venv (the GPU image does)."""
    import site
    import sysconfig

    dirs = [d for d in dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]]) if Path(d).is_dir()]
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib).mkdir(parents=True, exist_ok=True)
    (Path(purelib) / "zz_kvsift_caller_packages.pth").write_text("".join(d + "\n" for d in dirs))


def converted_model_dir(model: str | None = None) -> tuple[str, Path]:
    """``(name, HF directory)`` of ``model`` as kvsift resolves it (a GGUF is converted once by
    kvsift.models into an HF directory: weights + tokenizer). The name is the one kvsift's rows carry."""
    sys.path.insert(0, str(REPO))
    from kvsift.models.loader import _convert_gguf, resolve_source

    name, path = resolve_source(model)
    return name, (_convert_gguf(path) if path.suffix == ".gguf" else path)


# ---- worker (inside the kvpress venv) ----------------------------------------------------------

def _import_eval():
    """Import kvsift.eval without ``kvsift/__init__`` (which pulls the engine, built for the main
    environment's transformers): only the pure-Python task / runner modules are needed here."""
    if "kvsift" not in sys.modules:
        pkg = types.ModuleType("kvsift")
        pkg.__path__ = [str(REPO / "kvsift")]
        sys.modules["kvsift"] = pkg
    from kvsift.eval import runner, suites, tasks

    return runner, tasks, suites


DUO_TEXTS = (REPO / "kvsift" / "data" / "alice_ch1_3.txt", REPO / "examples" / "village_report.txt")


class _LocalTexts:
    """What DuoAttentionPress's on-the-fly scoring reads from ``datasets.load_dataset(...)``:
    ``.to_pandas().sample(n, random_state=42)["chapter"].tolist()``, over local texts."""

    def __init__(self, texts: list[str]):
        self.texts = texts

    def to_pandas(self):
        return self

    def sample(self, n: int, random_state=None):
        return _LocalTexts(self.texts[:n])

    def __getitem__(self, column: str):
        return self

    def tolist(self) -> list[str]:
        return list(self.texts)


def duo_corpus(n: int = 50, width: int = 4000) -> list[str]:
    """``n`` windows of ``width`` characters evenly spread over the texts kvsift ships (Alice ch. 1-3,
    the village report), in place of the 50 BookSum chapters kvpress samples."""
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in DUO_TEXTS)
    step = max(1, (len(text) - width) // max(1, n - 1))
    return [text[i * step:i * step + width] for i in range(n)]


def use_local_duo_corpus() -> None:
    """DuoAttentionPress loads its head patterns from the duo-attention GitHub repo (six named
    checkpoints only) or, ``on_the_fly_scoring=True``, scores heads over 50 BookSum chapters from the
    HF hub: both need the network. This keeps kvpress's on-the-fly scoring code and swaps only its
    data source for local texts (:func:`duo_corpus`)."""
    import kvpress.presses.duo_attention_press as duo

    duo.load_dataset = lambda *args, **kwargs: _LocalTexts(duo_corpus())


class KvpressBackend:
    """Runs prompts through ``transformers`` + a kvpress press; reports kvsift's row fields.

    ``generate_batch`` runs prompts of equal length as one batch (kvpress compresses every row of
    a batch to the same number of entries and takes no padding mask, so the runner's default
    grouping by prompt length is what it needs; mixed lengths run one at a time). The automatic
    batch size is 1 on CPU, on CUDA what :func:`runner.estimate_batch_size` allows for a one-shot
    prefill (the whole prompt at once: its MLP activations count too)."""

    name = "kvpress"

    def __init__(self, model_dir: Path, runner, model_name: str = "smollm2", device: str = "auto",
                 dtype: str = "auto", mem_fraction: float = 0.5, max_batch: int = 64, decoding_interval: int = 1):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch, self.runner = torch, runner
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))
        dt = {"auto": torch.bfloat16 if dev.type == "cuda" else torch.float32, "float32": torch.float32,
              "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
              "fp16": torch.float16}[dtype]
        self.device, self.elt = dev, torch.tensor([], dtype=dt).element_size()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt).to(dev).eval()
        self.model_name = model_name
        cfg = self.model.config
        self.layers, self.kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.q_heads, self.hidden = cfg.num_attention_heads, cfg.hidden_size
        self.intermediate = getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
        self.mem_fraction, self.max_batch = mem_fraction, max_batch
        self.decoding_interval = decoding_interval
        self.settings = {"dtype": str(dt).replace("torch.", ""), "device": dev.type, "prefill": "one shot",
                         "decoding_interval": decoding_interval}
        eos = set()
        for src in (self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id):
            if isinstance(src, int):
                eos.add(src)
            elif src:
                eos.update(src)
        self.eos = eos

    @contextlib.contextmanager
    def _prefill_press(self, spec, press):
        """The prefill's context: eager attention for presses that need the weights, and the press
        itself unless it acts at decode."""
        with contextlib.ExitStack() as pre:
            if spec.eager:
                pre.enter_context(self._attn("eager"))
            if press is not None and not spec.decode:
                pre.enter_context(press(self.model))
            yield

    def _press(self, method: str, budget, n_total: int, n_compressed: int):
        """``(spec, press)`` for ``method`` keeping what kvsift keeps of an ``n_total``-token prompt,
        of which the first ``n_compressed`` tokens go through the press (``press`` None: full)."""
        import kvpress

        _, spec, _ = parse_press(method)
        if spec.budget == "heads":
            use_local_duo_corpus()
        keep_total = self.runner.kept_tokens(budget, n_total)
        keep = keep_total - (n_total - n_compressed)
        return spec, build_press(kvpress, method, keep, n_compressed, keep_total, self.decoding_interval)

    @contextlib.contextmanager
    def _attn(self, impl: str):
        """The model with ``attn_implementation=impl`` inside (ObservedAttention needs the weights)."""
        prev = self.model.config._attn_implementation
        self.model.set_attn_implementation(impl)
        try:
            yield
        finally:
            self.model.set_attn_implementation(prev)

    def _attn_modules(self):
        return [layer.self_attn for layer in self.model.model.layers]

    def _reset_masks(self):
        """Forget a head-wise press's masked keys (kvpress resets them at a prefill only in the
        attention functions it patches, not in eager attention)."""
        for m in self._attn_modules():
            if getattr(m, "masked_key_indices", None) is not None:
                m.masked_key_indices = None

    def _masked_entries(self) -> int:
        """KV entries (batch x head x position) a head-wise press masked: allocated, never attended."""
        return sum(int(m.masked_key_indices[0].numel()) for m in self._attn_modules()
                   if getattr(m, "masked_key_indices", None) is not None)

    def _kv_bytes(self, cache) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)

    def _full_bytes(self, n: int) -> int:
        return 2 * self.layers * self.kv_heads * n * self.head_dim * self.elt

    def _ids(self, ids):
        return self.torch.tensor([list(ids)], device=self.device)

    def _sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def _step(self, cache, tokens, pos: int):
        """One forward of ``tokens`` (an int, or a ``(batch, 1)`` tensor) at position ``pos``; returns
        the next-token logits (``(vocab,)`` for an int, else ``(batch, vocab)``)."""
        single = isinstance(tokens, int)
        x = self._ids([tokens]) if single else tokens
        out = self.model(input_ids=x, past_key_values=cache, use_cache=True,
                         position_ids=self.torch.full_like(x, pos))
        logits = out.logits[:, -1].float()
        return logits[0] if single else logits

    def auto_batch_size(self, prompt_tokens, max_new_tokens, method, budget):
        t = self.torch
        spec = parse_press(method)[1]
        if self.device.type != "cuda" or spec.batch1 or spec.eager:  # eager: (batch, heads, n, n) weights
            return 1
        free, _ = t.cuda.mem_get_info(self.device)
        free += t.cuda.memory_reserved(self.device) - t.cuda.memory_allocated(self.device)
        # one-shot prefill: per sequence the full KV plus ~(3 x intermediate + 6 x hidden) activations per token,
        # expressed as extra "heads" of the estimate's per-token term
        act = (3 * self.intermediate + 6 * self.hidden) * self.elt
        n = prompt_tokens + max_new_tokens + 1
        per_seq = 2 * self.layers * self.kv_heads * self.head_dim * self.elt * n + act * n
        return int(max(1, min(self.max_batch, (self.mem_fraction * free) // per_seq)))

    def free_memory(self):
        import gc

        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()

    def generate(self, prompt_ids, method, budget, max_new_tokens):
        return self._generate_rows([list(prompt_ids)], method, budget, max_new_tokens)[0]

    def generate_batch(self, prompts, method, budget, max_new_tokens):
        prompts = [list(p) for p in prompts]
        # no padding mask in kvpress: mixed lengths one at a time; KVzip scores one sequence only
        if len({len(p) for p in prompts}) > 1 or (len(prompts) > 1 and parse_press(method)[1].batch1):
            return [self.generate(p, method, budget, max_new_tokens) for p in prompts]
        return self._generate_rows(prompts, method, budget, max_new_tokens)

    def run_prompts(self, prompts, method, budget, max_new_tokens, ignore_eos: bool = False) -> dict[str, Any]:
        """Greedy generation for ``b`` prompts of one length ``n``: every row prefilled under a
        prefill press (the first token from that forward), or, for ``full`` and decode-time presses,
        the first ``n - 1`` tokens prefilled and the last one fed (a decode-time press compresses
        from there on); then one decode step per new token for the whole batch (finished rows keep
        being fed; their tokens are dropped). Returns the new ids per row and the measures: ``kv``
        (bytes of the cache's tensors after the last prompt token), ``masked`` (bytes of entries a
        head-wise press masked: held, never attended), ``kv_end`` (after the last step), seconds."""
        from transformers import DynamicCache

        t, b, n = self.torch, len(prompts), len(prompts[0])
        # a prefill press takes the whole prompt, the last token's query included (its scoring query,
        # as kvsift's: TOVA's only one), and the first token comes from that forward's last position
        # (attention over the whole prompt there, as in kvsift's prefill); full and decode-time presses
        # prefill n - 1 tokens and feed the last one (a decode press counts its steps from it)
        whole_prompt = press_scores_prompt(method)
        n_pref = n if whole_prompt else n - 1
        spec, press = self._press(method, budget, n, n_pref)
        cache = DynamicCache()
        self._reset_masks()
        with t.inference_mode(), contextlib.ExitStack() as whole:
            if press is not None and spec.decode:
                whole.enter_context(press(self.model))
            t0 = time.perf_counter()
            with self._prefill_press(spec, press):
                out = self.model.model(input_ids=t.tensor([p[:n_pref] for p in prompts], device=self.device),
                                       past_key_values=cache, use_cache=True)
            if whole_prompt:   # the LM head on the last position only (not a (b, n, vocab) tensor)
                logits = self.model.lm_head(out.last_hidden_state[:, -1]).float()
            else:
                logits = self._step(cache, t.tensor([[p[-1]] for p in prompts], device=self.device), n - 1)
            self._sync()
            prefill_s = time.perf_counter() - t0
            kv = self._kv_bytes(cache)
            masked = self._masked_entries() * 2 * self.head_dim * self.elt
            ids: list[list[int]] = [[] for _ in range(b)]
            done = [False] * b
            steps = 0
            t1 = time.perf_counter()
            for i in range(max_new_tokens):
                tok = logits.argmax(-1)
                for r, x in enumerate(tok.tolist()):
                    if not done[r]:
                        if x in self.eos and not ignore_eos:
                            done[r] = True
                        else:
                            ids[r].append(x)
                if all(done) or i == max_new_tokens - 1:
                    break
                logits = self._step(cache, tok[:, None], n + i)
                steps += 1
            self._sync()
            decode_s = time.perf_counter() - t1
            kv_end = self._kv_bytes(cache)
        self._reset_masks()
        return dict(ids=ids, n=n, batch=b, kv=kv, masked=masked, kv_end=kv_end, prefill_s=prefill_s,
                    decode_s=decode_s, steps=steps)

    def prompt_settings(self, method: str) -> dict[str, Any]:
        """What a prompt-mode row adds to its settings: how the prompt met the press."""
        return {"press_prefill": "whole prompt" if press_scores_prompt(method) else "n - 1 tokens, the last fed"}

    def context_settings(self, method: str) -> dict[str, Any]:
        """What a ``--compress context`` row adds to its settings."""
        spec = parse_press(method)[1]
        return {"press_scope": ("context prefilled without the press; question and answer under it" if spec.decode
                                else "context prefill only; question and answer uncompressed"),
                "kv_bytes": "the context's cache after its prefill; nothing counted for the question"}

    def generate_context(self, context_ids, question_ids, method, budget, max_new_tokens):
        """The query-agnostic setting, as kvpress's pipeline runs it: all ``c`` context tokens prefilled
        under the press keeping ``k = kept_tokens(budget, c)`` (a decode-time press: the context without
        it, then the question and the answer under it, ``target_size = k``), then the question ids
        fed at positions ``c ..`` uncompressed, then greedy decoding. KV bytes: the cache after the
        context's prefill."""
        from transformers import DynamicCache

        t, c, nq = self.torch, len(context_ids), len(question_ids)
        spec, press = self._press(method, budget, c, c)
        cache = DynamicCache()
        self._reset_masks()
        with t.inference_mode(), contextlib.ExitStack() as whole:
            t0 = time.perf_counter()
            with self._prefill_press(spec, press):
                self.model.model(input_ids=self._ids(context_ids), past_key_values=cache, use_cache=True)
            self._sync()
            kv = self._kv_bytes(cache)
            masked = self._masked_entries() * 2 * self.head_dim * self.elt
            if press is not None and spec.decode:
                whole.enter_context(press(self.model))
            out = self.model(input_ids=self._ids(question_ids), past_key_values=cache, use_cache=True,
                             position_ids=t.arange(c, c + nq, device=self.device)[None], logits_to_keep=1)
            logits = out.logits[0, -1].float()
            self._sync()
            prefill_s = time.perf_counter() - t0
            ids: list[int] = []
            steps = 0
            t1 = time.perf_counter()
            for i in range(max_new_tokens):
                x = int(logits.argmax(-1))
                if x in self.eos:
                    break
                ids.append(x)
                if i == max_new_tokens - 1:
                    break
                logits = self._step(cache, x, c + nq + i)
                steps += 1
            self._sync()
            decode_s = time.perf_counter() - t1
        self._reset_masks()
        return self.runner.Generation(
            text=self.tokenizer.decode(ids, skip_special_tokens=True), prompt_tokens=c + nq, new_tokens=len(ids),
            kv_device_bytes=kv, kv_host_bytes=0, kv_kept_bytes=kv - masked, kv_full_bytes=self._full_bytes(c),
            prefill_s=prefill_s, decode_ms_per_token=1000.0 * decode_s / steps if steps else 0.0)

    def _generate_rows(self, prompts, method, budget, max_new_tokens):
        r = self.run_prompts(prompts, method, budget, max_new_tokens)
        b, n, steps = r["batch"], r["n"], r["steps"]
        return [self.runner.Generation(
            text=self.tokenizer.decode(x, skip_special_tokens=True), prompt_tokens=n, new_tokens=len(x),
            kv_device_bytes=r["kv"] // b, kv_host_bytes=0, kv_kept_bytes=(r["kv"] - r["masked"]) // b,
            kv_full_bytes=self._full_bytes(n), prefill_s=r["prefill_s"] / b,
            decode_ms_per_token=1000.0 * r["decode_s"] / steps if steps else 0.0, batch=b)
            for x in r["ids"]]

    def score(self, context_ids, continuation_ids, method, budget):
        """Teacher-forced NLL of ``continuation_ids`` after ``context_ids`` compressed to kvsift's
        budget (a decode-time press compresses at the first continuation token: its KV bytes are
        measured after that step): one row of :meth:`score_batch`."""
        return self._score_rows([context_ids], [continuation_ids], method, budget)[0]

    def score_batch(self, contexts, continuations, method, budget):
        """:meth:`score` for contexts of one length and continuations of one length, as one batch:
        the contexts prefilled together under the press (kept to kvsift's budget each), then one
        ``(batch, 1)`` teacher-forced step per continuation token, the NLL summed on the device.
        Each sample gets ``1/B`` of the batch's KV bytes and prefill time, and ``batch=B``. A press
        that runs one row at a time (``batch1``) scores them one by one."""
        if len({len(c) for c in contexts}) > 1 or len({len(x) for x in continuations}) > 1:
            raise ValueError("score_batch needs contexts of one length and continuations of one length")
        if parse_press(method)[1].batch1:
            return [self._score_rows([c], [x], method, budget)[0] for c, x in zip(contexts, continuations)]
        return self._score_rows(contexts, continuations, method, budget)

    def _score_rows(self, contexts, continuations, method, budget):
        from transformers import DynamicCache

        t, b, n, m = self.torch, len(contexts), len(contexts[0]), len(continuations[0])
        if not m:
            raise ValueError("score needs a non-empty continuation")
        spec, press = self._press(method, budget, n, n)
        cache = DynamicCache()
        self._reset_masks()
        with t.inference_mode(), contextlib.ExitStack() as whole:
            if press is not None and spec.decode:
                whole.enter_context(press(self.model))
            t0 = time.perf_counter()
            with contextlib.ExitStack() as pre:
                if spec.eager:
                    pre.enter_context(self._attn("eager"))
                if press is not None and not spec.decode:
                    pre.enter_context(press(self.model))
                out = self.model(input_ids=t.tensor(contexts, device=self.device), past_key_values=cache,
                                 use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1].float()                                      # (b, vocab)
            self._sync()
            prefill_s = time.perf_counter() - t0
            kv = self._kv_bytes(cache)
            masked = self._masked_entries() * 2 * self.head_dim * self.elt
            targets = t.tensor(continuations, device=self.device)                  # (b, m)
            nll = t.zeros(b, dtype=t.float64, device=self.device)                  # fp32 log-probs, summed in fp64
            t1 = time.perf_counter()
            for i in range(m):
                nll -= t.log_softmax(logits, dim=-1).gather(1, targets[:, i:i + 1])[:, 0].double()
                if i == m - 1:
                    break
                logits = self._step(cache, targets[:, i:i + 1], n + i)
                if i == 0 and spec.decode:
                    kv = self._kv_bytes(cache)
            sums = nll.tolist()   # (waits for the last step)
            decode_s = time.perf_counter() - t1
        self._reset_masks()
        return [self.runner.Scored(
            nll_sum=x, n_tokens=m, prompt_tokens=n, kv_device_bytes=kv // b, kv_host_bytes=0,
            kv_kept_bytes=(kv - masked) // b, kv_full_bytes=self._full_bytes(n), prefill_s=prefill_s / b,
            decode_ms_per_token=1000.0 * decode_s / (m - 1) if m > 1 else 0.0, batch=b) for x in sums]


def check_press_options(presses: list[str]) -> str | None:
    """Build every press once with a small budget (inside the kvpress venv): the first label whose
    bracketed options its press does not take, as an error message; None when all build."""
    import kvpress

    for name in presses:
        if not press_options(name):
            continue
        try:
            build_press(kvpress, name, 10, 100, 10)
        except (TypeError, ValueError) as e:
            return f"press {name!r}: {e}"
    return None


def worker(args) -> int:
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    bad = check_press_options(split_presses(args.presses))
    if bad:  # before the model loads: a clear error, exit 2
        print(f"vs_kvpress: error: {bad}", file=sys.stderr)
        return 2
    runner, tasks, suites = _import_eval()
    grid = resolve_grid(args, suites)
    cfg = runner.BenchConfig(   # a bad --ppl-text or grid: an error before the model loads
        tasks=grid["tasks"], methods=split_presses(args.presses), budgets=grid["budgets"], lengths=grid["lengths"],
        seeds=grid["seeds"], task_config=tasks.TaskConfig(depths=grid["depths"], samples=grid["samples"],
                                                          ppl_tokens=grid["ppl_tokens"], ppl_text=args.ppl_text))
    backend = KvpressBackend(args.model_dir, runner, args.model_name or "smollm2", args.device, args.dtype,
                             mem_fraction=args.mem_fraction, decoding_interval=args.decoding_interval)
    print(f"[vs_kvpress] {len(cfg.cells())} cell(s) on {backend.device} ({backend.model_name}), compress "
          f"{args.compress} -> {args.out}",
          file=sys.stderr)
    counts = runner.run_grid(backend, cfg, args.out, progress=not args.no_progress, method_prefix="kvpress:",
                             log=lambda s: print(s, file=sys.stderr), max_minutes=args.max_minutes,
                             batch_size=None if args.batch_size == "auto" else int(args.batch_size),
                             compress=args.compress)
    left = f", {counts['left']} left (rerun to continue)" if counts["stopped"] else ""
    print(f"[vs_kvpress] kvpress {transformers.__version__}/{torch.__version__}: {counts['run']} cell(s) run, "
          f"{counts['skipped']} already done, {counts['errors']} error(s){left} -> {args.out}", file=sys.stderr)
    return 0 if counts["errors"] == 0 else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    py = ensure_venv(args.venv, args.wheels)
    name, model_dir = converted_model_dir(args.model)
    if args.setup_only:
        print(f"[vs_kvpress] venv {args.venv} and model {model_dir} ready", file=sys.stderr)
        return 0
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = [str(py), str(Path(__file__).resolve()), *argv, "--worker", "--model-dir", str(model_dir),
           "--model-name", name, "--out", str(args.out.resolve())]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
