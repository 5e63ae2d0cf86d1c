"""Hugging Face checkpoint reader: real MiniLM, a sharded copy, a transformers-written Llama, and
malformed directories / files."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qjax import assets
from qjax.convert.hf import read_hf_checkpoint, read_safetensors
from qjax.errors import FormatError


@pytest.fixture(scope="module")
def minilm() -> Path:
    return assets.path("minilm")


@pytest.fixture(scope="module")
def minilm_tensors(minilm) -> dict[str, np.ndarray]:
    """MiniLM's tensors as safetensors' own NumPy loader reads them (the oracle)."""
    return load_file(minilm / "model.safetensors")


def _sharded_copy(src: Path, dst: Path, tensors: dict[str, np.ndarray]) -> Path:
    """``dst`` = MiniLM's config + its tensors split over two shards with an index."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[::2]}
    parts["model-00002-of-00002.safetensors"] = names[1::2]
    weight_map = {}
    for shard, part in parts.items():
        save_file({n: tensors[n] for n in part}, dst / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}}
    index["weight_map"] = weight_map
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


@pytest.fixture(scope="module")
def sharded(minilm, minilm_tensors, tmp_path_factory) -> Path:
    return _sharded_copy(minilm, tmp_path_factory.mktemp("hf") / "sharded", minilm_tensors)


def _assert_same(tensors: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(tensors) == set(expected)
    for name, value in expected.items():
        assert tensors[name].dtype == value.dtype, name
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)


def test_minilm(minilm, minilm_tensors):
    config, tensors = read_hf_checkpoint(minilm)
    assert config == json.loads((minilm / "config.json").read_text())
    assert config["hidden_size"] == 384 and len(tensors) == 104
    _assert_same(tensors, minilm_tensors)
    w = tensors["encoder.layer.0.attention.self.query.weight"]
    assert w.shape == (384, 384) and w.dtype == np.float32
    assert not w.flags.owndata and not w.flags.writeable  # a view into the memory map
    assert tensors["embeddings.position_ids"].dtype == np.int64


def test_sharded(sharded, minilm_tensors):
    config, tensors = read_hf_checkpoint(sharded)
    assert config["model_type"] == "bert"
    _assert_same(tensors, minilm_tensors)


def test_index_takes_precedence_and_metadata(sharded, tmp_path):
    tensors, metadata = read_safetensors(sharded / "model-00001-of-00002.safetensors")
    assert metadata == {"format": "pt"} and len(tensors) == 52


def test_bf16_fp8_and_empty_tensors(tmp_path):
    import ml_dtypes
    import torch
    from safetensors.torch import save_file as save_torch

    x = torch.randn(3, 5)
    save_torch(
        {
            "bf16": x.to(torch.bfloat16),
            "f8": x.to(torch.float8_e4m3fn),
            "empty": torch.zeros(0, 4),
            "scalar": torch.tensor(2.5),
        },
        tmp_path / "t.safetensors",
    )
    tensors, _ = read_safetensors(tmp_path / "t.safetensors")
    assert tensors["bf16"].dtype == ml_dtypes.bfloat16
    expected = x.to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(tensors["bf16"].astype(np.float32), expected)
    assert tensors["f8"].dtype == ml_dtypes.float8_e4m3fn
    expected = x.to(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(tensors["f8"].astype(np.float32), expected)
    assert tensors["empty"].shape == (0, 4) and tensors["scalar"].shape == ()
    assert float(tensors["scalar"]) == 2.5


# ---------------------------------------------------------------------------- bad input


def _copy_dir(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint directory with the weight files symlinked (cheap)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            os.symlink(f, dst / f.name)
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def test_missing_files(minilm, sharded, tmp_path):
    with pytest.raises(FormatError, match="not a checkpoint directory"):
        read_hf_checkpoint(tmp_path / "nope")
    d = _copy_dir(minilm, tmp_path / "noconfig")
    (d / "config.json").unlink()
    with pytest.raises(FormatError, match=r"noconfig/config\.json: file not found"):
        read_hf_checkpoint(d)
    d = _copy_dir(minilm, tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(FormatError, match=r"noweights: no model\.safetensors"):
        read_hf_checkpoint(d)
    d = _copy_dir(sharded, tmp_path / "noshard")
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FormatError, match=r"index\.json: shard 'model-00002-of-00002.*missing"):
        read_hf_checkpoint(d)


def test_bad_json(minilm, sharded, tmp_path):
    d = _copy_dir(minilm, tmp_path / "badconfig")
    (d / "config.json").write_text('{"hidden_size": 384,')
    with pytest.raises(FormatError, match=r"config\.json: bad JSON.*line 1"):
        read_hf_checkpoint(d)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(FormatError, match=r"config\.json: a JSON list"):
        read_hf_checkpoint(d)
    d = _copy_dir(sharded, tmp_path / "badindex")
    (d / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"index\.json: bad JSON"):
        read_hf_checkpoint(d)
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(FormatError, match=r"index\.json: no 'weight_map'"):
        read_hf_checkpoint(d)


def test_index_lists_absent_tensor(sharded, tmp_path):
    d = _copy_dir(sharded, tmp_path / "absent")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["encoder.layer.9.extra.weight"] = "model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        FormatError, match=r"00001-of-00002\.safetensors: tensor 'encoder\.layer\.9"
    ):
        read_hf_checkpoint(d)
    index["weight_map"]["encoder.layer.9.extra.weight"] = "../outside.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match=r"'encoder\.layer\.9.*bad shard file name"):
        read_hf_checkpoint(d)


def _raw_file(path: Path, header: dict, data: bytes = b"", header_len: int | None = None) -> Path:
    h = json.dumps(header).encode()
    n = len(h) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + h + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "header_len", "match"),
    [
        ({}, b"", 10**9, "header length 1000000000 exceeds"),
        ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, b"xx", None,
         "tensor 'w': unsupported dtype 'Q4'"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"x" * 8, None,
         r"tensor 'w': data_offsets \[0, 4\] hold 4 bytes, F32\[2\] needs 8"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"x" * 8, None,
         "tensor 'w': data .* extends past the data section"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"x" * 4, None,
         "tensor 'w': bad shape"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"x" * 4, None,
         "tensor 'w': bad data_offsets"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"x" * 8, None,
         "tensor 'b': data overlaps tensor 'a'"),
        ({"w": [1, 2]}, b"", None, "tensor 'w': header entry is list"),
    ],
)  # fmt: skip
def test_malformed_safetensors(tmp_path, header, data, header_len, match):
    path = _raw_file(tmp_path / "bad.safetensors", header, data, header_len)
    with pytest.raises(FormatError, match=rf"bad\.safetensors: {match}"):
        read_safetensors(path)


def test_truncated_and_garbage(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(FormatError, match=r"empty\.safetensors: truncated"):
        read_safetensors(tmp_path / "empty.safetensors")
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x00")
    with pytest.raises(FormatError, match=r"short\.safetensors: truncated"):
        read_safetensors(tmp_path / "short.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    with pytest.raises(FormatError, match=r"junk\.safetensors: header is not valid UTF-8 JSON"):
        read_safetensors(tmp_path / "junk.safetensors")
    with pytest.raises(FormatError, match=r"missing\.safetensors: file not found"):
        read_safetensors(tmp_path / "missing.safetensors")


# --------------------------------------------------- a Llama checkpoint written by transformers


@pytest.fixture(scope="module")
def smollm2_hf(tmp_path_factory):
    """SmolLM2 loaded by transformers from the GGUF (dequantized, float32) and written with
    ``save_pretrained``: ``(directory, {name: float32 array} of the torch model)``."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    gguf = assets.path("smollm2")
    src = tmp_path_factory.mktemp("smollm2_gguf")
    os.symlink(gguf, src / gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        src,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    # transformers refuses to save a model loaded from GGUF: move the weights to a plain model
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    out = tmp_path_factory.mktemp("smollm2_hf")
    model.save_pretrained(out)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return out, state


def test_llama_written_by_transformers(smollm2_hf):
    directory, state = smollm2_hf
    config, tensors = read_hf_checkpoint(directory)
    assert config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    # tied lm_head is not written; every other tensor is, bit for bit
    tied = {"lm_head.weight"} if config.get("tie_word_embeddings") else set()
    assert set(tensors) == set(state) - tied
    for name, value in tensors.items():
        assert value.dtype == np.float32, name
        np.testing.assert_array_equal(value, state[name], err_msg=name)
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert tensors["model.embed_tokens.weight"].shape == (49152, 576)


@pytest.fixture(scope="module")
def gemma3_hf_sharded(tmp_path_factory):
    """Gemma 3 loaded by transformers from its GGUF and saved *sharded* (200 MB shards)."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    gguf = assets.path("gemma3")
    src = tmp_path_factory.mktemp("gemma3_gguf")
    os.symlink(gguf, src / gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    out = tmp_path_factory.mktemp("gemma3_hf")
    model.save_pretrained(out, max_shard_size="200MB")
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return out, state


def test_gemma3_written_sharded_by_transformers(gemma3_hf_sharded):
    directory, state = gemma3_hf_sharded
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("model-*.safetensors"))) > 1
    config, tensors = read_hf_checkpoint(directory)
    assert "gemma3" in config["model_type"]
    tied = {k for k in state if k.endswith("lm_head.weight")}
    assert set(tensors) == set(state) - tied
    for name, value in tensors.items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)
