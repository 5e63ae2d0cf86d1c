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
