"""Constrained decoding: JSON-schema grammars as per-token masks, with llguidance.

llguidance was picked over xgrammar (benchmarks/grammar_mask.py measures both on our tokenizers): both
cost a few microseconds per token at our vocabulary sizes, far below a decode step, but llguidance
refuses the schema keywords it cannot enforce (xgrammar accepted `not` and ignored it), compiles
lazily (hostile schemas took xgrammar up to ~1 s: 300 nested arrays, a 20k-value enum) and bounds the
work of every mask with its parser limits, so a client's schema cannot stall the engine thread.

One `Grammars` per engine holds the llguidance tokenizer (built once, lazily: ~10 ms for 1k tokens,
~1 s for 128k); each constrained sequence gets its own `LLMatcher`. JSON is compact (no free
whitespace): small models otherwise loop on spaces and newlines until max_tokens.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import torch

from optcli.engine.sampling_params import SamplingParamsError

_JSON_OPTIONS = {"whitespace_flexible": False}
# Nesting deeper than this is refused before llguidance sees the schema (its own limit errors are
# clear, but json.dumps of a deeper dict would hit Python's recursion limit first).
MAX_SCHEMA_DEPTH = 64
_CACHE = 64


def _depth(node: Any, limit: int) -> int:
    stack, deepest = [(node, 1)], 0
    while stack:
        item, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, d + 1) for v in item)
    return deepest


class Grammars:
    """Builds an `LLMatcher` per constrained sequence and turns matchers into boolean token masks."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._lltok = None
        self._lock = threading.Lock()
        self._bits = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()  # schema text → a fresh matcher to copy

    def matcher(self, schema: dict[str, Any], param: str = "json_schema"):
        """A fresh matcher for `schema`; a schema llguidance cannot enforce raises SamplingParamsError.
        Compiled schemas are kept (the last _CACHE), so the server's check before answering and the
        engine's add_request compile a schema once."""
        if _depth(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
            raise SamplingParamsError(param, f"the JSON schema is nested deeper than {MAX_SCHEMA_DEPTH} levels")
        key = json.dumps(schema, sort_keys=True)
        with self._lock:
            template = self._compiled.get(key)
            if template is not None:
                self._compiled.move_to_end(key)
                return template.deep_copy()
        template = self._compile(key, param)
        with self._lock:
            self._compiled[key] = template
            while len(self._compiled) > _CACHE:
                self._compiled.popitem(last=False)
            return template.deep_copy()

    def _ll_tokenizer(self):
        with self._lock:
            if self._lltok is None:
                import llguidance.hf

                try:
                    self._lltok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                               eos_token=self.eos_token_ids or None)
                except (ValueError, TypeError) as e:
                    raise SamplingParamsError(
                        "json_schema", f"this model's tokenizer does not support constrained decoding: {e}"
                    ) from None
            return self._lltok

    def _compile(self, schema_text: str, param: str):
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_text, defaults=_JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise SamplingParamsError(param, f"invalid JSON schema: {e}") from None
        limits = llguidance.LLParserLimits(verbose_errors=False)
        m = llguidance.LLMatcher(self._ll_tokenizer(), grammar, log_level=0, limits=limits)
        if not m.is_error():
            self.fill([m])  # some errors (e.g. a $ref cycle) only show when the first mask is computed
        if m.is_error():
            raise SamplingParamsError(param, f"unsupported JSON schema: {_first_line(m.get_error())}")
        return m

    def fill(self, matchers: list) -> torch.Tensor:
        """Allowed tokens [len(matchers), vocab] (bool) of each matcher's next step. A matcher in an
        error state (a resource limit hit mid-way) allows EOS only, so its sequence ends."""
        words = (self.vocab_size + 31) // 32
        bitmask = torch.empty(len(matchers), words, dtype=torch.int32)
        for i, m in enumerate(matchers):
            row = bitmask[i]
            m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        if self._bits is None:
            self._bits = torch.arange(32, dtype=torch.int32)
        allowed = ((bitmask.unsqueeze(-1) >> self._bits) & 1).bool().view(len(matchers), words * 32)
        allowed = allowed[:, : self.vocab_size].clone()
        stuck = set((~allowed.any(dim=1)).nonzero().flatten().tolist())
        stuck.update(i for i, m in enumerate(matchers) if m.is_error())
        for i in stuck:
            allowed[i] = False
            allowed[i, self.eos_token_ids] = True
        return allowed


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0][:300] if message.strip() else "grammar error"
