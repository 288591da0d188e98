"""Incremental detokenization with the embedded SmolLM2 tokenizer (byte-level BPE)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from workers.weights.gguf import embedded_gguf_path
from workers.weights.tokenizer import IncrementalDetokenizer, Tokenizer

REPLACEMENT = "\ufffd"

TEXTS = [
    "Hello, world! Plain ASCII with numbers 12345.",
    "Llamas 🦙 and DNA 🧬, a family 👨‍👩‍👧 and a grin 😀",
    "你好，世界。日本語のテキスト、한국어 텍스트",
    "combining marks: e\u0301 n\u0303 a\u0308\u0301 Z\u0351\u0352",
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 Ω≈ç√∫ and accents àéîõü",
    "  leading spaces,\ttabs\nand\r\nnewlines  ",
    "mixed: 漢字 😀 123abc456 <b>tags</b>",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(embedded_gguf_path())


def _stream(detokenizer: IncrementalDetokenizer, ids: Sequence[int], chunk_sizes: Sequence[int]):
    deltas, start = [], 0
    for size in chunk_sizes:
        deltas.append(detokenizer.add(ids[start : start + size]))
        start += size
    assert start == len(ids)
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_never_emits_broken_characters(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = _stream(detokenizer, ids, [1] * len(ids))
    assert not any(REPLACEMENT in delta for delta in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert detokenizer.flush() == ""


def test_cases_really_split_characters_across_tokens(tokenizer: Tokenizer) -> None:
    # Otherwise the test above would not exercise the hold-back path.
    for text in TEXTS[1:5]:
        pieces = [tokenizer.decode([token_id]) for token_id in tokenizer.encode(text)]
        assert any(REPLACEMENT in piece for piece in pieces), text


def test_delta_waits_until_the_character_is_complete(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a🦙")
    assert len(ids) == 4  # "a" and three byte tokens
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert [detokenizer.add([token_id]) for token_id in ids] == ["a", "", "", "🦙"]


@pytest.mark.parametrize("seed", range(3))
def test_random_chunks_after_a_prompt(tokenizer: Tokenizer, seed: int) -> None:
    prompt_ids = tokenizer.encode("<|im_start|>user\nSay something 🦙<|im_end|>\n")
    ids = tokenizer.encode(" ".join(TEXTS))
    rng = random.Random(seed)
    chunk_sizes = []
    while sum(chunk_sizes) < len(ids):
        chunk_sizes.append(min(rng.randint(1, 4), len(ids) - sum(chunk_sizes)))
    deltas = _stream(IncrementalDetokenizer(tokenizer, prompt_ids), ids, chunk_sizes)
    assert not any(REPLACEMENT in delta for delta in deltas)
    assert "".join(deltas) == tokenizer.decode(ids)


def test_incomplete_tail_is_held_back_until_flush(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 你好")[:-1]  # the last byte of 好 is missing
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = _stream(detokenizer, ids, [1] * len(ids))
    assert "".join(deltas) == "ok 你"
    tail = detokenizer.flush()
    assert tail.endswith(REPLACEMENT)
    assert "".join(deltas) + tail == tokenizer.decode(ids)


def test_replacement_character_in_the_text_is_emitted(tokenizer: Tokenizer) -> None:
    text = f"bad {REPLACEMENT} byte{REPLACEMENT}"
    ids = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = _stream(detokenizer, ids, [1] * len(ids))
    assert "".join(deltas) + detokenizer.flush() == text


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_special_tokens(tokenizer: Tokenizer, skip_special_tokens: bool) -> None:
    ids = tokenizer.encode("<|im_start|>assistant\nhi 😀<|im_end|>")
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    text = "".join(_stream(detokenizer, ids, [1] * len(ids)))
    assert text == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert ("<|im_end|>" in text) is not skip_special_tokens


class _WindowRecorder:
    """A tokenizer that records how many ids each decode call is given."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.window_sizes: list[int] = []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        self.window_sizes.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens)


def test_each_step_decodes_a_small_window(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" ".join(TEXTS) * 4)
    assert len(ids) > 300
    recorder = _WindowRecorder(tokenizer)
    detokenizer = IncrementalDetokenizer(recorder, prompt_ids=ids[:50])  # type: ignore[arg-type]
    assert "".join(_stream(detokenizer, ids, [1] * len(ids))) == tokenizer.decode(ids)
    # A window spans the context and the characters still open: a few tokens, not the output.
    assert max(recorder.window_sizes) <= 10
