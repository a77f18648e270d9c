"""`profile --dataset FILE`: the user's own prompts instead of synthetic ones.

A JSONL file (one object a line) or a JSON list of objects, each row one of:
- `{"prompt": "text"}`;
- `{"messages": [{"role": "user", "content": "..."}, ...]}` (OpenAI chat);
- `{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...]}`
  (ShareGPT: the turns before the first reply are the prompt, and the reply's length in tokens, when a
  tokenizer is known, is the request's output length, as `vllm bench serve` reads ShareGPT);
and optionally `"output_tokens": N`. In process, chat rows are rendered with the tokenizer's chat template
(a "role: content" transcript where it has none); to an endpoint they go as chat completions, so the
server applies its own template. `--output-len @FILE` draws output lengths from such a file (`LengthsFrom`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from optcli.bench.load_generator import Chat
from optcli.errors import UsageError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class DatasetRow:
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] = ()  # (role, content)
    reply: str | None = None  # ShareGPT's first reply: its length sets the output length
    output_tokens: int | None = None

    def text(self, tokenizer) -> str:
        """The prompt as text: itself, or the chat rendered for `tokenizer` (a transcript without one)."""
        if self.prompt is not None:
            return self.prompt
        chat = [{"role": r, "content": c} for r, c in self.messages]
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return "".join(f"{r}: {c}\n" for r, c in self.messages) + "assistant:"

    def chat(self) -> Chat | str:
        """What an endpoint is sent: the messages of a chat row, the text of a prompt row."""
        if self.prompt is not None:
            return self.prompt
        return Chat({"role": r, "content": c} for r, c in self.messages)

    def max_tokens(self, tokenizer, default: int) -> int:
        if self.output_tokens is not None:
            return self.output_tokens
        if self.reply is not None and tokenizer is not None:
            return max(1, len(tokenizer(self.reply, add_special_tokens=False).input_ids))
        return default


@dataclass(frozen=True)
class LengthsFrom:
    """`--output-len @FILE`: each request's output length drawn from a dataset's rows, their `output_tokens`
    or the length of their ShareGPT reply (in the tokenizer's tokens)."""

    path: str
    rows: tuple[DatasetRow, ...]

    def draw(self, rng: random.Random, tokenizer) -> int:
        row = rng.choice(self.rows)
        if row.output_tokens is None and tokenizer is None:
            raise UsageError(f"--output-len @{self.path}: a ShareGPT reply's length needs a tokenizer (pass "
                             "--tokenizer MODEL, or give the rows output_tokens)")
        return row.max_tokens(tokenizer, 1)

    def __str__(self) -> str:
        return f"@{self.path}"


def output_lengths(path: str) -> LengthsFrom:
    rows = tuple(r for r in load_dataset(Path(path)) if r.output_tokens is not None or r.reply is not None)
    if not rows:
        raise UsageError(f"--output-len @{path}: no row has output_tokens or a ShareGPT reply to take a length from")
    return LengthsFrom(path, rows)


def _row(obj, where: str) -> DatasetRow:
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected an object with prompt, messages or conversations")
    out = obj.get("output_tokens")
    if out is not None and (isinstance(out, bool) or not isinstance(out, int) or out < 1):
        raise UsageError(f"{where}: output_tokens must be a positive integer (got {out!r})")
    if isinstance(obj.get("prompt"), str):
        if not obj["prompt"].strip():  # no tokens to send: the engine (or server) would refuse it mid-run
            raise UsageError(f"{where}: prompt is empty")
        return DatasetRow(prompt=obj["prompt"], output_tokens=out)
    if isinstance(obj.get("messages"), list):
        msgs = tuple((str(m.get("role", "user")), str(m.get("content", ""))) for m in obj["messages"]
                     if isinstance(m, dict))
        if not msgs:
            raise UsageError(f"{where}: messages is empty")
        return DatasetRow(messages=msgs, output_tokens=out)
    if isinstance(obj.get("conversations"), list):
        turns, reply = [], None
        for t in obj["conversations"]:
            role = SHAREGPT_ROLES.get(str(t.get("from", "")).lower()) if isinstance(t, dict) else None
            if role == "assistant":
                reply = str(t.get("value", ""))
                break
            if role is not None:
                turns.append((role, str(t.get("value", ""))))
        if not turns:
            raise UsageError(f"{where}: conversations has no turn before the first reply")
        return DatasetRow(messages=tuple(turns), reply=reply, output_tokens=out)
    raise UsageError(f"{where}: a row needs prompt (text), messages (OpenAI chat) or conversations (ShareGPT)")


def load_dataset(path: Path) -> tuple[DatasetRow, ...]:
    """Every row of a JSONL or JSON dataset file; any problem is exit 2 naming the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"--dataset {path}: cannot read ({e.strerror or e})") from None
    rows: list[DatasetRow] = []
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--dataset {path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        rows = [_row(obj, f"--dataset {path}: item {i}") for i, obj in enumerate(items)]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"--dataset {path}: line {n}: invalid JSON ({e.msg})") from None
            rows.append(_row(obj, f"--dataset {path}: line {n}"))
    if not rows:
        raise UsageError(f"--dataset {path}: no rows")
    return tuple(rows)
