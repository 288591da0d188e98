"""Tokenizers from HF directories or GGUF metadata, chat templates, and streaming detokenization.

Encoding and decoding run in the Rust `tokenizers` library. A GGUF file carries no
`tokenizer.json`: its byte-level BPE is rebuilt from the vocabulary, the merges, the token types
and the name of its pre-tokenizer (`tokenizer.ggml.pre`), mapped to the split rules that llama.cpp
applies for that name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as RustTokenizer

from workers.weights.gguf import gguf_metadata, open_gguf

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


def _llama3_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# tokenizer.ggml.pre -> (pre-tokenizer, ignore_merges); llama.cpp's llama-vocab.cpp groups them so.
# Llama 3 looks whole words up in the vocabulary before merging (`ignore_merges`).
_GGUF_PRE_TOKENIZERS = {
    "default": (_gpt2_split, False),
    "gpt-2": (_gpt2_split, False),
    "smollm": (_digits_then_gpt2_split, False),
    "starcoder": (_digits_then_gpt2_split, False),
    "llama-bpe": (_llama3_split, True),
    "dbrx": (_llama3_split, True),
}
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4  # llama.cpp's token types


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template: {message}")


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, **kwargs: Any
) -> str:
    # HF's filter: unlike jinja2's, it keeps non-ASCII text and does not HTML-escape.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kwargs)


def _template_environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.globals["raise_exception"] = _raise_template_error
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    environment.filters["tojson"] = _tojson
    return environment


def _special_tokens_processor(
    backend: RustTokenizer, bos: str | None, eos: str | None
) -> processors.TemplateProcessing:
    """Adds `bos` before and `eos` after a sequence, each only when given."""
    parts = [token for token in (bos, "$A", eos) if token is not None]
    specials = [(token, backend.token_to_id(token)) for token in (bos, eos) if token is not None]
    return processors.TemplateProcessing(single=" ".join(parts), special_tokens=specials)


class Tokenizer:
    """Text <-> token ids, special tokens, and the checkpoint's chat template."""

    def __init__(
        self,
        backend: RustTokenizer,
        bos_token: str | None,
        eos_tokens: Sequence[str],
        chat_template: str | None,
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_tokens[0] if eos_tokens else None
        self.bos_token_id = None if bos_token is None else backend.token_to_id(bos_token)
        ids = (backend.token_to_id(token) for token in eos_tokens)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in ids if i is not None))
        self.chat_template = chat_template
        self._compiled_template: jinja2.Template | None = None

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Read `tokenizer.json`, `tokenizer_config.json` and the chat template of an HF dir."""
        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file}: not found; an HF tokenizer needs this file")
        backend = RustTokenizer.from_file(str(tokenizer_file))
        config = _read_json(directory / "tokenizer_config.json")
        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        # The flags in tokenizer_config.json win over the post-processor in tokenizer.json.
        if "add_bos_token" in config or "add_eos_token" in config:
            backend.post_processor = _special_tokens_processor(
                backend,
                bos if config.get("add_bos_token") else None,
                eos if config.get("add_eos_token") else None,
            )
        # generation_config.json may name more tokens that end a turn (Llama 3's <|eot_id|>).
        generation_eos = _read_json(directory / "generation_config.json").get("eos_token_id")
        extra_eos_ids = generation_eos if isinstance(generation_eos, list) else [generation_eos]
        eos_tokens = [eos] if eos is not None else []
        eos_tokens += [backend.id_to_token(i) for i in extra_eos_ids if i is not None]
        return cls(backend, bos, eos_tokens, _hf_chat_template(directory, config))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Rebuild the byte-level BPE tokenizer that a GGUF file's metadata describes."""
        reader = open_gguf(path)
        model = gguf_metadata(reader, "tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"{path}: tokenizer model {model!r} is not supported; supported: gpt2")
        pre = gguf_metadata(reader, "tokenizer.ggml.pre", "default")
        if pre not in _GGUF_PRE_TOKENIZERS:
            raise ValueError(
                f"{path}: pre-tokenizer {pre!r} is not supported; "
                f"supported: {', '.join(_GGUF_PRE_TOKENIZERS)}"
            )
        make_pre_tokenizer, ignore_merges = _GGUF_PRE_TOKENIZERS[pre]
        tokens = gguf_metadata(reader, "tokenizer.ggml.tokens")
        merges = gguf_metadata(reader, "tokenizer.ggml.merges")
        bpe = models.BPE(
            vocab={token: index for index, token in enumerate(tokens)},
            merges=[tuple(merge.split(" ", 1)) for merge in merges],
            ignore_merges=ignore_merges,
        )
        backend = RustTokenizer(bpe)
        backend.pre_tokenizer = make_pre_tokenizer()
        backend.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|>) are special; user-defined ones (<think>) are plain text
        # that still must never be split.
        token_types = gguf_metadata(reader, "tokenizer.ggml.token_type", None)
        typed_tokens = list(zip(tokens, token_types or [_NORMAL] * len(tokens), strict=True))
        backend.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t, k in typed_tokens
                if k == _CONTROL
            ]
        )
        backend.add_tokens(
            [AddedToken(t, normalized=False) for t, k in typed_tokens if k == _USER_DEFINED]
        )

        def token_named_by(key: str) -> str | None:
            token_id = gguf_metadata(reader, f"tokenizer.ggml.{key}", None)
            return None if token_id is None else tokens[token_id]

        bos, eos = token_named_by("bos_token_id"), token_named_by("eos_token_id")
        add_bos = gguf_metadata(reader, "tokenizer.ggml.add_bos_token", False)
        add_eos = gguf_metadata(reader, "tokenizer.ggml.add_eos_token", False)
        backend.post_processor = _special_tokens_processor(
            backend, bos if add_bos else None, eos if add_eos else None
        )
        eos_tokens = [token for token in (eos, token_named_by("eot_token_id")) if token]
        chat_template = gguf_metadata(reader, "tokenizer.chat_template", None)
        return cls(backend, bos, eos_tokens, chat_template)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens in it stay whole; BOS if the model says so."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render `messages` ({"role", "content"} dicts) as the model's prompt text."""
        if self.chat_template is None:
            raise ValueError("messages: this model has no chat template; send a plain prompt")
        if self._compiled_template is None:
            self._compiled_template = _template_environment().from_string(self.chat_template)
        return self._compiled_template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as file:
        return json.load(file)


def _token_text(token: str | dict[str, Any] | None) -> str | None:
    # tokenizer_config.json writes a special token as a string or as a serialized AddedToken.
    return token.get("content") if isinstance(token, dict) else token


def _hf_chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(directory / "chat_template.json").get("chat_template")
    template = template or config.get("chat_template")
    if isinstance(template, list):  # named templates: the "default" one is for chat
        template = {entry["name"]: entry["template"] for entry in template}.get("default")
    return template


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas that never split a character.

    Two offsets into all ids (prompt, then output) bound a small decoding window:

        ids:  ... | prefix_offset ... | read_offset ... |
                  (emitted, context)    (not emitted yet)

    The delta is what decoding [prefix_offset:] adds to decoding [prefix_offset:read_offset]; the
    context gives the decoder what it needs (a word's leading space). While the window's text ends
    in U+FFFD its last character is incomplete, so nothing is emitted and the ids wait.
    """

    _CONTEXT_TOKENS = 5  # of the prompt, decoded in front of the first output token

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_ids)
        self._read_offset = len(self._ids)
        self._prefix_offset = max(self._read_offset - self._CONTEXT_TOKENS, 0)

    def add(self, ids: Iterable[int]) -> str:
        """Append output ids; return the text they complete (possibly empty)."""
        self._ids.extend(ids)
        context, text = self._decode_window()
        if len(text) <= len(context) or text.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(context) :]

    def flush(self) -> str:
        """At the end of the stream: the text still held back (an incomplete tail as U+FFFD)."""
        context, text = self._decode_window()
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(context) :]

    def _decode_window(self) -> tuple[str, str]:
        decode, skip = self._tokenizer.decode, self._skip_special_tokens
        context = decode(self._ids[self._prefix_offset : self._read_offset], skip)
        return context, decode(self._ids[self._prefix_offset :], skip)
