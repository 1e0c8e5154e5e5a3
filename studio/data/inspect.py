"""What is in a set of KTO rows: label counts, duplicates, empty completions, and token lengths measured the way TRL's
KTOTrainer will measure them (same chat template, same prompt/completion split, same max_length rules).

Row positions here are 0-based indices into the rows given; callers map them to the row numbers users see.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from studio.data.normalize import DataError, completion_text, is_conversation
from studio.data.trl_data import common_prefix_length, kto_token_ids

Progress = Callable[[float, str], None] | None


# ---- tokenizer -----------------------------------------------------------------------------------------------------

_tokenizers: dict[str, Any] = {}


def load_tokenizer(model: Any) -> Any:
    """A tokenizer from a tokenizer object, the bundled model's name, a local folder / .gguf file or a hub id.

    Hub ids load only the tokenizer files, never the weights: measuring lengths must not start a 15 GB download."""
    if not isinstance(model, (str, Path)):
        return model
    model = str(model)
    if model in _tokenizers:
        return _tokenizers[model]
    from transformers import AutoTokenizer

    from studio.config.run import BUNDLED_MODEL
    from studio.models.load import ModelLoadError, resolve_source

    from studio.models import hub

    kw = {}
    try:
        if model == BUNDLED_MODEL or Path(model).expanduser().exists():
            path = resolve_source(model).path
        else:
            path = model
            if hub.offline():  # the cache answers at once; the hub would be retried for a minute
                kw["local_files_only"] = True
        # never transformers' "[y/N]" question (printed on stdout, into the CLI's JSON): custom code is not run
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False, **kw)
    except ModelLoadError as e:
        raise DataError(f"cannot load the tokenizer of {model}: {e}") from None
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise DataError(f"cannot load the tokenizer of {model} (ValueError): check the model id or folder, "
                            "and that you are online for hub models") from None
        raise DataError(f"the tokenizer of {model} needs custom code from its repository (trust_remote_code), which "
                        "the studio does not run to measure lengths: measure with another model of the same "
                        "tokenizer family, or leave the model out") from None
    except Exception as e:  # hub/offline/corrupt-folder errors come in many types
        if kw.get("local_files_only"):
            raise DataError(f"cannot load the tokenizer of {model}: it is not in the local cache and the hub cannot "
                            "be reached (download the model when online, or pick the bundled model)") from None
        raise DataError(f"cannot load the tokenizer of {model} ({type(e).__name__}): check the model id or folder, "
                        "and that you are online for hub models") from None
    _tokenizers[model] = tok
    return tok


# ---- token lengths -------------------------------------------------------------------------------------------------
# Tokenizing costs about 95 bytes of memory per byte of text (a 50 MiB row: 4.8 GB), so no row is tokenized whole:
# each prompt and completion is cut at CHAR_CAP characters first (8 characters a token, far above any usable
# max_length), a row that was cut is reported as "too long" with at least TOKEN_CAP tokens, and rows are tokenized in
# batches of at most BATCH_CHARS characters. Measuring costs O(rows), not O(the longest row).
TOKEN_CAP = 32768  # the longest max_length the studio plans for
CHARS_PER_TOKEN = 8  # well above what any tokenizer packs into a token of real text
CHAR_CAP = TOKEN_CAP * CHARS_PER_TOKEN
BATCH_CHARS = 4 * CHAR_CAP


def _cut(value: Any, cap: int) -> tuple[Any, bool]:
    """``value`` (text or a list of messages) with at most ``cap`` characters of text, and whether it was cut."""
    if isinstance(value, str):
        return (value[:cap], True) if len(value) > cap else (value, False)
    if is_conversation(value):
        out, left, cut = [], cap, False
        for m in value:
            content = m.get("content")
            if isinstance(content, str) and len(content) > left:
                m, cut = {**m, "content": content[:left]}, True
            left = max(0, left - (len(m["content"]) if isinstance(m.get("content"), str) else 0))
            out.append(m)
        return out, cut
    return value, False


def _size(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if is_conversation(value):
        return sum(len(m["content"]) for m in value if isinstance(m.get("content"), str))
    return 0

@dataclass
class TokenLengths:
    """Per row: prompt, completion and total tokens as the trainer splits them."""

    prompt: list[int]
    completion: list[int]
    total: list[int]
    mismatched: list[int]  # rows whose tokenized prompt is not a prefix of the tokenized prompt+completion
    mismatch_example: str | None = None  # the prompt tail that gets lost, decoded, for the first such row
    too_long: list[int] = field(default_factory=list)  # rows cut at CHAR_CAP before measuring: >= TOKEN_CAP tokens

    def stats(self) -> dict[str, dict[str, int]]:
        out = {}
        for name in ("prompt", "completion", "total"):
            values = sorted(getattr(self, name))
            if values:
                out[name] = {"min": values[0], "median": int(statistics.median(values)),
                             "p95": values[min(len(values) - 1, int(0.95 * len(values)))], "max": values[-1]}
        return out


def token_lengths(rows: list[dict[str, Any]], tokenizer: Any, progress: Progress = None,
                  chunk: int = 256) -> TokenLengths:
    """Token lengths the way TRL's KTOTrainer tokenizes: conversations through the chat template (prompt with the
    generation prompt, then prompt+completion), text with EOS appended to the completion; the completion starts
    where the two token sequences diverge."""
    out = TokenLengths([], [], [], [])
    if not rows:
        return out
    conv = is_conversation(rows[0]["prompt"])
    if conv and not getattr(tokenizer, "chat_template", None):
        raise DataError("the rows are conversations but this model's tokenizer has no chat template: pick an "
                        "instruct/chat model, or use text prompts")
    start = 0
    while start < len(rows):
        # a batch: at most ``chunk`` rows and BATCH_CHARS characters; each prompt and completion cut at CHAR_CAP
        part, cut, chars = [], [], 0
        while start + len(part) < len(rows) and len(part) < chunk and (not part or chars < BATCH_CHARS):
            r = rows[start + len(part)]
            prompt, p_cut = _cut(r["prompt"], CHAR_CAP)
            completion, c_cut = _cut(r["completion"], CHAR_CAP)
            part.append({"prompt": prompt, "completion": completion})
            cut.append((p_cut, c_cut))
            chars += _size(prompt) + _size(completion)
        prompt_ids, full_ids = kto_token_ids(tokenizer, part, conv)
        for i, (p, f, (p_cut, c_cut)) in enumerate(zip(prompt_ids, full_ids, cut), start=start):
            k = common_prefix_length(p, f)
            prompt_n, completion_n = k, len(f) - k
            if p_cut:
                prompt_n = max(prompt_n, TOKEN_CAP)
            if c_cut:
                completion_n = max(completion_n, TOKEN_CAP)
            out.prompt.append(prompt_n)
            out.completion.append(completion_n)
            out.total.append(prompt_n + completion_n)
            if p_cut or c_cut:
                out.too_long.append(i)
            elif k < len(p):
                out.mismatched.append(i)
                if out.mismatch_example is None:
                    out.mismatch_example = tokenizer.decode(p[k:])
        del prompt_ids, full_ids
        start += len(part)
        if progress:
            progress(min(1.0, start / len(rows)), "measuring token lengths")
    return out


# ---- the report ----------------------------------------------------------------------------------------------------

@dataclass
class Report:
    n_rows: int
    n_desirable: int
    n_undesirable: int
    n_unlabeled: int
    duplicates: list[int] = field(default_factory=list)  # repeats an earlier row (same prompt, completion, label)
    conflicts: list[int] = field(default_factory=list)  # same prompt + completion also appears with the other label
    empty_completions: list[int] = field(default_factory=list)
    empty_prompts: list[int] = field(default_factory=list)
    lengths: TokenLengths | None = None
    max_length: int | None = None
    truncated: list[int] = field(default_factory=list)  # longer than max_length: the end is cut off
    dropped: list[int] = field(default_factory=list)  # the prompt alone fills max_length: the trainer drops the row
    tokenizer_note: str | None = None  # why lengths are missing

    @property
    def mismatched(self) -> list[int]:
        return self.lengths.mismatched if self.lengths else []

    def problems(self, row_numbers: list[int] | None = None) -> list[dict[str, Any]]:
        """Findings as {kind, rows, message}; ``rows`` are ``row_numbers[i]`` (default: i + 1)."""
        def nums(idx: list[int]) -> list[int]:
            return sorted({row_numbers[i] if row_numbers else i + 1 for i in idx})

        out = []

        def add(kind: str, idx: list[int], message: str) -> None:
            if idx:
                out.append({"kind": kind, "count": len(idx), "rows": nums(idx), "message": message})

        add("duplicate", self.duplicates, "exact repeats of an earlier row (same prompt, completion and label)")
        add("conflicting_labels", self.conflicts,
            "the same prompt and completion labelled both desirable and undesirable (e.g. a pair whose chosen and "
            "rejected are equal): they cancel out")
        add("empty_completion", self.empty_completions, "completion is empty or only whitespace")
        add("empty_prompt", self.empty_prompts, "prompt is empty or only whitespace")
        if self.max_length:
            add("over_length", self.truncated,
                f"longer than max_length={self.max_length} tokens: the trainer cuts off the end of the completion")
            add("prompt_too_long", self.dropped,
                f"the prompt alone fills max_length={self.max_length} tokens: the trainer drops these rows")
        if self.lengths and self.lengths.too_long:
            add("too_long", self.lengths.too_long,
                f"far beyond any usable length (a prompt or completion over {CHAR_CAP:,} characters, at least "
                f"{TOKEN_CAP:,} tokens): measured only up to there; such rows are dropped or cut by the trainer")
        if self.lengths and self.lengths.mismatched:
            add("chat_template_mismatch", self.lengths.mismatched,
                "the tokenized prompt is not a prefix of the tokenized prompt+completion (chat template renders the "
                "prompt differently, or tokens merge across the boundary, e.g. a prompt ending in a space): the "
                f"trainer leaves out {self.lengths.mismatch_example!r} at the end of the prompt")
        return out


def _blank(text: str) -> bool:
    return not text or text.isspace()  # as ``not text.strip()``, without copying a long text


def _words(text: str) -> str:
    """``text`` with its whitespace normalised; a very long text as a digest of its words, read a block at a time
    (splitting it whole would cost many times its size)."""
    if len(text) <= CHAR_CAP:
        return " ".join(text.split())
    import hashlib

    h, carry, pos, block = hashlib.sha256(), "", 0, 1 << 20
    while pos < len(text):
        piece = carry + text[pos:pos + block]
        pos += block
        words = piece.split()
        carry = words.pop() if words and pos < len(text) and not piece[-1].isspace() else ""
        if len(carry) > block:  # one "word" of megabytes: hashed as it comes
            h.update(carry.encode("utf-8", "surrogatepass"))
            carry = ""
        if words:
            h.update((" ".join(words) + " ").encode("utf-8", "surrogatepass"))
    if carry:
        h.update((carry + " ").encode("utf-8", "surrogatepass"))
    return "\x00sha256:" + h.hexdigest()


def _key(value: Any) -> str:
    """Comparable text of a prompt or completion; whitespace differences don't make a row unique."""
    if is_conversation(value):
        return "\x1e".join(f"{m.get('role')}\x1f{_words(str(m.get('content')))}" for m in value)
    return _words(completion_text(value))


def inspect_rows(rows: list[dict[str, Any]], tokenizer: Any = None, max_length: int | None = None,
                 progress: Progress = None, lengths: TokenLengths | None = None,
                 row_numbers: list[int] | None = None) -> Report:
    """Everything the Data tab and ``python -m studio data`` report about ``rows``.

    ``tokenizer``: a tokenizer, a model id/path, or None to skip token lengths. A tokenizer that cannot be loaded
    leaves the lengths out and says why in ``tokenizer_note``; the rest of the report still comes back.
    ``lengths``: token lengths measured before (they don't depend on labels, so a label edit needn't re-tokenize).
    ``row_numbers``: each row's place in the user's file; of repeated rows, the one earliest in the file is the
    original (rows made from pairs are shuffled, so list order would pick an arbitrary one)."""
    labels = [r.get("label") for r in rows]
    rep = Report(n_rows=len(rows), n_desirable=sum(1 for x in labels if x is True),
                 n_undesirable=sum(1 for x in labels if x is False),
                 n_unlabeled=sum(1 for x in labels if x is None), max_length=max_length)
    seen: dict[tuple[str, str], dict[Any, int]] = {}
    order = sorted(range(len(rows)), key=lambda i: (row_numbers[i], i)) if row_numbers else range(len(rows))
    for i in order:
        r = rows[i]
        key = (_key(r["prompt"]), _key(r["completion"]))
        by_label = seen.setdefault(key, {})
        if r.get("label") in by_label:
            rep.duplicates.append(i)
        else:
            by_label[r.get("label")] = i
    rep.duplicates.sort()
    for i, r in enumerate(rows):
        if _blank(completion_text(r["completion"])):
            rep.empty_completions.append(i)
        if _blank(completion_text(r["prompt"])):
            rep.empty_prompts.append(i)
    for i, r in enumerate(rows):
        by_label = seen[(_key(r["prompt"]), _key(r["completion"]))]
        if True in by_label and False in by_label:
            rep.conflicts.append(i)
    if lengths is not None:
        rep.lengths = lengths
    elif tokenizer is not None:
        try:
            rep.lengths = token_lengths(rows, load_tokenizer(tokenizer), progress)
        except DataError as e:
            rep.tokenizer_note = str(e)
    if rep.lengths and max_length:
        for i, (p, t) in enumerate(zip(rep.lengths.prompt, rep.lengths.total)):
            if p >= max_length:
                rep.dropped.append(i)
            elif t > max_length:
                rep.truncated.append(i)
    return rep
