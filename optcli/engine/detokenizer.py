"""Incremental detokenization and stop-string search, linear in the output length.

`IncrementalDetokenizer` follows vLLM / HF TGI: it keeps `prefix_offset` and `read_offset` into the
token ids and decodes only the small window from `prefix_offset` on, emitting the part past the
decoded prefix once it no longer ends in an incomplete UTF-8 character ("\\ufffd"). Text is
decoded with `skip_special_tokens=True`, as the engine's final text is. `find_stop` searches only
the tail that can hold a stop string ending in text added since the last update.
"""

from __future__ import annotations

_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """Text of a growing token list, fed by `update(ids)`. `text` is the committed text (it only
    grows); `pending` is the decode of tokens not committed yet (it may end in "\\ufffd"), and
    `text + pending` is the whole decode."""

    def __init__(self, tokenizer, skip: int = 0) -> None:
        """`skip`: how many leading ids of the lists given to `update` are not part of the text
        (a sequence's prompt)."""
        self.tokenizer, self.skip = tokenizer, skip
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""
        self.pending = ""
        self._prefix_text: str | None = ""  # decode of ids[prefix_offset:read_offset]; None: stale
        self._changed_from = 0  # where in text + pending the last update may have changed things

    def update(self, token_ids: list[int]) -> str:
        """Take the ids of `token_ids[skip:]` not seen yet; returns the newly committed text."""
        start = self.skip + len(self.ids)
        new = token_ids[start:]
        self._changed_from = len(self.text)
        if not new:
            return ""
        self.ids.extend(new)
        if self._prefix_text is None:
            self._prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        window = self._decode(self.ids[self.prefix_offset :])
        tail = window[len(self._prefix_text) :]
        if not tail or tail.endswith(_INCOMPLETE):
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

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


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
