"""Exact incremental detokenization and stop-string search, linear in the output length.

The text of a completion is defined against transformers: with P = decode(prompt) and
F = decode(prompt + output) (both `skip_special_tokens=True`, no `clean_up_tokenization_spaces`), the
completion is F[len(common prefix of P and F):]. When P is a prefix of F (always, unless the output
completes or invalidates a character the prompt's last tokens left partial), that is F minus P, so
prompt text + completion text == decode(prompt + output). Decoding the output alone is not it: a
SentencePiece decoder drops the first token's leading space ("Once upon" + "▁a" is "Once upon a",
but "▁a" alone is "a").

`IncrementalDetokenizer` computes that text the way vLLM's incremental detokenizer does: it keeps
`prefix_offset` and `read_offset` into the token ids, starting a few tokens before the end of the
prompt, and decodes only the window from `prefix_offset` on; the text past the decode of
[prefix_offset, read_offset) is new. New text is committed (never to change) only once it is final:
not ending in an incomplete UTF-8 character ("\\ufffd"), and, for byte-fallback tokenizers, not
inside an unterminated run of "<0xNN>" byte tokens (tokenizers' ByteFallback decodes a run as UTF-8 as
a whole, or as one "\\ufffd" per byte when any of it is invalid, so a later byte can still change the
run's earlier characters; such a run streams when a non-byte token ends it). The first window starts
where decoding does not depend on the tokens before it: never inside a run of byte tokens, never
before a byte-level token that starts with a UTF-8 continuation byte, and with at least one
non-special prompt token in the window, so the decoder's first-token rules (Strip, Metaspace) fall on
a prompt token as they do in the full decode.
`find_stop` searches only the tail that can hold a stop string ending in text added since the last
update.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

_INCOMPLETE = "\ufffd"
# vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET: the first window holds the prompt's last 5 tokens
_INITIAL_WINDOW = 5
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass(frozen=True)
class TokenizerTraits:
    """What of a tokenizer's vocabulary makes decoding depend on neighbouring tokens."""

    special: frozenset[int]  # ids that skip_special_tokens drops
    byte_fallback: frozenset[int]  # "<0xNN>" byte tokens
    continuation: frozenset[int]  # byte-level tokens whose first byte is a UTF-8 continuation byte


_traits_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_traits(tokenizer) -> TokenizerTraits:
    """The traits of a transformers tokenizer, computed once per tokenizer (one pass over the vocabulary)."""
    try:
        return _traits_cache[tokenizer]
    except (KeyError, TypeError):
        pass
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special |= {i for i, tok in added.items() if getattr(tok, "special", False)}
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    byte_fallback = {i for tok, i in vocab.items() if tok.startswith("<0x") and _BYTE_TOKEN.fullmatch(tok)}
    continuation = set()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and "ByteLevel" in str(backend.decoder):
        table = _bytes_to_unicode()
        chars = frozenset(table.values())
        starts = frozenset(c for b, c in table.items() if 0x80 <= b < 0xC0)
        # tokenizers' ByteLevel decoder maps a token's characters to bytes when all of them map, else
        # takes the token's UTF-8 (which never starts with a continuation byte)
        continuation = {i for tok, i in vocab.items()
                        if tok and tok[0] in starts and i not in special and set(tok) <= chars}
    traits = TokenizerTraits(frozenset(special), frozenset(byte_fallback), frozenset(continuation))
    try:
        _traits_cache[tokenizer] = traits
    except TypeError:  # not weak-referenceable or not hashable: recomputed per detokenizer
        pass
    return traits


def decode(tokenizer, ids: list[int]) -> str:
    """The decode every text here is defined by: special tokens skipped (as the engine's text always
    was), and no `clean_up_tokenization_spaces` (a WordPiece-era post-pass, off by default in
    transformers 5 and ignored for BPE, that deletes spaces before punctuation after they may have
    been streamed; vLLM does not apply it either)."""
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class IncrementalDetokenizer:
    """The completion text of a growing output, fed by `update(ids)`. `text` is the committed text (it
    only grows, and is a prefix of every later text); `pending` is the rest of the current text (it
    may still change), and `full_text = text + pending` is the completion text of the output so far,
    as the module docstring defines it."""

    def __init__(self, tokenizer, prompt_ids: list[int] | tuple[int, ...] = (), *, skip: int = 0) -> None:
        """`prompt_ids`: the prompt the output continues (its last tokens give the text its context).
        `skip`: how many leading ids of the lists given to `update` are not output (0 when `update`
        gets output ids only; the prompt's length when it gets the whole sequence)."""
        self.tokenizer, self.skip = tokenizer, skip
        self.traits = traits = tokenizer_traits(tokenizer)
        start = _window_start(list(prompt_ids), traits)
        self.ids: list[int] = list(prompt_ids[start:])  # from the first window's start on
        self.num_output = 0
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.text = ""
        self.pending = ""
        self._last = next((t for t in reversed(self.ids) if t not in traits.special), None)
        self._prefix_text: str | None = None  # decode of ids[prefix_offset:read_offset]; None: stale
        self._changed_from = 0  # where in text + pending the last update may have changed things

    def update(self, token_ids: list[int]) -> str:
        """Take the ids of `token_ids[skip:]` not seen yet; returns the newly committed text."""
        return self.add(token_ids[self.skip + self.num_output :])

    def add(self, new: list[int]) -> str:
        """Append output ids; returns the newly committed text."""
        self._changed_from = len(self.text)
        if not new:
            return ""
        self.ids.extend(new)
        self.num_output += len(new)
        special = self.traits.special
        for t in reversed(new):
            if t not in special:
                self._last = t
                break
        if self._prefix_text is None:
            self._prefix_text = decode(self.tokenizer, self.ids[self.prefix_offset : self.read_offset])
        prefix = self._prefix_text
        window = decode(self.tokenizer, self.ids[self.prefix_offset :])
        # The window starts with the prefix's text, except before the first commit when the output
        # completes (or invalidates) a character the prompt left partial: the completion then takes
        # the changed characters too (it starts at the common prefix).
        tail = window[len(prefix) :] if window.startswith(prefix) else window[_common_prefix_len(prefix, window) :]
        if not tail or tail.endswith(_INCOMPLETE) or self._last in self.traits.byte_fallback:
            self.pending = tail
            return ""
        self.text += tail
        self.pending = ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._prefix_text = None
        return tail

    @property
    def full_text(self) -> str:
        return self.text + self.pending

    def find_stop(self, stop: list[str]) -> int:
        """Index in `full_text` of the first stop string, or -1. Only the last
        len(new text) + max(len(stop)) - 1 characters are searched: an earlier match would have been
        found by an earlier call (call it after every `update`)."""
        if not stop:
            return -1
        start = max(0, self._changed_from - (max(len(s) for s in stop) - 1))
        region = self.text[start:] + self.pending
        hits = [i for i in (region.find(s) for s in stop) if i >= 0]
        return start + min(hits) if hits else -1


def completion_text(tokenizer, prompt_ids: list[int], output_ids: list[int]) -> str:
    """The completion text of `output_ids` after `prompt_ids` (module docstring), decoding only the
    prompt's last tokens."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    detok.add(list(output_ids))
    return detok.full_text


def token_texts(tokenizer, prompt_ids: list[int], output_ids: list[int]) -> list[str]:
    """Each output token's share of the completion text: the text committed when it was added (""
    while a character or byte run is incomplete), the last one taking whatever was still pending.
    They concatenate to `completion_text`, so their running lengths are exact text offsets."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    texts = [detok.add([t]) for t in output_ids]
    if texts:
        texts[-1] += detok.pending
    return texts


def _window_start(ids: list[int], traits: TokenizerTraits) -> int:
    """Where the first window starts in the prompt: about `_INITIAL_WINDOW` tokens before its end, moved
    back to a boundary whose right side decodes the same whatever precedes it (module docstring).
    Linear: each step back lands on the previous non-special token."""
    special = traits.special
    p = max(0, len(ids) - _INITIAL_WINDOW)
    right = next((ids[i] for i in range(p, len(ids)) if ids[i] not in special), None)
    left = _previous_nonspecial(ids, p, special)
    while left is not None and not _clean_cut(ids[left], right, traits):
        p = left
        right = ids[left]
        left = _previous_nonspecial(ids, left, special)
    return p


def _previous_nonspecial(ids: list[int], end: int, special: frozenset[int]) -> int | None:
    for i in range(end - 1, -1, -1):
        if ids[i] not in special:
            return i
    return None


def _clean_cut(left: int, right: int | None, traits: TokenizerTraits) -> bool:
    """Whether decoding can start at `right` (the first non-special token of the window) after `left`
    (the last non-special token before it)."""
    if right is None:  # no decoded prompt token in the window: first-token rules would hit the output
        return False
    if right in traits.continuation:  # its first byte may finish a character started before the cut
        return False
    return not (left in traits.byte_fallback and right in traits.byte_fallback)  # inside one byte run


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte ↔ printable-character table, which byte-level BPE vocabularies are written in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def stop_prefix_len(text: str, stop: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string (text a
    stream must hold back until it knows whether a stop string follows)."""
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold
