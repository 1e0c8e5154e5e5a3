"""Before training, the studio shows what is in the data, measured with the chosen model's tokenizer exactly the way
TRL's KTOTrainer will cut it into prompt and completion."""
from __future__ import annotations

import copy

import pytest

from studio.data.inspect import inspect_rows, load_tokenizer, token_lengths
from studio.data.normalize import normalize


@pytest.fixture(scope="module")
def tok(bundled_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_model_dir)


def conv(user, reply):
    return {"prompt": [{"role": "user", "content": user}], "completion": [{"role": "assistant", "content": reply}]}


def trl_split(tok, row):
    """What TRL's KTOTrainer computes for one row (its own tokenize helper and prefix rule)."""
    from trl.data_utils import _tokenize, common_prefix_length

    if isinstance(row["prompt"], list):
        p = _tokenize(tok, row["prompt"], add_generation_prompt=True)["input_ids"]
        f = _tokenize(tok, row["prompt"] + row["completion"])["input_ids"]
    else:
        completion = row["completion"] + tok.eos_token
        p = _tokenize(tok, row["prompt"])["input_ids"]
        f = _tokenize(tok, row["prompt"] + completion)["input_ids"]
    k = common_prefix_length(p, f)
    return k, len(f) - k, len(f)


def test_conversation_lengths_match_the_trainer(tok):
    rows = [dict(conv("What is the capital of France?", "Paris."), label=True),
            dict(conv("Write a haiku about rain " * 5, "Drops on the window\n" * 4), label=False)]
    lengths = token_lengths(rows, tok)
    assert list(zip(lengths.prompt, lengths.completion, lengths.total)) == [trl_split(tok, r) for r in rows]
    assert lengths.mismatched == []


def test_text_lengths_match_the_trainer_including_eos(tok):
    rows = [{"prompt": "The sky is", "completion": " blue.", "label": True},
            {"prompt": "Two plus two is", "completion": " five, obviously.", "label": False}]
    lengths = token_lengths(rows, tok)
    assert list(zip(lengths.prompt, lengths.completion, lengths.total)) == [trl_split(tok, r) for r in rows]


def test_max_length_counts_truncated_and_dropped_rows(tok):
    short = dict(conv("hi", "hello"), label=True)
    long_reply = dict(conv("hi", "word " * 200), label=True)
    long_prompt = dict(conv("word " * 200, "ok"), label=False)
    rep = inspect_rows([short, long_reply, long_prompt], tok, max_length=64)
    assert rep.lengths.total[0] <= 64 < rep.lengths.total[1]
    assert rep.truncated == [1]
    assert rep.dropped == [2]
    kinds = {p["kind"]: p["rows"] for p in rep.problems()}
    assert kinds["over_length"] == [2] and kinds["prompt_too_long"] == [3]


def test_prompt_ending_in_a_space_is_flagged_as_a_tokenization_mismatch(tok):
    rows = [{"prompt": "The sky is ", "completion": "blue", "label": True},
            {"prompt": "The sky is", "completion": " blue", "label": True}]
    rep = inspect_rows(rows, tok)
    assert rep.mismatched == [0]
    problem = next(p for p in rep.problems() if p["kind"] == "chat_template_mismatch")
    assert problem["rows"] == [1] and "' '" in problem["message"]


def test_chat_template_that_renders_the_prompt_differently_is_flagged(tok):
    odd = copy.deepcopy(tok)
    # a "thinking" template: the generation prompt opens a block the finished conversation doesn't have
    odd.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
    rows = [dict(conv("hi", "hello"), label=True), dict(conv("yo", "sup"), label=False)]
    assert inspect_rows(rows, tok).mismatched == []
    rep = inspect_rows(rows, odd)
    assert rep.mismatched == [0, 1]
    assert "think" in rep.lengths.mismatch_example


def test_conversations_need_a_chat_template(tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    rep = inspect_rows([dict(conv("hi", "hello"), label=True)], bare, max_length=32)
    assert rep.lengths is None
    assert "no chat template" in rep.tokenizer_note


def test_duplicates_conflicts_and_empty_rows():
    rows = normalize([
        {"prompt": "q1", "completion": "a1", "label": True},
        {"prompt": "q1 ", "completion": "a1", "label": True},  # same after whitespace: a duplicate
        {"prompt": "q2", "completion": "same", "label": True},
        {"prompt": "q2", "completion": "same", "label": False},  # a pair whose chosen == rejected
        {"prompt": "q3", "completion": "   ", "label": False},
        {"prompt": "", "completion": "a4", "label": True},
    ]).rows
    rep = inspect_rows(rows)
    assert rep.duplicates == [1]
    assert rep.conflicts == [2, 3]
    assert rep.empty_completions == [4]
    assert rep.empty_prompts == [5]
    assert (rep.n_desirable, rep.n_undesirable) == (4, 2)
    assert rep.lengths is None  # no tokenizer asked for
    problems = {p["kind"]: p["rows"] for p in rep.problems(row_numbers=[10, 11, 12, 13, 14, 15])}
    assert problems == {"duplicate": [11], "conflicting_labels": [12, 13], "empty_completion": [14],
                        "empty_prompt": [15]}


def test_tokenizer_loads_from_the_bundled_name_and_a_folder(bundled_model_dir):
    from studio.config.run import BUNDLED_MODEL

    assert load_tokenizer(BUNDLED_MODEL).eos_token == "<|im_end|>"
    assert load_tokenizer(str(bundled_model_dir)).eos_token == "<|im_end|>"


def test_unreachable_model_leaves_lengths_out_with_a_reason():
    rep = inspect_rows([{"prompt": "p", "completion": "c", "label": True}], "nobody/no-such-model", 64)
    assert rep.lengths is None
    assert rep.tokenizer_note.startswith("cannot load the tokenizer of nobody/no-such-model")
    assert rep.n_desirable == 1


# ---- issue 28, case 3: measuring one huge row costs a bounded amount ------------------------------------------

class _Recording:
    """A tokenizer that records the longest text it was given (to tokenize or to render as a chat)."""

    def __init__(self, tok):
        self._tok, self.longest = tok, 0

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def _seen(self, texts):
        for t in texts if isinstance(texts, list) else [texts]:
            n = len(t) if isinstance(t, str) else sum(len(m.get("content") or "") for m in t)
            self.longest = max(self.longest, n)

    def __call__(self, texts, *a, **kw):
        self._seen(texts)
        return self._tok(texts, *a, **kw)

    def apply_chat_template(self, conversations, *a, **kw):
        self._seen(conversations)
        return self._tok.apply_chat_template(conversations, *a, **kw)


def test_a_row_of_several_megabytes_is_measured_from_a_bounded_slice(bundled_model_dir):
    from transformers import AutoTokenizer

    from studio.data import inspect

    tok = _Recording(AutoTokenizer.from_pretrained(bundled_model_dir))
    huge = "lorem ipsum dolor sit amet " * 200_000  # 5.4 MB in one completion
    rows = [{"prompt": "Say it all.", "completion": huge, "label": True},
            {"prompt": "Hi", "completion": "Hello!", "label": False},
            {"prompt": "Say it all.", "completion": huge + "  ", "label": True}]  # the same words: a duplicate
    rep = inspect.inspect_rows(rows, tok, max_length=128)
    assert tok.longest <= 2 * inspect.CHAR_CAP + 100  # prompt + cut completion, never the whole row
    assert rep.lengths.too_long == [0, 2]
    assert rep.lengths.total[0] >= inspect.TOKEN_CAP and rep.lengths.total[1] < 20
    assert rep.truncated == [0, 2] and rep.duplicates == [2]
    kinds = {p["kind"]: p for p in rep.problems()}
    assert kinds["too_long"]["rows"] == [1, 3] and "far beyond any usable length" in kinds["too_long"]["message"]
