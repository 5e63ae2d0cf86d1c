import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax


def _quantized_tree():
    k = jax.random.split(jax.random.key(0), 4)
    tree = {
        "a": {"kernel": jax.random.normal(k[0], (128, 64))},
        "b": [jax.random.normal(k[1], (64, 64)), jax.random.normal(k[2], (64,))],
        "c": jax.random.normal(k[3], (256, 32)).astype(jnp.bfloat16),
        "n": 3,
    }
    rules = [
        ("a/kernel", qjax.Int(3, group=64, symmetric=False)),
        ("b/0", qjax.NF4(double_quant=True)),
        ("b/1", None),
        ("c", qjax.NVFP4()),
    ]
    return qjax.quantize(tree, rules)


def test_roundtrip_is_bit_identical_with_identical_metadata(tmp_path):
    tree = _quantized_tree()
    qjax.save(tmp_path / "ck", tree)
    back = qjax.load(tmp_path / "ck")
    leaves_a, def_a = jax.tree_util.tree_flatten(tree)
    leaves_b, def_b = jax.tree_util.tree_flatten(back)
    assert def_a == def_b  # includes every QArray's spec, shape, dtype, layout
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(
            np.asarray(x).reshape(-1).view(np.uint8), np.asarray(y).reshape(-1).view(np.uint8)
        )
    assert back["c"].dtype == jnp.bfloat16 and back["n"] == 3


def test_existing_path_and_failed_save_leave_nothing(tmp_path):
    qjax.save(tmp_path / "ck", {"x": jnp.ones(3)})
    with pytest.raises(qjax.FormatError, match="already exists"):
        qjax.save(tmp_path / "ck", {"x": jnp.ones(3)})
    with pytest.raises(qjax.FormatError, match="cannot checkpoint a leaf of type object"):
        qjax.save(tmp_path / "bad", {"x": jnp.ones(3), "y": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_nnx_state_with_quantized_kernels_roundtrips(tmp_path):
    from flax import nnx

    model = nnx.Sequential(
        nnx.Linear(64, 32, rngs=nnx.Rngs(0)), nnx.Linear(32, 8, rngs=nnx.Rngs(1))
    )
    state = nnx.state(model, nnx.Param)
    qstate = qjax.quantize(state, [(r".*kernel", qjax.Int(4, group=32)), (r".*bias", None)])
    qjax.save(tmp_path / "ck", qstate)
    back = qjax.load(tmp_path / "ck")  # a pure dict, int keys for the layer list
    restored = nnx.state(nnx.clone(model), nnx.Param)
    nnx.replace_by_pure_dict(restored, back)
    a = restored["layers"][1]["kernel"].get_value()
    b = qstate["layers"][1]["kernel"].get_value()
    assert isinstance(a, qjax.QArray) and a.spec == b.spec
    np.testing.assert_array_equal(a.dequantize(), b.dequantize())


def test_load_rejects_non_checkpoints(tmp_path):
    with pytest.raises(qjax.FormatError, match="not a qjax checkpoint"):
        qjax.load(tmp_path)


# ------------------------------------------------------------------------------- streaming


def _random_leaf(i: int):
    """Leaf ``i`` of the streamed tree: QArrays of three formats, plain arrays of four dtypes."""
    rng = np.random.default_rng(i)
    w = jnp.asarray(rng.standard_normal((64, 96)), jnp.float32)
    kind = i % 5
    if kind == 0:
        return qjax.Int(4, group=32, symmetric=False).quantize(w)
    if kind == 1:
        return qjax.NF4(double_quant=True).quantize(w)
    if kind == 2:
        return jnp.asarray(w, jnp.bfloat16)
    if kind == 3:
        return rng.integers(-128, 128, (37, 5), dtype=np.int8)
    return rng.standard_normal(7).astype(np.float16)


def _assert_same_leaf(got, want):
    if isinstance(want, qjax.QArray):
        assert isinstance(got, qjax.QArray)
        assert (got.spec, got.shape, got.dtype, got.layout) == (
            want.spec, want.shape, want.dtype, want.layout
        )  # fmt: skip
    leaves_g, def_g = jax.tree_util.tree_flatten(got)
    leaves_w, def_w = jax.tree_util.tree_flatten(want)
    assert def_g == def_w
    for g, w in zip(leaves_g, leaves_w, strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape
        assert g.tobytes() == w.tobytes()  # bit-identical


def test_streamed_tree_of_loaders_roundtrips_in_parts(tmp_path):
    """Loaders are called once each, in tree order, each result written and dropped before the
    next is called; the arrays land in several orbax parts and come back bit-identical."""
    import weakref

    n = 15
    calls: list[int] = []
    alive: list[weakref.ref] = []

    def loader(i):
        def load():
            assert all(r() is None for r in alive), "an earlier leaf is still held"
            calls.append(i)
            leaf = _random_leaf(i)
            if isinstance(leaf, np.ndarray):  # jax arrays and QArrays: not weakref-able
                alive.append(weakref.ref(leaf))
            return leaf

        return load

    tree = {"layers": [{"w": loader(i)} for i in range(n)], "n": 3, "name": "x"}
    qjax.save(tmp_path / "ck", tree, part_bytes=1)  # every leaf its own part
    assert calls == list(range(n))
    parts = sorted(p.name for p in (tmp_path / "ck" / "arrays").iterdir())
    assert parts == [f"part-{i:05d}" for i in range(n)]

    back = qjax.load(tmp_path / "ck")
    assert back["n"] == 3 and back["name"] == "x" and len(back["layers"]) == n
    for i in range(n):
        _assert_same_leaf(back["layers"][i]["w"], _random_leaf(i))

    from qjax.checkpoint import leaf_loaders

    lazy = leaf_loaders(tmp_path / "ck")
    assert list(lazy) == [f"layers/{i}/w" for i in range(n)]
    for i in (0, 1, 3, 14):
        _assert_same_leaf(lazy[f"layers/{i}/w"](), _random_leaf(i))


def test_parts_hold_whole_leaves_up_to_part_bytes(tmp_path):
    """Leaves of 48 KiB with parts of 100 KiB: two leaves a part, a QArray never split."""
    import json

    tree = [_random_leaf(0) for _ in range(5)]  # Int4 codes + scales + zeros
    nbytes = sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(tree[0]))
    qjax.save(tmp_path / "ck", tree, part_bytes=2 * nbytes + 1)
    meta = json.loads((tmp_path / "ck" / "qjax.json").read_text())
    assert meta["version"] == 2
    parts = [
        sorted({f[1]["part"] for f in q["fields"]["items"] if f[1]["t"] == "array"})
        for q in meta["tree"]["items"]
    ]
    assert parts == [[0], [0], [1], [1], [2]]
    for got, want in zip(qjax.load(tmp_path / "ck"), tree, strict=True):
        _assert_same_leaf(got, want)


def test_failing_loader_names_the_leaf_and_leaves_nothing(tmp_path):
    def boom():
        raise ValueError("disk on fire")

    def bad_shape():
        raise qjax.ShapeError("group 32 does not divide 7")

    good = [lambda i=i: _random_leaf(i) for i in range(4)]
    with pytest.raises(
        qjax.FormatError, match=r"ck/b/1: loading the leaf failed: ValueError: disk"
    ):
        qjax.save(tmp_path / "ck", {"a": good, "b": [good[0], boom]}, part_bytes=1)
    with pytest.raises(qjax.ShapeError, match=r"ck/x: group 32 does not divide 7"):
        qjax.save(tmp_path / "ck", {"a": good, "x": bad_shape}, part_bytes=1)
    assert list(tmp_path.iterdir()) == []  # parts already written are gone with the temp dir


def test_version_1_checkpoint_still_loads(tmp_path):
    """A checkpoint in the version-1 layout (one orbax checkpoint ``arrays/`` with every key,
    no parts), written here by hand, loads whole and leaf by leaf."""
    import json

    import orbax.checkpoint as ocp

    from qjax.checkpoint import leaf_loaders

    q = qjax.Int(4, group=32, symmetric=False).quantize(_random_leaf(2).astype(jnp.float32))
    b = np.random.default_rng(9).standard_normal(5).astype(np.float32)
    ck = tmp_path / "v1"
    arrays = {"a000000": np.asarray(q.codes), "a000001": np.asarray(q.scales),
              "a000002": np.asarray(q.zeros), "a000003": b}  # fmt: skip
    ocp.PyTreeCheckpointer().save(ck / "arrays", arrays)

    def arr(key):
        return {"t": "array", "key": key, "dtype": arrays[key].dtype.name}

    fields = {"t": "dict", "items": [["codes", arr("a000000")], ["scales", arr("a000001")],
              ["zeros", arr("a000002")], ["aux", {"t": "dict", "items": []}]]}  # fmt: skip
    qnode = {"t": "qarray", "spec": q.spec.to_config().to_dict(), "shape": list(q.shape),
             "dtype": "float32", "layout": q.layout, "fields": fields}  # fmt: skip
    tree = {"t": "dict", "items": [["w", qnode], ["b", arr("a000003")],
                                   ["n", {"t": "value", "v": 3}]]}  # fmt: skip
    (ck / "qjax.json").write_text(json.dumps({"version": 1, "tree": tree}))

    back = qjax.load(ck)
    assert back["n"] == 3
    _assert_same_leaf(back["w"], q)
    _assert_same_leaf(back["b"], b)
    lazy = leaf_loaders(ck)
    assert list(lazy) == ["w", "b"]
    _assert_same_leaf(lazy["w"](), q)
    _assert_same_leaf(lazy["b"](), b)

    (ck / "qjax.json").write_text(json.dumps({"version": 3, "tree": tree}))
    with pytest.raises(qjax.FormatError, match="unsupported checkpoint version 3"):
        qjax.load(ck)
