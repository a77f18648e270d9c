"""Engine logprob entries rendered in the completions and chat wire formats.

Each chosen token is named by its share of the returned text (`detokenizer.token_texts`: "" while a
character is split over tokens, the completing token carrying it), so tokens concatenate to the text and
`text_offset` indexes into it. Top-logprob alternatives keep their context-free names
(`ServeState.token_str`, as vLLM names them), so top-k dicts from this server and from vLLM compare by
name (`bench.endpoint_accuracy`)."""

from __future__ import annotations

from optcli.serve.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from optcli.serve.state import ServeState


def completion_logprobs(state: ServeState, texts: list[str], entries: list, offset: int,
                        first_null: bool = False) -> CompletionLogprobs:
    """`texts`: each token's share of the text, which starts at `offset`. `first_null`: the first token
    has no entry (an echoed prompt's first token)."""
    lp = CompletionLogprobs()
    for j, tok in enumerate(texts):
        entry = None
        if not (first_null and j == 0):
            k = j - 1 if first_null else j
            entry = entries[k] if k < len(entries) else None
        lp.tokens.append(tok)
        lp.text_offset.append(offset)
        offset += len(tok)
        if entry is None:
            lp.token_logprobs.append(None)
            lp.top_logprobs.append(None)
        else:
            logprob, _, top = entry
            lp.token_logprobs.append(float(logprob))
            tops: dict[str, float] = {}
            for t, v in top.items():
                tops.setdefault(state.token_str(t), float(v))
            lp.top_logprobs.append(tops)
    return lp


def merge_lp(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs, text_offset=a.text_offset + b.text_offset)


def chat_logprobs(state: ServeState, texts: list[str], entries: list) -> ChatLogprobs:
    """`texts`: each token's share of the message content."""
    content = []
    for tok, entry in zip(texts, entries, strict=False):
        logprob, _, top = entry
        content.append(ChatTokenLogprob(
            token=tok, logprob=float(logprob), bytes=list(tok.encode()),
            top_logprobs=[TopLogprob(token=state.token_str(t), logprob=float(v),
                                     bytes=list(state.token_str(t).encode())) for t, v in top.items()],
        ))
    return ChatLogprobs(content=content)
