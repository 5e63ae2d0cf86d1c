import pytest

from qjax import cli


def test_presets_lists_every_preset(capsys):
    from qjax.presets import PRESETS

    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)


def test_eval_runs_the_real_model_and_reports_a_sane_perplexity(capsys):
    assert cli.main(["eval", "--model", "smollm2", "--context", "128", "--windows", "2"]) == 0
    out = capsys.readouterr().out
    ppl = float(out.split("perplexity ")[1].split()[0])
    assert 3 < ppl < 100  # a real LM on real text; a broken model or tokenizer gives ~vocab size


def test_bad_preset_is_a_qjax_error(capsys):
    assert cli.main(["run", "--preset", "int5-g7"]) == 2
    assert "unknown preset" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["run", "--model", "gpt9"], ["nonsense"]])
def test_argparse_rejects_unknown_choices(argv):
    with pytest.raises(SystemExit):
        cli.main(argv)


# ------------------------------------------------------------------------------ qjax convert


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from _tiny_llama import write_tiny_llama

    from qjax.convert.gguf import GGMLType

    d = tmp_path_factory.mktemp("tiny")
    return write_tiny_llama(d / "tiny.gguf"), write_tiny_llama(d / "tiny8.gguf", GGMLType.Q8_0)


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_convert_gguf_to_f16_gguf(tiny, tmp_path, capsys):
    import numpy as np

    from qjax.convert.gguf import read_gguf

    assert cli.main(["convert", str(tiny[0]), str(tmp_path / "f16.gguf"), "--type", "F16"]) == 0
    assert '"F16": 16' in capsys.readouterr().out
    a, b = read_gguf(tiny[0]), read_gguf(tmp_path / "f16.gguf")
    assert b.metadata["general.file_type"] == 1
    for name, info in a.tensors.items():
        want = a.dequantize(name)
        if len(info.shape) == 2:
            assert b.tensors[name].type_name == "F16"
            want = want.astype(np.float16).astype(np.float32)
        else:
            assert b.tensors[name].type_name == "F32"
        np.testing.assert_array_equal(b.dequantize(name), want)


def test_convert_hf_round_trips(tiny, tmp_path):
    """GGUF (Q8_0 linears) → HF GPTQ v2 → GGUF and → orbax → GGUF: the same bytes for every
    linear; the embedding and head come back from HF dense (F16 by default)."""
    from qjax.convert.gguf import read_gguf

    src = tiny[1]
    assert (
        cli.main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf", "--format", "gptq_v2"])
        == 0
    )
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "a.gguf"),
                     "--metadata", str(src)]) == 0  # fmt: skip
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "ck"), "--to", "orbax"]) == 0
    assert cli.main(["convert", str(tmp_path / "ck"), str(tmp_path / "b.gguf"),
                     "--metadata", str(src)]) == 0  # fmt: skip
    r = read_gguf(src)
    for out in ("a.gguf", "b.gguf"):
        o = read_gguf(tmp_path / out)
        for name in r.tensors:
            if name.startswith("blk."):
                assert (o.raw(name) == r.raw(name)).all(), (out, name)
    assert cli.main(["convert", str(src), str(tmp_path / "dense"), "--to", "hf"]) == 0
    assert (tmp_path / "dense" / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


def test_convert_quantized_checkpoint_to_gguf_exact_and_requantized(tiny, tmp_path, caplog):
    """A qjax.save'd PTQ-style checkpoint (RTN int4 g32 linears, float rest) → GGUF with the
    source's metadata: the linears exact Q4_0, the embedding quantized to --type."""
    import jax
    import numpy as np
    from flax import nnx

    import qjax
    from qjax.convert.gguf import read_gguf
    from qjax.convert.gguf.load import load_gguf_model

    _, model = load_gguf_model(tiny[0])
    state = nnx.state(model, nnx.Param)
    rules = [(r".*_proj/kernel", qjax.Int(4, group=32)), (r".*", None)]
    qstate = qjax.quantize(state, rules)
    qjax.save(tmp_path / "ptq", qstate)
    assert (
        cli.main(["convert", str(tmp_path / "ptq"), str(tmp_path / "x.gguf")]) == 2
    )  # no metadata
    assert not (tmp_path / "x.gguf").exists()
    argv = ["convert", str(tmp_path / "ptq"), str(tmp_path / "x.gguf"), "--metadata", str(tiny[0]),
            "--type", "Q8_0"]  # fmt: skip
    assert cli.main(argv) == 0
    r = read_gguf(tmp_path / "x.gguf")
    assert r.tensors["blk.0.attn_q.weight"].type_name == "Q4_0"
    assert r.tensors["token_embd.weight"].type_name == "Q8_0"
    q = qstate["layers"][0]["attn"]["k_proj"]["kernel"].get_value()
    from qjax.convert.gguf.writer import permute_qk

    want = permute_qk(np.asarray(jax.device_get(q.dequantize())).T, 2)
    np.testing.assert_array_equal(r.dequantize("blk.0.attn_k.weight"), want)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["missing.gguf", "o.gguf"], "no such file"),
        (["{tiny}", "o.gguf", "--type", "Q9_9"], "unknown GGML type"),
        (["{tiny}", "o"], "--to"),
        (["{tiny}", "o.gguf", "--format", "gptq"], "--format applies"),
        (["{tiny}", "{tiny}"], "already exists"),
        (["{tiny}", "hf", "--to", "hf", "--format", "gptq_v2"], "not representable"),
        (["{notgguf}", "o.gguf", "--type", "F16"], "not a GGUF file"),
        (["{tiny}", "o.gguf", "--mix", "Q9_K_Z"], "Q9_K_Z"),
    ],
)
def test_convert_bad_input_is_a_clear_error_and_leaves_nothing(tiny, tmp_path, argv, message,
                                                               capsys):  # fmt: skip
    (tmp_path / "notgguf.bin").write_bytes(b"GGML" + bytes(100))
    subs = {"{tiny}": str(tiny[0]), "{notgguf}": str(tmp_path / "notgguf.bin")}
    argv = [subs.get(a, a if a.startswith("-") or a in ("Q9_9", "hf", "gptq", "gptq_v2", "Q9_K_Z")
                     else str(tmp_path / a)) for a in argv]  # fmt: skip
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main(["convert", *argv]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_convert_failure_mid_write_leaves_no_partial_file(tiny, tmp_path, capsys):
    """A tensor that cannot be decoded (MXFP4) fails the conversion after other tensors were
    written: no output and no temp file remain, the error names the file and the tensor."""
    from qjax.convert.gguf import GGMLType, read_gguf, write_gguf

    r = read_gguf(tiny[0])
    tensors = [(n, t.ggml_type, r.raw(n), t.shape) for n, t in r.tensors.items()]
    tensors.append(("zz.weight", GGMLType.MXFP4, bytes(17 * 2), (2, 32)))
    bad = write_gguf(tmp_path / "bad.gguf", r.metadata, tensors, value_types=r.value_types)
    out = tmp_path / "out"
    out.mkdir()
    assert cli.main(["convert", str(bad), str(out / "x.gguf"), "--type", "F16"]) == 2
    err = capsys.readouterr().err
    assert "zz.weight" in err and "bad.gguf" in err
    assert list(out.iterdir()) == []
