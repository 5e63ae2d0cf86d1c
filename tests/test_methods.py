import pytest

import qjax
from qjax.methods import method_from_config


def test_method_configs_build_the_documented_algorithms():
    g = method_from_config({"method": "gptq", "preset": "int4-g128", "act_order": True})
    assert isinstance(g, qjax.GPTQ) and g.act_order and g.spec == qjax.Int(4, group=128)
    h = method_from_config({"method": "hqq", "preset": "int4-g128"})
    assert not h.spec.symmetric and h.spec.scale_dtype == "float16"
    a = method_from_config({"method": "awq", "preset": "int3-channel", "then": "gptq"})
    assert a.label() == "AWQ+GPTQ int3 sym per-channel"
    s = method_from_config({"method": "smoothquant", "alpha": 0.6})
    assert s.spec == qjax.W8A8(act="static") and s.alpha == 0.6


@pytest.mark.parametrize(
    "bad",
    [
        {"method": "gptx", "preset": "int4-g128"},
        {"method": "gptq"},
        {"method": "rtn", "preset": "int4-g999"},
    ],
)
def test_bad_method_configs_are_qjax_errors(bad):
    with pytest.raises(qjax.SpecError):
        method_from_config(bad)
