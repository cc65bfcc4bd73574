"""Tokenizer: encode/decode, special ids and chat templates of a model folder.

It reads ``tokenizer.json`` with the ``tokenizers`` library directly (fast to import; no transformers),
and the model folder's JSON configs for special tokens, EOS ids and chat templates. Only a folder
without ``tokenizer.json`` (e.g. a sentencepiece ``tokenizer.model``) goes through
``transformers.AutoTokenizer`` with ``trust_remote_code=False``, whose fast backend we then use.

Encoding matches ``AutoTokenizer.from_pretrained(path)(text)["input_ids"]``. NOTE(tokenizer): when
tokenizer.json exists, transformers (5.x) ignores ``add_bos_token``/``add_eos_token`` from
tokenizer_config.json and keeps tokenizer.json's post-processor; so do we.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from mlxserve.errors import InvalidRequestError, ModelLoadError
from mlxserve.tokenizer.chat_template import DEFAULT_RENDER_LIMITS, RenderLimits, render_chat_template

__all__ = ["Tokenizer"]

# The named special tokens transformers passes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_FALLBACK_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tekken.json")


class Tokenizer:
    """A model's tokenizer. Thread-safe for encode/decode/render after construction."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str],
        eos_token_ids: Iterable[int] = (),
        bos_token_id: int | None = None,
        chat_templates: Mapping[str, str] | None = None,
        render_limits: RenderLimits = DEFAULT_RENDER_LIMITS,
    ) -> None:
        self._backend = backend
        self._special_tokens = dict(special_tokens)
        eos = self._special_tokens.get("eos_token")
        eos_from_tokenizer = {backend.token_to_id(eos)} if eos is not None else set()
        self._eos_token_ids = frozenset(i for i in (*eos_from_tokenizer, *eos_token_ids) if i is not None)
        bos = self._special_tokens.get("bos_token")
        bos_from_tokenizer = backend.token_to_id(bos) if bos is not None else None
        self._bos_token_id = bos_from_tokenizer if bos_from_tokenizer is not None else bos_token_id
        self._chat_templates = dict(chat_templates or {})
        self._render_limits = render_limits
        decoder = backend.get_added_tokens_decoder()
        self._all_special_ids = frozenset(i for i, tok in decoder.items() if tok.special)

    # ---- loading -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: Path | str, *, render_limits: RenderLimits = DEFAULT_RENDER_LIMITS) -> Tokenizer:
        """Load the tokenizer of the model folder ``path``. Failures -> ModelLoadError."""
        path = Path(path)
        if not path.is_dir():
            raise ModelLoadError(f"tokenizer folder {path} does not exist or is not a directory")
        config = _read_json(path / "tokenizer_config.json") or {}
        if (path / "tokenizer.json").is_file():
            backend = _load_tokenizer_json(path / "tokenizer.json")
            special_tokens = _special_tokens_from_config(config)
            _add_missing_tokens(backend, config, special_tokens)
        elif any((path / name).is_file() for name in _FALLBACK_TOKENIZER_FILES):
            backend, special_tokens = _load_with_transformers(path)
        else:
            raise ModelLoadError(f"no tokenizer files in {path} (expected tokenizer.json or tokenizer.model)")
        model_config = _read_json(path / "config.json") or {}
        generation_config = _read_json(path / "generation_config.json") or {}
        eos_ids = [*_token_ids(model_config, "eos_token_id"), *_token_ids(generation_config, "eos_token_id")]
        bos_ids = [*_token_ids(generation_config, "bos_token_id"), *_token_ids(model_config, "bos_token_id")]
        return cls(
            backend,
            special_tokens=special_tokens,
            eos_token_ids=eos_ids,
            bos_token_id=bos_ids[0] if bos_ids else None,
            chat_templates=_read_chat_templates(path, config),
            render_limits=render_limits,
        )

    # ---- tokens --------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies the post-processor (e.g. BOS)."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. NOTE(tokenizer): no ``clean_up_tokenization_spaces``: that rewrite is not
        prefix-stable, so streamed text could not equal the full decode."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self._backend.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation: tokenizer eos + config.json + generation_config.json eos ids."""
        return self._eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, added tokens included (may be below the
        model's embedding size, which is often padded)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> frozenset[int]:
        """Ids of every added token marked special: what ``decode(skip_special_tokens=True)`` drops."""
        return self._all_special_ids

    @property
    def special_tokens(self) -> Mapping[str, str]:
        """Named special tokens (bos_token, eos_token, ...) as strings, as chat templates see them."""
        return dict(self._special_tokens)

    # ---- chat ----------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The default chat template source, or None."""
        return self._chat_templates.get("default")

    @property
    def has_chat_template(self) -> bool:
        return bool(self._chat_templates)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render the chat as text (sandboxed, time/size limited). Errors -> TemplateError;
        no chat template -> InvalidRequestError."""
        source = self._select_template(tools)
        if source is None:
            raise InvalidRequestError("this model has no chat template; use a completion request", param="messages")
        # Like transformers: special tokens first, caller kwargs override them.
        kwargs = {**self._special_tokens, **template_kwargs}
        return render_chat_template(
            source, messages, tools=tools, add_generation_prompt=add_generation_prompt,
            limits=self._render_limits, **kwargs,
        )

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """Render, then encode without special tokens (templates write BOS themselves; transformers'
        ``apply_chat_template(tokenize=True)`` does the same)."""
        text = self.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, **template_kwargs
        )
        return self.encode(text, add_special_tokens=False)

    def _select_template(self, tools: Sequence[Mapping[str, Any]] | None) -> str | None:
        # transformers' rule: a "tool_use" template when tools are given, else "default".
        if tools is not None and "tool_use" in self._chat_templates:
            return self._chat_templates["tool_use"]
        return self._chat_templates.get("default")


# ---- loading helpers ---------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path.name} in {path.parent}: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path.name} in {path.parent} is not a JSON object")
    return data


def _load_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # the Rust side raises Exception, or PanicException (a BaseException)
        message = " ".join(str(e).split())[:300]
        raise ModelLoadError(f"cannot load {path.name} in {path.parent}: {message}") from None


def _token_content(value: Any) -> str | None:
    """A special token given as a string or as an AddedToken-like ``{"content": ...}`` dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_tokens_from_config(config: Mapping[str, Any]) -> dict[str, str]:
    tokens = {name: _token_content(config.get(name)) for name in _SPECIAL_TOKEN_NAMES}
    return {name: tok for name, tok in tokens.items() if tok is not None}


def _add_missing_tokens(backend: tokenizers.Tokenizer, config: Mapping[str, Any], special: Mapping[str, str]) -> None:
    """Register tokens that tokenizer_config.json declares but tokenizer.json lacks, as transformers
    does (``added_tokens_decoder`` entries, then named special tokens)."""
    decoder = config.get("added_tokens_decoder")
    entries = sorted(decoder.items(), key=lambda kv: int(kv[0])) if isinstance(decoder, Mapping) else []
    missing = []
    for _, entry in entries:
        content = _token_content(entry)
        if content is not None and backend.token_to_id(content) is None:
            flags = {k: bool(entry[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in entry}
            missing.append(tokenizers.AddedToken(content, special=bool(entry.get("special", False)), **flags))
    missing += [
        tokenizers.AddedToken(tok, special=True, normalized=False)
        for tok in special.values()
        if backend.token_to_id(tok) is None and all(tok != m.content for m in missing)
    ]
    if missing:
        backend.add_tokens(missing)


def _load_with_transformers(path: Path) -> tuple[tokenizers.Tokenizer, dict[str, str]]:
    """Fallback for folders without tokenizer.json: let transformers convert (never runs repo code)."""
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        message = " ".join(str(e).split())[:300]
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {message}") from None
    backend = getattr(hf, "backend_tokenizer", None)
    if not isinstance(backend, tokenizers.Tokenizer):
        raise ModelLoadError(f"the tokenizer in {path} has no fast (tokenizers) backend")
    return backend, {k: str(v) for k, v in hf.special_tokens_map.items() if isinstance(v, str)}


def _token_ids(config: Mapping[str, Any], key: str) -> list[int]:
    """An ``eos_token_id``-style entry: an int, a list of ints, or absent/null."""
    value = config.get(key)
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def _read_chat_templates(path: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Template files (chat_template.jinja, additional_chat_templates/*.jinja) win over
    tokenizer_config.json's ``chat_template`` (a string or a list of {name, template}), as in transformers."""
    templates: dict[str, str] = {}
    files = [(path / "chat_template.jinja", "default")]
    extra_dir = path / "additional_chat_templates"
    if extra_dir.is_dir():
        files += [(f, f.name.removesuffix(".jinja")) for f in sorted(extra_dir.glob("*.jinja"))]
    for file, name in files:
        if file.is_file():
            try:
                templates[name] = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ModelLoadError(f"cannot read {file.name} in {file.parent}: {e}") from None
    if templates:
        return templates
    value = config.get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        for item in value:
            valid = isinstance(item, Mapping) and all(isinstance(item.get(k), str) for k in ("name", "template"))
            if not valid:
                raise ModelLoadError(f"tokenizer_config.json in {path}: chat_template items need a name and a template")
            templates[item["name"]] = item["template"]
        return templates
    if value is not None:
        raise ModelLoadError(f"tokenizer_config.json in {path}: chat_template must be a string or a list")
    return {}
