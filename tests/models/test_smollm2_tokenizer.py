"""Our tokenizer for the embedded SmolLM2 GGUF against transformers' own GGUF tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from workers.weights.gguf import embedded_gguf_path
from workers.weights.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "12345 and 3.14159",
    "The year 2024 had 366 days; 1,000,000.00 $5 €10",
    "don't I'LL we've they'd",
    "Llamas 🦙 and a grin 😀 and a family 👨‍👩‍👧",
    "你好，世界。日本語のテキスト",
    "한국어 텍스트와 Ελληνικά και русский",
    "e\u0301 combining n\u0303 marks",
    "many    spaces   between",
    "tabs\tand\nnewlines\r\n\nend",
    "  leading and trailing  ",
    "\n\n\n",
    " ",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|><|im_end|><|endoftext|>",
    "word<|im_end|>word <repo_name>x<file_sep>y",
    "    def square(x):\n        return x ** 2\n",
    "http://example.com/a?b=c&d=e#frag",
    "mixed: 漢字 and 😀 and 123abc456",
    "ÀÉÎÕÜ ß ø æ œ",
    'JSON: {"key": [1, 2, 3], "nested": {"a": null}}',
    "",
]

# SmolLM2's tokenizer.json splits digits before the byte-level regex (as llama.cpp's "smollm"
# pre-tokenizer does); transformers' GGUF converter does not, which shows on whitespace runs
# that end before a digit.
DIGIT_AFTER_SPACES = ["x  1", "a   12", "  3 spaces then digits 007"]
SMOLLM2_PRE_TOKENIZER = pre_tokenizers.Sequence(
    [
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]
)

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 😀 2+2?"}],
    [{"role": "user", "content": "No system prompt here."}],
    [
        {"role": "user", "content": "First"},
        {"role": "assistant", "content": "Answer"},
        {"role": "user", "content": "Second\nline"},
    ],
]


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.from_gguf(embedded_gguf_path())


@pytest.fixture(scope="module")
def theirs():
    path = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_vocabulary_and_special_tokens_match(ours: Tokenizer, theirs) -> None:
    assert ours.backend.get_vocab(with_added_tokens=True) == theirs.get_vocab()
    assert ours.vocab_size == len(theirs) == 49152
    assert (ours.bos_token_id, ours.eos_token_ids) == (theirs.bos_token_id, (theirs.eos_token_id,))
    assert ours.token_to_id("<|im_end|>") == 2


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(ours: Tokenizer, theirs, text: str) -> None:
    ids = ours.encode(text)
    assert ids == theirs(text)["input_ids"]  # no BOS: add_bos_token is false in the file
    assert ours.encode(text, add_special_tokens=False) == ids
    assert ours.decode(ids) == text == theirs.decode(ids)


@pytest.mark.parametrize("text", DIGIT_AFTER_SPACES)
def test_digits_are_split_before_the_byte_level_regex(ours: Tokenizer, theirs, text: str) -> None:
    reference = theirs.backend_tokenizer
    converted = reference.encode(text).ids
    saved = reference.pre_tokenizer
    reference.pre_tokenizer = SMOLLM2_PRE_TOKENIZER
    try:
        expected = reference.encode(text).ids
    finally:
        reference.pre_tokenizer = saved
    assert ours.encode(text) == expected != converted
    assert ours.decode(expected) == text


def test_special_tokens_can_be_skipped_when_decoding(ours: Tokenizer) -> None:
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == ours.token_to_id("<|im_start|>") and ids[-1] == 2
    assert ours.decode(ids, skip_special_tokens=True) == "user\nhi"


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    ours: Tokenizer, theirs, messages: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    rendered = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert rendered == expected
    assert rendered.endswith("<|im_start|>assistant\n") is add_generation_prompt


def test_missing_chat_template_is_a_clear_error(ours: Tokenizer) -> None:
    plain = Tokenizer(ours.backend, ours.bos_token, [ours.eos_token], chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        plain.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_exceptions_become_value_errors(ours: Tokenizer) -> None:
    template = "{{ raise_exception('roles must alternate') }}"
    strict = Tokenizer(ours.backend, ours.bos_token, [ours.eos_token], chat_template=template)
    with pytest.raises(ValueError, match="chat template: roles must alternate"):
        strict.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.fixture()
def hf_dir(theirs, tmp_path: Path) -> Path:
    theirs.save_pretrained(tmp_path)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    return tmp_path


def test_hf_dir_matches_transformers(theirs, hf_dir: Path) -> None:
    loaded = Tokenizer.from_hf_dir(hf_dir)
    assert (loaded.bos_token_id, loaded.eos_token_ids) == (1, (2,))
    for text in TEXTS + DIGIT_AFTER_SPACES:
        assert loaded.encode(text) == theirs(text)["input_ids"], text
    messages = CONVERSATIONS[0]
    expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert loaded.apply_chat_template(messages) == expected


def test_hf_dir_flags_named_templates_and_generation_eos(hf_dir: Path) -> None:
    config_path = hf_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["add_bos_token"] = True
    config["chat_template"] = [
        {"name": "tool_use", "template": "tools"},
        {
            "name": "default",
            "template": "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}",
        },
    ]
    config_path.write_text(json.dumps(config))
    (hf_dir / "chat_template.jinja").unlink()
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))

    loaded = Tokenizer.from_hf_dir(hf_dir)
    assert loaded.encode("hi") == [1, 6004]
    assert loaded.encode("hi", add_special_tokens=False) == [6004]
    assert loaded.eos_token_ids == (2, 0)
    rendered = loaded.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered == "<|im_start|>hi<|im_end|>"


def test_hf_dir_without_tokenizer_json_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_hf_dir(tmp_path)
