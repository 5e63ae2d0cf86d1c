"""Fixtures for the converter tests: the real GGUF assets and a small synthetic GGUF file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

# Tensors of the small file: name -> (GGML type name, NumPy shape). Names have equal lengths so
# tests can overwrite one name with another in place.
SMALL_TENSORS = {
    "t_f32": ("F32", (3, 64)),
    "t_f16": ("F16", (2, 32)),
    "t_q80": ("Q8_0", (2, 64)),
    "t_q40": ("Q4_0", (2, 32)),
    "t_q41": ("Q4_1", (1, 64)),
    "t_q50": ("Q5_0", (2, 32)),
    "t_q51": ("Q5_1", (2, 32)),
    "t_q4k": ("Q4_K", (2, 256)),
    "t_q6k": ("Q6_K", (1, 256)),
}


def write_small_gguf(path: Path) -> Path:
    """A valid GGUF v3 file written by gguf-py, with every metadata value type and a few
    tensors of several GGML types (K-quant blocks are random bytes with sane f16 scales)."""
    import gguf

    from qjax.convert.gguf import quants
    from qjax.convert.gguf.constants import GGMLType

    rng = np.random.default_rng(1234)
    vt = gguf.GGUFValueType
    w = gguf.GGUFWriter(path, "llama")
    w.add_string("general.name", "tiny ünïcödé")
    w.add_custom_alignment(32)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_array("t.strs", ["a", "", "ß"])
    w.add_key_value("t.short_ints", [1, -2, 3], vt.ARRAY, sub_type=vt.INT32)
    w.add_key_value(
        "t.long_floats", [float(i) / 8 for i in range(100)], vt.ARRAY, sub_type=vt.FLOAT32
    )
    w.add_key_value("t.bools", [True, False, True], vt.ARRAY, sub_type=vt.BOOL)
    w.add_array("t.nested", [[1, 2], [3]])
    for name, (tname, shape) in SMALL_TENSORS.items():
        gtype = GGMLType[tname]
        x = rng.standard_normal(shape).astype(np.float32)
        if tname in ("F32", "F16"):
            w.add_tensor(name, x.astype(np.float32 if tname == "F32" else np.float16))
            continue
        if gtype in quants.BLOCK_DTYPES and tname.endswith("_K"):
            data = random_blocks(rng, gtype, shape[0] * shape[1] // 256).reshape(shape[0], -1)
        else:
            data = quants.quantize(x, gtype)
        w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[tname])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_blocks(rng: np.random.Generator, gtype, n: int) -> np.ndarray:
    """``n`` random blocks of a block type, as uint8 (n * bytes_per_block,), with every f16
    field set to a finite value of modest size (random bytes would give inf / NaN scales)."""
    from qjax.convert.gguf import quants

    dt = quants.BLOCK_DTYPES[gtype]
    blocks = np.frombuffer(rng.bytes(n * dt.itemsize), dtype=dt).copy()
    for field in dt.names:
        if dt.fields[field][0] == np.dtype("<f2"):
            sign = rng.choice([-1.0, 1.0], n) if field in ("d", "m") else 1.0
            blocks[field] = sign * rng.uniform(1e-4, 0.1, n)
    return blocks.view(np.uint8)


@pytest.fixture(scope="session")
def make_random_blocks():
    """:func:`random_blocks`, for test modules (conftest helpers cannot be imported by name)."""
    return random_blocks


@pytest.fixture(scope="session")
def small_tensors() -> dict[str, tuple[str, tuple[int, ...]]]:
    return dict(SMALL_TENSORS)


@pytest.fixture(scope="session")
def small_gguf(tmp_path_factory) -> Path:
    """Path of the small valid GGUF file (do not modify it; copy its bytes instead)."""
    return write_small_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf")


@pytest.fixture(scope="session")
def small_bytes(small_gguf) -> bytes:
    return small_gguf.read_bytes()
