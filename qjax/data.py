"""Text for calibration and evaluation: cleaned Wikipedia articles and the Lee news corpus.

Both corpora come from the gensim wheel (see :mod:`qjax.assets`):

* ``enwiki`` -- 106 real English Wikipedia articles in a MediaWiki XML dump.  We parse it with the
  standard library and strip the wiki markup ourselves (:func:`clean_wikitext`), which gives a
  WikiText-2-sized corpus.  The cleaned articles are cached as JSON under ``<cache>/data/``; the
  file name carries a hash of this module, so any change of the cleaner rebuilds it.
* ``lee`` -- 300 short news articles, one per line.

Perplexity protocol (REFERENCE §2): :func:`test_text` joins the test articles with ``"\\n\\n"``;
calibration windows are drawn from :func:`calibration_texts`, which is disjoint from every test
text.  Tokenization happens elsewhere; :func:`calibration_windows` cuts random windows from the
resulting token ids.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import json
import os
import re
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from qjax import assets
from qjax.errors import FormatError, ShapeError, SpecError

__all__ = [
    "Article",
    "calibration_texts",
    "calibration_windows",
    "clean_wikitext",
    "lee_articles",
    "test_text",
    "wikipedia_articles",
    "wikipedia_split",
]

#: Bump when the cleaning rules change (the cache name also hashes this file's source).
CLEANER_VERSION = 1
#: Salt of the article split; fixed forever so the test split never moves.  Picked once, among a
#: handful tried, because it puts about a quarter of the words (27 of 106 articles) into test.
SPLIT_SALT = "qjax-split"


@dataclass(frozen=True)
class Article:
    """One cleaned Wikipedia article."""

    title: str
    text: str


# ------------------------------------------------------------------------------ wikitext cleaning

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_REF_SELF = re.compile(r"<ref\b[^>]*/\s*>", re.I)
_REF = re.compile(r"<ref\b[^>]*>.*?(?:</ref\s*>|\Z)", re.I | re.S)
#: Tags whose whole content is dropped (refs, math, galleries, code listings, ...).
_DROP_TAGS = (
    "references|math|chem|ce|gallery|timeline|source|syntaxhighlight|score|hiero|imagemap|graph"
    "|mapframe|templatedata|inputbox|categorytree"
)
_DROP_ELEMENT = re.compile(rf"<({_DROP_TAGS})\b[^>]*?(?:/\s*>|>.*?(?:</\1\s*>|\Z))", re.I | re.S)
_BR = re.compile(r"<br\s*/?\s*>", re.I)
_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^<>]*>")
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\[\]]+\s*([^\[\]]*)\]")
_WIKILINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_BOLD_ITALIC = re.compile(r"'{2,}")
_MAGIC = re.compile(r"__[A-Z]+__")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_LIST_MARK = re.compile(r"^[*#:;]+\s*")
_EMPTY_PARENS = re.compile(r"\s*\([\s,;:]*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:])(?=\s|$)")
_WORD = re.compile(r"\w")
_SPACES = re.compile(r"[ \t\u00a0\u2009\u200b]+")
#: Namespaces whose links are media or metadata, not prose.
_DROP_LINK_NS = {"file", "image", "media", "category"}
#: Interwiki prefixes whose links render as their text (prefix dropped).
_INTERWIKI = {
    "w", "wikipedia", "wikt", "wiktionary", "s", "wikisource", "q", "wikiquote", "v",
    "wikiversity", "b", "wikibooks", "n", "wikinews", "commons", "species", "meta", "m", "mw",
}  # fmt: skip
#: Interlanguage link prefixes: en, simple, zh-min-nan, ...
_LANG_PREFIX = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*$|^simple$")
_MEDIA_LINK = re.compile(r"\[\[\s*:?\s*(?:file|image|media|category)\s*:", re.I)
_LINK_TOKEN = re.compile(r"\[\[|\]{2,}")
_BARE_URL = re.compile(r"(?:https?|ftp)://[^\s<>\]]+")

_INNER_TEMPLATE = re.compile(r"\{\{([^{}]*)\}\}")
_NAMED_ARG = re.compile(r"^\s*([\w -]+?)\s*=(.*)$", re.S)
#: Inline templates rendered as a constant.
_TEMPLATE_CONST = {
    "ndash": "–", "mdash": "—", "snd": " – ", "spaced ndash": " – ", "nbsp": " ", "'": "'",
    "'s": "'s", "okina": "ʻ", "·": " · ", "middot": "·", "dot": "·", "=": "=", "!": "|",
}  # fmt: skip
#: Inline templates rendered as their first positional argument.
_TEMPLATE_FIRST = {
    "nowrap", "nobr", "small", "smaller", "big", "larger", "sc", "smallcaps", "small caps", "abbr",
    "formatnum", "nihongo", "ill", "visible anchor", "math", "mvar", "sub", "sup", "flag",
    "flagcountry", "flagu", "quote", "cquote", "blockquote", "sic", "not a typo", "keypress",
    "em", "strong", "var", "linktext", "tooltip", "resize", "proper name", "chem name", "by",
    "nihongo2", "lang name",
}  # fmt: skip
#: Inline templates rendered as their last positional argument.
_TEMPLATE_LAST = {"lang", "transl", "transliteration", "font color", "color"}
_RANGE_WORDS = {"to", "-", "–", "and", "or", "by", "x", "×", "and(-)", "to(-)"}
_UNITS = {
    "sqmi": "sq mi", "sqkm": "km²", "km2": "km²", "m2": "m²", "sqft": "sq ft", "ft2": "sq ft",
    "acre": "acres", "ha": "ha", "F": "°F", "C": "°C", "km/h": "km/h", "mph": "mph",
}  # fmt: skip


def _strip_nested(text: str, opener: str, closer: str, line_start: bool = False) -> str:
    """Remove balanced ``opener ... closer`` spans (nested ones too).

    With ``line_start`` both tokens only count at the start of a line (after blanks), as wiki
    tables require.  An unmatched closer is kept; an unclosed opener is dropped on its own.
    """
    anchor = r"(?m:^[ \t]*)" if line_start else ""
    tokens = re.compile(f"{anchor}({re.escape(opener)}|{re.escape(closer)})")
    out, depth, keep_from, open_end = [], 0, 0, 0
    for m in tokens.finditer(text):
        if m.group(1) == opener:
            if depth == 0:
                out.append(text[keep_from : m.start()])
                open_end = m.end()
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                keep_from = m.end()
    if depth > 0:  # unclosed: drop the opener token only, clean the rest again
        return "".join(out) + _strip_nested(text[open_end:], opener, closer, line_start)
    out.append(text[keep_from:])
    return "".join(out)


def _drop_media_links(text: str) -> str:
    """Remove ``[[File:...]]``, ``[[Image:...]]``, ``[[Category:...]]`` with nested brackets."""
    out, pos = [], 0
    for m in _MEDIA_LINK.finditer(text):
        if m.start() < pos:
            continue  # inside a span already dropped
        depth, end = 0, len(text)
        for tok in _LINK_TOKEN.finditer(text, m.start()):
            if tok.group() == "[[":
                depth += 1
                continue
            # a run of k "]" closes k // 2 links; with k odd, its first "]" is a lone bracket
            k = len(tok.group())
            if k // 2 >= depth:
                end = tok.start() + k % 2 + 2 * depth
                break
            depth -= k // 2
        out.append(text[pos : m.start()])
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _template_args(body: str) -> tuple[str, list[str]]:
    """Name and positional arguments of a template body (``1=x`` counts as positional)."""
    name, *parts = body.split("|")
    args: dict[int, str] = {}
    for part in parts:
        named = _NAMED_ARG.match(part)
        if named is None:
            args[len(args)] = part.strip()
        elif named.group(1).isdigit():
            args[int(named.group(1)) - 1] = named.group(2).strip()
    positional = [args[i] for i in sorted(args) if i >= 0]
    return name.strip().lower().replace("_", " "), positional


def _render_template(m: re.Match) -> str:
    """Text of an innermost template: a few inline ones keep their words, the rest vanish."""
    name, args = _template_args(m.group(1))
    if name in _TEMPLATE_CONST:
        return _TEMPLATE_CONST[name]
    if not args:
        return ""
    if name in _TEMPLATE_FIRST:
        return args[0]
    if name in _TEMPLATE_LAST or name.startswith("lang-"):
        return args[-1]
    if name in ("c.", "circa"):
        return f"c. {args[0]}"
    if name in ("frac", "sfrac", "fraction"):
        return " ".join(args[:-2] + ["/".join(args[-2:])]) if len(args) > 1 else f"1/{args[0]}"
    if name in ("convert", "cvt"):
        if len(args) >= 4 and args[1] in _RANGE_WORDS:
            value, unit = f"{args[0]} {args[1]} {args[2]}", args[3]
        else:
            value, unit = args[0], args[1] if len(args) > 1 else ""
        return f"{value} {_unit(unit)}".strip()
    return ""


def _unit(unit: str) -> str:
    unit = unit.strip()
    for prefix, word in (("e3", "thousand "), ("e6", "million "), ("e9", "billion ")):
        if unit.startswith(prefix):
            return word + _UNITS.get(unit[2:], unit[2:])
    return _UNITS.get(unit, unit)


def _templates(text: str) -> str:
    """Render innermost templates until none is left, then drop any unbalanced rest."""
    while True:
        text, n = _INNER_TEMPLATE.subn(_render_template, text)
        if not n:
            break
    return _strip_nested(text, "{{", "}}")


def _link_text(m: re.Match) -> str:
    """``[[target|label]]`` -> label; ``[[target]]`` -> target; media/category/language -> ''."""
    target, _, label = m.group(1).partition("|")
    target = target.strip().lstrip(":")
    prefix, colon, rest = target.partition(":")
    if colon:
        ns = prefix.strip().lower()
        if ns in _DROP_LINK_NS:
            return ""
        if not label and _LANG_PREFIX.match(prefix.strip()):
            return ""
        if ns in _INTERWIKI:
            target = rest
    if label.strip():
        return label
    if m.group(1).endswith("|"):  # pipe trick: [[Paris, Texas|]] -> Paris
        return re.sub(r"\s*\(.*?\)$|,.*$", "", target.partition(":")[2] or target)
    return target.split("#", 1)[0] or target.lstrip("#")


def _clean_line(line: str) -> tuple[int, str]:
    """``(heading level or 0, plain text)`` of one line; empty text for lines to drop."""
    heading = _HEADING.match(line)
    level = len(heading.group(1)) if heading else 0
    if heading:
        line = heading.group(2)
    if line.startswith(("{|", "|", "!")):
        return 0, ""  # leftover table rows
    line = _LIST_MARK.sub("", line)
    line = _EMPTY_PARENS.sub("", line)
    line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
    line = _SPACES.sub(" ", line).strip()
    return level, line if _WORD.search(line) else ""


def _has_body(lines: list[tuple[int, str]], i: int) -> bool:
    """Whether heading ``i`` is followed by prose before the next heading of its level or above."""
    for level, _ in lines[i + 1 :]:
        if level == 0:
            return True
        if level <= lines[i][0]:
            return False
    return False


def clean_wikitext(text: str) -> str:
    """Turn MediaWiki markup into plain prose, one paragraph (or heading) per line.

    Removes comments, ``<ref>``s, math/gallery/code elements, templates ``{{...}}`` and tables
    ``{| ... |}`` (both nested), file/image/category and interlanguage links; keeps the text of
    other HTML tags, wiki links (``[[a|b]]`` -> ``b``, ``[[a]]`` -> ``a``) and external links
    (``[http://x text]`` -> ``text``); drops bold/italic quotes, list and indent markers; keeps a
    heading ``== X ==`` as the line ``X`` unless its section is empty; decodes HTML entities;
    collapses blanks; drops lines without a letter or digit.  A few inline templates keep their
    words (``{{convert|5|km}}`` -> ``5 km``, ``{{lang|grc|ἀρχή}}`` -> ``ἀρχή``, ``{{nowrap|x}}``
    -> ``x``, ...); all other templates vanish.
    """
    text = _COMMENT.sub("", text)
    text = _REF_SELF.sub("", text)
    text = _REF.sub("", text)
    text = _DROP_ELEMENT.sub("", text)
    text = _drop_media_links(text)
    while True:  # innermost first: link labels may hold links
        text, n = _WIKILINK.subn(_link_text, text)
        if not n:
            break
    text = _templates(text)
    text = _strip_nested(text, "{|", "|}", line_start=True)
    text = _BR.sub(" ", text)
    text = _TAG.sub("", text)
    text = _EXT_LINK.sub(r"\1", text)
    text = _BARE_URL.sub("", text)
    text = _BOLD_ITALIC.sub("", text)
    text = _MAGIC.sub("", text)
    text = html.unescape(text)
    lines = [(level, t) for level, t in map(_clean_line, text.splitlines()) if t]
    keep = (t for i, (level, t) in enumerate(lines) if level == 0 or _has_body(lines, i))
    return "\n".join(keep)


# ------------------------------------------------------------------------------------ Wikipedia


def _parse_dump(dump: Path) -> list[Article]:
    """Namespace-0, non-redirect pages of a bz2 MediaWiki dump, cleaned, in dump order."""
    articles = []
    with bz2.open(dump, "rb") as f:
        try:
            for _, el in ET.iterparse(f, events=("end",)):
                if el.tag.rpartition("}")[2] != "page":
                    continue
                fields = {child.tag.rpartition("}")[2]: child for child in el.iter()}
                title, ns = fields["title"].text or "", fields["ns"].text
                if ns == "0" and "redirect" not in fields:
                    text = clean_wikitext(fields["text"].text or "")
                    if text:
                        articles.append(Article(title, text))
                el.clear()
        except (ET.ParseError, EOFError, OSError, KeyError) as err:
            raise FormatError(f"{dump}: not a readable MediaWiki bz2 dump ({err!r})") from err
    return articles


def _cache_file() -> Path:
    source = Path(__file__).read_bytes()
    tag = hashlib.sha256(source).hexdigest()[:12]
    return assets.cache_dir() / "data" / f"enwiki-clean-v{CLEANER_VERSION}-{tag}.json"


def wikipedia_articles() -> list[Article]:
    """The cleaned articles of the ``enwiki`` asset (106 of them), in dump order.

    Built once and cached as JSON (written to a temp file, then ``os.replace``); caches built by
    other versions of this module are deleted then.
    """
    cache = _cache_file()
    if cache.is_file():
        rows = json.loads(cache.read_text(encoding="utf-8"))
        return [Article(r["title"], r["text"]) for r in rows]
    articles = _parse_dump(assets.path("enwiki"))
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump([{"title": a.title, "text": a.text} for a in articles], f, ensure_ascii=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, cache)
    finally:
        Path(tmp).unlink(missing_ok=True)
    for stale in cache.parent.glob("enwiki-clean-*.json"):  # built by older cleaners
        if stale != cache:
            stale.unlink(missing_ok=True)
    return articles


def _is_test(title: str) -> bool:
    return int(hashlib.sha256(f"{SPLIT_SALT}:{title}".encode()).hexdigest(), 16) % 4 == 0


def wikipedia_split(split: Literal["calibration", "test"]) -> list[str]:
    """Article texts of one fixed split, sorted by title.

    Rule: an article is in ``test`` iff ``int(sha256(f"{SPLIT_SALT}:{title}").hexdigest(), 16) % 4
    == 0`` (title UTF-8 encoded), else in ``calibration``.  It depends on the titles only -- no
    RNG, no library version -- so the split never changes.  With ``SPLIT_SALT = "qjax-split"``
    the test split has 27 articles and about 25% of the words.
    """
    if split not in ("calibration", "test"):
        raise SpecError(f"wikipedia_split: split must be 'calibration' or 'test', got {split!r}")
    want_test = split == "test"
    chosen = [a for a in wikipedia_articles() if _is_test(a.title) == want_test]
    return [a.text for a in sorted(chosen, key=lambda a: a.title)]


# ------------------------------------------------------------------------------------------ Lee


def lee_articles() -> list[str]:
    """The 300 news articles of the Lee background corpus, one string each."""
    lines = assets.path("lee").read_text(encoding="utf-8").splitlines()
    return [s for s in (line.strip() for line in lines) if s]


# ------------------------------------------------------------------------------------ protocols


def test_text(corpus: Literal["wikipedia", "lee"] = "wikipedia") -> str:
    """The evaluation text: the test articles joined with ``"\\n\\n"`` (REFERENCE §2).

    ``"wikipedia"`` uses the test split; ``"lee"`` uses all 300 Lee articles (it is never used
    for calibration).
    """
    if corpus == "wikipedia":
        return "\n\n".join(wikipedia_split("test"))
    if corpus == "lee":
        return "\n\n".join(lee_articles())
    raise SpecError(f"test_text: corpus must be 'wikipedia' or 'lee', got {corpus!r}")


test_text.__test__ = False  # not a pytest test, despite the name


def calibration_texts() -> list[str]:
    """Calibration articles: the Wikipedia calibration split, disjoint from every test text."""
    return wikipedia_split("calibration")


def calibration_windows(token_ids: np.ndarray, n: int, length: int, seed: int) -> np.ndarray:
    """``n`` random windows of ``length`` tokens from a 1-D token array, shape ``[n, length]``.

    Start positions are distinct, drawn without replacement by ``numpy.random.Generator(PCG64(
    seed))``, so the result depends only on the inputs.  Raises :class:`~qjax.errors.ShapeError`
    if the array is not 1-D or has too few tokens: at least ``length + n - 1`` are needed.
    """
    ids = np.asarray(token_ids)
    if ids.ndim != 1:
        raise ShapeError(f"calibration_windows: token_ids must be 1-D, got shape {ids.shape}")
    if n < 1 or length < 1:
        raise ShapeError(f"calibration_windows: n and length must be >= 1, got {n}, {length}")
    starts_available = ids.size - length + 1
    if starts_available < n:
        raise ShapeError(
            f"calibration_windows: {ids.size} tokens cannot give {n} distinct windows of "
            f"{length} tokens; need at least {length + n - 1} tokens"
        )
    rng = np.random.Generator(np.random.PCG64(seed))
    starts = rng.choice(starts_available, size=n, replace=False)
    return ids[starts[:, None] + np.arange(length)]
