"""Rebuild a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) from ``tokenizer.ggml.*``.

Two vocabulary kinds exist in the families we import:

* ``gpt2``: byte-level BPE with merges. The text is split by the regex llama.cpp picks from
  ``tokenizer.ggml.pre`` (``PRE_TOKENIZERS``), then byte-level BPE runs on each piece.
* ``llama``: SentencePiece-style BPE over "▁"-spelled text with byte fallback (``<0x0A>`` tokens).
  The file has scores, not merges: a merge (a, b) ranks by the score of the token a + b, as
  SentencePiece merges the best-scoring pair first. Gemma ranks by token order instead, and Phi-3
  adds its prefix space in a normalizer (what transformers' own GGUF loader does too).

Token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte. Control
tokens become special added tokens, user-defined ones plain added tokens, so both stay whole.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from mlxserve.errors import CorruptCheckpointError, UnsupportedModelError

from .reader import GGUFFile

log = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Longest piece whose merges are derived: real vocabularies stay far below (Gemma's space runs: 31);
# the cap keeps a hostile token from costing quadratic time.
_MAX_MERGED_CHARS = 256
_SPECIAL_IDS = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}
# Extra end-of-generation ids llama.cpp reads (end of turn, end of message).
_STOP_ID_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), grouped by the `tokenizer.ggml.pre` names.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True, slots=True)
class PreTokenizerSpec:
    """split: a regex applied before byte-level BPE (None: GPT-2's own regex); digits: every digit
    stands alone first (llama.cpp's "\\p{N}" pass); ignore_merges: whole-word vocab hits win."""

    split: str | None = None
    digits: bool = False
    ignore_merges: bool = False


_GPT2 = PreTokenizerSpec()
_LLAMA3 = PreTokenizerSpec(split=_LLAMA3_SPLIT, ignore_merges=True)
_DIGITS = PreTokenizerSpec(digits=True)
PRE_TOKENIZERS: Mapping[str, PreTokenizerSpec] = {
    "default": _GPT2, "gpt2": _GPT2, "gpt-2": _GPT2, "mpt": _GPT2, "olmo": _GPT2,
    "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "falcon3": _LLAMA3, "smaug-bpe": _LLAMA3,
    "dbrx": _LLAMA3,
    "qwen2": PreTokenizerSpec(split=_QWEN2_SPLIT), "deepseek-r1-qwen": PreTokenizerSpec(split=_QWEN2_SPLIT),
    "smollm": _DIGITS, "starcoder": _DIGITS, "refact": _DIGITS, "command-r": _DIGITS, "codeshell": _DIGITS,
    "gpt-4o": PreTokenizerSpec(split=_GPT4O_SPLIT), "llama4": PreTokenizerSpec(split=_GPT4O_SPLIT),
}


@dataclass(frozen=True)
class TokenizerBuild:
    """tokenizer_json: the tokenizer.json text. special_ids: bos/eos/unk/pad ids (or None);
    stop_ids: eos plus end-of-turn ids, for generation_config.json."""

    tokenizer_json: str
    tokenizer_config: dict
    special_ids: Mapping[str, int | None]
    stop_ids: tuple[int, ...]


def build_tokenizer(gf: GGUFFile) -> TokenizerBuild:
    vocab = _Vocab.from_gguf(gf)
    model_kind = gf.get("tokenizer.ggml.model")
    arch = gf.get("general.architecture")
    if model_kind == "gpt2":
        tokenizer = _byte_level(vocab, gf)
        add_bos_default = False
    elif model_kind == "llama":
        tokenizer = _sentencepiece(vocab, gf, arch)
        add_bos_default = True  # llama.cpp adds BOS to a sentencepiece vocab unless told not to
    else:
        raise UnsupportedModelError(
            f"{gf.path.name}: tokenizer model {model_kind!r} is not supported (supported: gpt2, llama)"
        )
    _add_special_tokens(tokenizer, vocab)
    ids = {name: vocab.checked_id(gf.get(f"tokenizer.ggml.{key}_token_id")) for name, key in _SPECIAL_IDS.items()}
    add_bos = bool(gf.get("tokenizer.ggml.add_bos_token", add_bos_default)) and ids["bos_token"] is not None
    add_eos = bool(gf.get("tokenizer.ggml.add_eos_token", False)) and ids["eos_token"] is not None
    post = _template_processor(vocab, ids, add_bos, add_eos)
    if model_kind == "gpt2":
        post = processors.Sequence([processors.ByteLevel(trim_offsets=False), post])
    tokenizer.post_processor = post
    stop_ids = [ids["eos_token"], *(vocab.checked_id(gf.get(k)) for k in _STOP_ID_KEYS)]
    return TokenizerBuild(
        tokenizer_json=tokenizer.to_str(pretty=True),
        tokenizer_config=_tokenizer_config(gf, vocab, ids, add_bos, add_eos),
        special_ids=ids,
        stop_ids=tuple(dict.fromkeys(i for i in stop_ids if i is not None)),
    )


@dataclass(frozen=True)
class _Vocab:
    tokens: Sequence[str]
    types: Sequence[int]
    scores: Sequence[float] | None
    fname: str

    @classmethod
    def from_gguf(cls, gf: GGUFFile) -> _Vocab:
        tokens = gf.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise CorruptCheckpointError(f"{gf.path.name}: tokenizer.ggml.tokens is missing or not a list of strings")
        types = gf.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        scores = gf.get("tokenizer.ggml.scores")
        for key, values in (("token_type", types), ("scores", scores)):
            if values is not None and len(values) != len(tokens):
                raise CorruptCheckpointError(
                    f"{gf.path.name}: tokenizer.ggml.{key} has {len(values)} entries for {len(tokens)} tokens"
                )
        return cls(tokens=tokens, types=types, scores=scores, fname=gf.path.name)

    def checked_id(self, value: Any) -> int | None:
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(self.tokens):
            return value
        return None

    def special_tokens(self) -> list[tuple[int, str, bool]]:
        """(id, text, is_special) of control and user-defined tokens."""
        return [(i, t, ty == CONTROL) for i, (t, ty) in enumerate(zip(self.tokens, self.types)) if ty in (CONTROL, USER_DEFINED)]


# ---- byte-level BPE --------------------------------------------------------------------------------


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table: printable Latin-1 bytes map to
    themselves, the other 68 to U+0100 upward in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level(vocab: _Vocab, gf: GGUFFile) -> Tokenizer:
    alphabet = set(byte_to_unicode().values())
    table = byte_to_unicode()
    spelled: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(vocab.tokens, vocab.types)):
        # Added tokens keep their text; a regular token outside the byte alphabet is respelled.
        if kind not in (CONTROL, USER_DEFINED) and not set(token) <= alphabet:
            token = "".join(table[b] for b in token.encode("utf-8"))
        spelled.setdefault(token, i)
    merges = gf.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise CorruptCheckpointError(f"{gf.path.name}: a gpt2 tokenizer needs tokenizer.ggml.merges")
    pairs = [_merge_pair(m, gf.path.name) for m in merges]
    pre = gf.get("tokenizer.ggml.pre", "default")
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        log.warning("%s: unknown pre-tokenizer %r; using GPT-2's split", gf.path.name, pre)
        spec = _GPT2
    tokenizer = Tokenizer(models.BPE(vocab=spelled, merges=pairs, ignore_merges=spec.ignore_merges))
    tokenizer.pre_tokenizer = _pre_tokenizer(spec)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _merge_pair(merge: Any, fname: str) -> tuple[str, str]:
    parts = merge.split(" ") if isinstance(merge, str) else []
    if len(parts) != 2 or not all(parts):
        raise CorruptCheckpointError(f"{fname}: bad merge {str(merge)[:40]!r} in tokenizer.ggml.merges")
    return parts[0], parts[1]


def _pre_tokenizer(spec: PreTokenizerSpec) -> pre_tokenizers.PreTokenizer:
    steps: list[pre_tokenizers.PreTokenizer] = []
    if spec.digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if spec.split is not None:
        steps.append(pre_tokenizers.Split(Regex(spec.split), behavior="isolated", invert=False))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=spec.split is None))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


# ---- sentencepiece-style BPE -------------------------------------------------------------------------


def _sentencepiece(vocab: _Vocab, gf: GGUFFile, arch: str | None) -> Tokenizer:
    gemma = arch in ("gemma", "gemma2", "gemma3")
    tokens = list(vocab.tokens)
    if gemma:  # Gemma stores runs of spaces as real spaces; its "▁" spelling is what the text becomes
        tokens = ["▁" * len(t) if t and not t.strip(" ") else t for t in tokens]
    ids: dict[str, int] = {}
    for i, token in enumerate(tokens):
        ids.setdefault(token, i)
    if gemma or vocab.scores is None:
        ranks = [-float(i) for i in range(len(tokens))]  # earlier token = better merge
    else:
        ranks = [float(s) for s in vocab.scores]
    mergeable = {t for t, ty in zip(tokens, vocab.types) if ty in (NORMAL, USER_DEFINED)}
    merges = _merges_from_ranks(tokens, ranks, ids, mergeable)
    byte_fallback = any(ty == BYTE for ty in vocab.types)
    tokenizer = Tokenizer(models.BPE(vocab=ids, merges=merges, fuse_unk=True, byte_fallback=byte_fallback))
    add_prefix = bool(gf.get("tokenizer.ggml.add_space_prefix", not gemma))
    decode_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        decode_steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(decode_steps)
    if gemma:
        tokenizer.normalizer = normalizers.Replace(" ", "▁")
    elif arch == "phi3":  # Phi-3's own tokenizer.json: prefix space from a normalizer, no pre-tokenizer
        steps = [normalizers.Prepend("▁")] if add_prefix else []
        tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    else:
        scheme = "first" if add_prefix else "never"
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    return tokenizer


def _merges_from_ranks(
    tokens: Sequence[str], ranks: Sequence[float], ids: Mapping[str, int], mergeable: set[str]
) -> list[tuple[str, str]]:
    """Every split (a, b) of a mergeable token into two mergeable tokens, best rank first; a tie
    prefers the longer left part (as transformers' generate_merges orders them)."""
    found: list[tuple[float, int, int, int, str, str]] = []
    for token, rank in zip(tokens, ranks):
        if token not in mergeable or len(token) > _MAX_MERGED_CHARS:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in mergeable and right in mergeable:
                found.append((-rank, -len(left), ids[left], ids[right], left, right))
    found.sort(key=lambda m: m[:4])
    return [(m[4], m[5]) for m in found]


# ---- shared -----------------------------------------------------------------------------------------


def _add_special_tokens(tokenizer: Tokenizer, vocab: _Vocab) -> None:
    special = [AddedToken(t, special=True, normalized=False) for _, t, is_special in vocab.special_tokens() if is_special]
    plain = [AddedToken(t, special=False, normalized=False) for _, t, is_special in vocab.special_tokens() if not is_special]
    if special:
        tokenizer.add_special_tokens(special)
    if plain:
        tokenizer.add_tokens(plain)


def _template_processor(vocab: _Vocab, ids: Mapping[str, int | None], add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
    """Adds BOS / EOS around every encoded text iff the GGUF asks for it."""
    bos = vocab.tokens[ids["bos_token"]] if add_bos else None
    eos = vocab.tokens[ids["eos_token"]] if add_eos else None
    single = [*([bos] if bos else []), "$A", *([eos] if eos else [])]
    pair = [*single, *([bos] if bos else []), "$B:1", *([eos + ":1"] if eos else [])]
    specials = [(t, ids[k]) for t, k in ((bos, "bos_token"), (eos, "eos_token")) if t]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _tokenizer_config(
    gf: GGUFFile, vocab: _Vocab, ids: Mapping[str, int | None], add_bos: bool, add_eos: bool
) -> dict:
    config: dict[str, Any] = {
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    for name, token_id in ids.items():
        config[name] = vocab.tokens[token_id] if token_id is not None else None
    context = gf.get(f"{gf.get('general.architecture')}.context_length")
    if isinstance(context, int):
        config["model_max_length"] = context
    templates = _chat_templates(gf)
    if templates:
        default = templates.pop("default", None)
        named = [{"name": n, "template": t} for n, t in templates.items()]
        if named:
            config["chat_template"] = ([{"name": "default", "template": default}] if default else []) + named
        else:
            config["chat_template"] = default
    return config


def _chat_templates(gf: GGUFFile) -> dict[str, str]:
    templates = {}
    if isinstance(gf.get("tokenizer.chat_template"), str):
        templates["default"] = gf.get("tokenizer.chat_template")
    prefix = "tokenizer.chat_template."
    for key, value in gf.metadata.items():
        if key.startswith(prefix) and isinstance(value, str):
            templates[key[len(prefix):]] = value
    return templates
