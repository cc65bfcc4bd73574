"""Engine settings: how the scheduler packs steps and how big the paged KV cache is (layer L1).

Both are frozen; ``validate()`` raises :class:`~mlxserve.errors.ConfigError` naming the field, so the
CLI and the Python API report a bad flag in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxserve.errors import ConfigError

__all__ = ["CacheConfig", "SchedulerConfig"]


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"`{name}` must be a positive integer, got {value!r}", param=name)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Per-step limits. A step packs the decode token of every running request and prefill chunks
    of the others, up to ``max_num_batched_tokens`` tokens."""

    max_num_seqs: int = 64  # running requests at once (rows of a decode step)
    max_num_batched_tokens: int = 2048  # tokens computed in one step, all requests together
    max_prefill_chunk: int = 512  # most tokens one request computes in one step
    max_model_len: int = 4096  # prompt + generated tokens of one request

    def validate(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_chunk", "max_model_len"):
            _check_positive(name, getattr(self, name))
        if self.max_prefill_chunk > self.max_num_batched_tokens:
            raise ConfigError(
                f"`max_prefill_chunk` ({self.max_prefill_chunk}) must not exceed "
                f"`max_num_batched_tokens` ({self.max_num_batched_tokens})",
                param="max_prefill_chunk",
            )
        # Every running request must be able to decode in every step, or streams stall.
        if self.max_num_seqs > self.max_num_batched_tokens:
            raise ConfigError(
                f"`max_num_seqs` ({self.max_num_seqs}) must not exceed "
                f"`max_num_batched_tokens` ({self.max_num_batched_tokens})",
                param="max_num_seqs",
            )


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The paged KV cache. Every layer's arena holds ``num_pages`` pages of ``page_size`` tokens;
    page 0 is the null page, so ``num_pages - 1`` are usable.

    ``sliding_window``: set only when *every* attention layer sees at most this many most recent
    positions (query included), e.g. Mistral v0.1 or a ``max_kv_size`` cap; pages wholly before the
    window are then freed. Models that mix local and global layers (gemma2/3) leave it None.
    """

    page_size: int = 16
    num_pages: int = 1024
    enable_prefix_caching: bool = True
    sliding_window: int | None = None

    def validate(self) -> None:
        _check_positive("page_size", self.page_size)
        if self.page_size & (self.page_size - 1) or self.page_size > 1024:
            raise ConfigError(f"`page_size` must be a power of two <= 1024, got {self.page_size}", param="page_size")
        _check_positive("num_pages", self.num_pages)
        if self.num_pages < 2:
            raise ConfigError(f"`num_pages` must be >= 2 (page 0 is reserved), got {self.num_pages}", param="num_pages")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ConfigError("`enable_prefix_caching` must be a boolean", param="enable_prefix_caching")
        if self.sliding_window is not None:
            _check_positive("sliding_window", self.sliding_window)

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1
