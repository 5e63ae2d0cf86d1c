"""Tests of qjax.data: the wikitext cleaner, the corpora, the split and calibration windows."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from qjax import assets, data
from qjax.errors import QjaxError, ShapeError, SpecError

MARKUP = ("{{", "}}", "[[", "]]", "<ref", "</ref", "{|", "|}", "''", "<!--", "&nbsp;", "&amp;")


# ----------------------------------------------------------------------------------- cleaner


def test_clean_wikitext_rules():
    raw = """{{Infobox thing|name={{nested|x}}|image=[[File:a.jpg]]}}
'''Foo''' is a ''bar''<ref name="a">{{cite web|url=http://x}}</ref> in [[Paris|the capital]]<ref
name=b/>.
<!-- hidden
comment --> It has [[cats]] and [http://example.com an example link] and http://bare.url/x .
{| class="wikitable"
|-
| cell {{tpl}} || {|
| inner
|}
|}
== History ==
* A [[File:b.png|thumb|caption with [[link]] and [brackets]]] listed item
# numbered &amp; &nbsp;entity<br/>more <small>small text</small>
: indented {{convert|5|km|mi}} long, said {{lang|grc|ἀρχή}}.
=== Empty section ===
== See also ==
[[Category:Things]]
[[de:Foo]]
"""
    text = data.clean_wikitext(raw)
    assert text.splitlines() == [
        "Foo is a bar in the capital.",
        "It has cats and an example link and.",
        "History",
        "A listed item",
        "numbered & entity more small text",
        "indented 5 km long, said ἀρχή.",
    ]


def test_clean_wikitext_nested_and_unbalanced():
    assert data.clean_wikitext("a {{x|{{y|{{z}}}}}} b") == "a b"
    assert data.clean_wikitext("a {{x|unclosed b") == "a x|unclosed b"
    assert data.clean_wikitext("[[a]] [[b|c]] [[wikt:word]] [[Paris, Texas|]]") == (
        "a c word Paris"
    )
    assert data.clean_wikitext("x<math>\\frac{1}{2}</math>y") == "xy"


# ------------------------------------------------------------------------------- Wikipedia


@pytest.fixture(scope="module")
def articles():
    return data.wikipedia_articles()


def test_articles_clean_and_known(articles):
    assert len(articles) == 106
    titles = {a.title for a in articles}
    for t in ("Anarchism", "Albert Einstein", "Aardvark", "Apollo 11", "Algorithm", "Azerbaijan"):
        assert t in titles
    assert "AccessibleComputing" not in titles  # a redirect
    for a in articles:
        assert a.text.strip() == a.text and a.text
        for token in MARKUP:
            assert token not in a.text, (a.title, token)
        assert "thumb|" not in a.text and "http://" not in a.text
    einstein = next(a.text for a in articles if a.title == "Albert Einstein")
    assert "theory of relativity" in einstein


def test_corpus_size(articles):
    words = sum(len(a.text.split()) for a in articles)
    mbytes = sum(len(a.text.encode()) for a in articles) / 1e6
    assert 400_000 < words < 520_000
    assert 2.6 < mbytes < 3.4


def test_split_disjoint_covering_deterministic(articles):
    test, calib = data.wikipedia_split("test"), data.wikipedia_split("calibration")
    assert len(test) + len(calib) == len(articles) == 106
    assert set(test).isdisjoint(calib)
    assert sorted(test + calib) == sorted(a.text for a in articles)
    assert len(test) == 27  # the fixed rule; changes only if titles change
    words = [sum(len(t.split()) for t in split) for split in (test, calib)]
    assert 0.2 < words[0] / sum(words) < 0.3
    assert data.wikipedia_split("test") == test
    by_title = {a.title: a.text for a in articles}
    assert by_title["Albert Einstein"] in test and by_title["Anarchism"] in calib
    with pytest.raises(SpecError):
        data.wikipedia_split("train")


def test_protocol_texts():
    test = data.test_text()
    assert test == "\n\n".join(data.wikipedia_split("test"))
    calib = data.calibration_texts()
    assert calib == data.wikipedia_split("calibration")
    assert not any(c in test for c in calib)
    with pytest.raises(SpecError):
        data.test_text("c4")


def test_lee():
    lee = data.lee_articles()
    assert len(lee) == 300
    assert 55_000 < sum(len(t.split()) for t in lee) < 65_000
    assert lee[0].startswith("Hundreds of people have been forced to vacate their homes")
    text = data.test_text("lee")
    assert text.count("\n\n") == 299 and text.split("\n\n") == lee


def test_json_cache_used_and_rebuilt(monkeypatch, tmp_path):
    dump = assets.path("enwiki")
    cache = tmp_path / "cache"
    monkeypatch.setenv("QJAX_CACHE", str(cache))
    (cache / "assets" / "enwiki").mkdir(parents=True)
    shutil.copy(dump, cache / "assets" / "enwiki" / "enwiki.xml.bz2")
    stale = cache / "data" / "enwiki-clean-v0-old.json"
    stale.parent.mkdir()
    stale.write_text("[]")
    built = data.wikipedia_articles()
    files = sorted(p.name for p in (cache / "data").iterdir())
    assert len(files) == 1 and files[0].startswith(f"enwiki-clean-v{data.CLEANER_VERSION}-")

    def boom(_):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(data, "_parse_dump", boom)
    assert data.wikipedia_articles() == built
    assert built[0] == data.Article(built[0].title, built[0].text)


# ---------------------------------------------------------------------- calibration windows


def test_windows_deterministic_and_contiguous():
    ids = np.arange(10_000, dtype=np.int32) * 3
    a = data.calibration_windows(ids, n=16, length=128, seed=0)
    b = data.calibration_windows(ids, n=16, length=128, seed=0)
    c = data.calibration_windows(ids, n=16, length=128, seed=1)
    assert a.shape == (16, 128) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all(np.diff(a, axis=1) == 3)  # each row is a slice of the token array
    assert len(set(a[:, 0].tolist())) == 16  # distinct starts
    assert a[:, 0].min() >= 0 and a[:, -1].max() <= ids[-1]


def test_windows_exact_fit_and_errors():
    ids = np.arange(100)
    full = data.calibration_windows(ids, n=11, length=90, seed=3)
    assert sorted(full[:, 0].tolist()) == list(range(11))
    with pytest.raises(ShapeError, match=r"100 tokens cannot give 12 distinct windows of 90"):
        data.calibration_windows(ids, n=12, length=90, seed=3)
    with pytest.raises(QjaxError, match=r"need at least 512 tokens"):
        data.calibration_windows(ids, n=1, length=512, seed=0)
    with pytest.raises(ShapeError, match="1-D"):
        data.calibration_windows(ids.reshape(10, 10), n=1, length=5, seed=0)
    with pytest.raises(ShapeError):
        data.calibration_windows(ids, n=0, length=5, seed=0)
