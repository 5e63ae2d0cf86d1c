"""Tokenizers rebuilt from the ``tokenizer.ggml.*`` metadata of a GGUF file.

A GGUF file carries no ``tokenizer.json``; it stores the vocabulary (``tokens``, with
``token_type`` and for SentencePiece models ``scores``), the BPE ``merges`` of byte-level models,
the pre-tokenizer name (``pre``) and the special token ids.  :func:`tokenizer_from_gguf` rebuilds
a HF ``tokenizers.Tokenizer`` from them:

* ``model = "gpt2"`` -- byte-level BPE (SmolLM2, Llama-3, Qwen2, ...).  Text is cut into
  pre-tokens by the regex the vocabulary was trained with (named by ``pre``, see
  :data:`BYTE_LEVEL_PRE`; a file without ``pre`` gets GPT-2's), each pre-token's UTF-8 bytes are
  spelled in GPT-2's 256-character byte alphabet, and the file's merges are applied in rank
  order.  ``pre = "smollm"`` (StarCoder's family) isolates every digit first, then applies
  GPT-2's regex -- as llama.cpp and SmolLM2's own tokenizer do.
* ``model = "llama"`` -- SentencePiece BPE (Gemma, Llama-2, ...).  Spaces become ``"▁"``
  (U+2581; with a leading one when ``add_space_prefix``), there is no pre-tokenization, and the
  pair merged next is the one whose merged token is best: highest ``score``, or for Gemma files
  earliest in the vocabulary (the same order for ordinary tokens, but Gemma's runs-of-spaces
  tokens score -1000 and still merge first).  The merge list is derived from the vocabulary
  (every split ``t = a + b`` with ``a`` and ``b`` tokens, ranked by ``t``).  Characters no token
  covers fall back to ``<0xNN>`` byte tokens.  Gemma stores its runs of spaces as real spaces;
  they are respelled as runs of ``"▁"`` to match the normalized text.

Tokens typed CONTROL (3) are special tokens and USER_DEFINED (4) ones are added tokens; both are
matched whole in the raw text before anything else.  ``encode`` prepends BOS when asked (default:
``tokenizer.ggml.add_bos_token``); EOS is never appended.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from qjax.convert.gguf.reader import GGUFReader, read_gguf
from qjax.errors import FormatError

__all__ = ["BYTE_LEVEL_PRE", "Tokenizer", "byte_alphabet", "tokenizer_from_gguf"]

# llama.cpp's token types (``tokenizer.ggml.token_type``).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPIECE_SPACE = "\u2581"

#: GPT-2's pre-tokenizer regex (what ``ByteLevel(use_regex=True)`` applies).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
#: Llama-3's: case-insensitive contractions, digits in runs of at most three, newlines kept apart.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Qwen2's: Llama-3's with every digit on its own.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _byte_level(split: str | None, digits: bool = False) -> pre_tokenizers.PreTokenizer:
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is None:  # ByteLevel applies GPT-2's regex itself
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


#: ``tokenizer.ggml.pre`` -> the pre-tokenizer of a byte-level BPE vocabulary (llama.cpp's names).
BYTE_LEVEL_PRE: dict[str, Any] = {
    "gpt-2": lambda: _byte_level(None),
    "gpt2": lambda: _byte_level(None),
    **{
        name: lambda: _byte_level(None, digits=True)
        for name in ("smollm", "starcoder", "refact", "codeshell", "command-r")
    },
    **{
        name: lambda: _byte_level(_LLAMA3_SPLIT)
        for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3")
    },
    **{name: lambda: _byte_level(_QWEN2_SPLIT) for name in ("qwen2", "deepseek-r1-qwen")},
}


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character map: printable Latin-1 bytes stand for themselves, the other 68
    bytes (controls, space, ...) for the characters ``chr(256 + k)`` in byte order."""
    kept = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, extra = {}, 0
    for b in range(256):
        if b in kept:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


@dataclass(frozen=True)
class Tokenizer:
    """Text <-> token ids for one model (build it with :func:`tokenizer_from_gguf`).

    Attributes:
        name: ``"<model>/<pre>"``, e.g. ``"gpt2/smollm"`` or ``"llama/default"``.
        bos_id, eos_id: special token ids (``None`` when the file names none).
        vocab_size: number of tokens in the file's vocabulary (rows of the embedding).
        add_bos: whether :meth:`encode` prepends BOS by default.
        fingerprint: sha256 over everything that determines the ids (cache key for token ids).
        backend: the ``tokenizers.Tokenizer`` doing the work.
    """

    name: str
    bos_id: int | None
    eos_id: int | None
    vocab_size: int
    add_bos: bool
    fingerprint: str
    backend: HFTokenizer = field(repr=False)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; BOS first if ``add_bos`` (``None``: the model's default).

        Special tokens written in the text (``"<|im_start|>"``, ``"<start_of_turn>"``) become
        their ids.
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        """The text of ``ids`` (special tokens kept as written unless ``skip_special``)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)


_REQUIRED = object()


def _meta(reader: GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
    value = reader.metadata.get(f"tokenizer.ggml.{key}", default)
    if value is _REQUIRED:
        raise FormatError(f"{reader.path}: tokenizer: missing metadata key 'tokenizer.ggml.{key}'")
    return value


def _as_list(reader: GGUFReader, key: str, n: int | None = None) -> list:
    value = _meta(reader, key)
    value = value.tolist() if hasattr(value, "tolist") else list(value)
    if n is not None and len(value) != n:
        raise FormatError(
            f"{reader.path}: tokenizer: 'tokenizer.ggml.{key}' has {len(value)} entries, "
            f"the vocabulary {n}"
        )
    return value


def _added_tokens(tokens: list[str], types: list[int], vocab: dict[str, int]) -> list[AddedToken]:
    """CONTROL tokens as special tokens, USER_DEFINED ones as plain added tokens; both matched
    whole in the raw text.  A token spelled differently in ``vocab`` (respelled) is left out."""
    out = []
    for token, kind in zip(tokens, types, strict=True):
        if kind in (_CONTROL, _USER_DEFINED) and vocab.get(token) is not None:
            out.append(AddedToken(token, normalized=False, special=kind == _CONTROL))
    return out


def _byte_level_bpe(reader: GGUFReader, tokens: list[str], pre: str) -> HFTokenizer:
    if pre not in BYTE_LEVEL_PRE:
        raise FormatError(
            f"{reader.path}: tokenizer: unsupported byte-level pre-tokenizer "
            f"'tokenizer.ggml.pre' = {pre!r}; supported: {', '.join(sorted(BYTE_LEVEL_PRE))}"
        )
    spell = byte_alphabet()
    alphabet = set(spell.values())
    # Tokens outside the byte alphabet (rare special tokens) are spelled byte by byte.
    vocab = {
        (t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(tokens)
    }
    merges = []
    for k, m in enumerate(_as_list(reader, "merges")):
        parts = m.split(" ")
        if len(parts) != 2:
            raise FormatError(f"{reader.path}: tokenizer: merge {k} {m!r} is not 'left right'")
        merges.append((parts[0], parts[1]))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = BYTE_LEVEL_PRE[pre]()
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(tokens: list[str], rank: list[float]) -> list[tuple[str, str]]:
    """Every split ``t = a + b`` into two tokens, ordered by ``rank[t]`` (lower merges first),
    then longer left part first."""
    vocab = set(tokens)
    found = []
    for i, t in enumerate(tokens):
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in vocab and b in vocab:
                found.append((rank[i], -k, a, b))
    found.sort(key=lambda x: (x[0], x[1]))
    return [(a, b) for _, _, a, b in found]


def _sentencepiece_bpe(reader: GGUFReader, tokens: list[str], types: list[int]) -> HFTokenizer:
    n = len(tokens)
    arch = str(reader.metadata.get("general.architecture", ""))
    # runs of real spaces (Gemma's user-defined space tokens) -> runs of "▁"
    tokens = [_SPIECE_SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]
    if arch.startswith("gemma"):
        rank = list(range(n))  # Gemma's merge order is its vocabulary order
    else:
        scores = _as_list(reader, "scores", n)
        rank = [-s for s in scores]
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    unk_id = _meta(reader, "unknown_token_id", None)
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < n else None
    bpe = models.BPE(
        vocab=vocab, merges=_spm_merges(tokens, rank), unk_token=unk, fuse_unk=True,
        byte_fallback=True,
    )  # fmt: skip
    tok = HFTokenizer(bpe)
    steps = [normalizers.Replace(" ", _SPIECE_SPACE)]
    # llama.cpp adds the prefix space to SentencePiece vocabularies unless told otherwise
    if _meta(reader, "add_space_prefix", True):
        steps.insert(0, normalizers.Prepend(_SPIECE_SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence(
        [decoders.Replace(_SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if _meta(reader, "add_space_prefix", True) else [])
    )
    return tok


def _fingerprint(reader: GGUFReader) -> str:
    h = hashlib.sha256()
    for key in sorted(k for k in reader.metadata if k.startswith("tokenizer.ggml.")):
        value = reader.metadata[key]
        h.update(key.encode())
        h.update(value.tobytes() if hasattr(value, "tobytes") else repr(value).encode())
    return h.hexdigest()


_BUILDERS = ("gpt2", "llama")


def tokenizer_from_gguf(path_or_reader: str | os.PathLike[str] | GGUFReader) -> Tokenizer:
    """Rebuild the tokenizer a GGUF file describes (see the module docstring).

    Raises :class:`~qjax.errors.FormatError` naming the file for an unsupported
    ``tokenizer.ggml.model`` or ``pre``, or missing / inconsistent tokenizer metadata.
    """
    reader = path_or_reader if isinstance(path_or_reader, GGUFReader) else read_gguf(path_or_reader)
    model = _meta(reader, "model")
    if model not in _BUILDERS:
        raise FormatError(
            f"{reader.path}: tokenizer: unsupported tokenizer model 'tokenizer.ggml.model' = "
            f"{model!r}; supported: {', '.join(_BUILDERS)}"
        )
    tokens = _as_list(reader, "tokens")
    n = len(tokens)
    has_types = "tokenizer.ggml.token_type" in reader.metadata
    types = _as_list(reader, "token_type", n) if has_types else [_NORMAL] * n
    pre = str(_meta(reader, "pre", "default" if model == "llama" else "gpt-2"))
    if model == "gpt2":
        backend = _byte_level_bpe(reader, tokens, pre)
    else:
        backend = _sentencepiece_bpe(reader, tokens, types)
    added = _added_tokens(tokens, types, backend.get_vocab(with_added_tokens=False))
    backend.add_special_tokens([t for t in added if t.special])
    backend.add_tokens([t for t in added if not t.special])

    def special(key: str) -> int | None:
        i = _meta(reader, f"{key}_token_id", None)
        if i is not None and not 0 <= i < n:
            raise FormatError(f"{reader.path}: tokenizer: {key}_token_id {i} outside [0, {n})")
        return i

    add_bos = bool(_meta(reader, "add_bos_token", model == "llama"))
    return Tokenizer(
        name=f"{model}/{pre}",
        bos_id=special("bos"),
        eos_id=special("eos"),
        vocab_size=n,
        add_bos=add_bos,
        fingerprint=_fingerprint(reader),
        backend=backend,
    )
