"""EngineCore: schedule -> execute -> update, one step at a time, on the thread that owns MLX.

Built from a loaded model and an ``EngineConfig``: the KV budget decides the number of pages, the
scheduler packs each step, the runner computes it. Everything here runs on one thread; the server
wraps it in an actor (later), the offline ``LLM`` API drives it directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlxserve.engine.config import CacheConfig, SchedulerConfig
from mlxserve.engine.metrics import EngineMetrics
from mlxserve.engine.model_runner import ModelRunner
from mlxserve.engine.request import EngineOutput, EngineRequest
from mlxserve.engine.scheduler import Scheduler
from mlxserve.errors import ConfigError
from mlxserve.kv.paged_store import KVLayout, PagedKVStore

DEFAULT_KV_MEMORY_GB = 1.0
logger = logging.getLogger("mlxserve.engine")


@dataclass(frozen=True)
class EngineConfig:
    kv_memory_gb: float = DEFAULT_KV_MEMORY_GB  # KV cache budget, all layers
    kv_memory_fraction: float | None = None  # instead: this fraction of the memory available now
    page_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_prefill_chunk: int = 512
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True

    def validate(self) -> "EngineConfig":
        if not self.kv_memory_gb > 0:
            raise ConfigError(f"`kv_memory` must be positive, got {self.kv_memory_gb}", param="kv_memory")
        if self.kv_memory_fraction is not None and not 0 < self.kv_memory_fraction <= 0.95:
            raise ConfigError(
                f"`kv_memory_fraction` must be in (0, 0.95], got {self.kv_memory_fraction}", param="kv_memory_fraction"
            )
        return self

    def kv_budget_bytes(self) -> int:
        if self.kv_memory_fraction is not None:
            return int(available_memory_bytes() * self.kv_memory_fraction)
        return int(self.kv_memory_gb * 2**30)


def available_memory_bytes() -> int:
    """Memory a KV cache may take now: the GPU working set on a Mac, MemAvailable on Linux."""
    if mx.metal.is_available():
        info = mx.metal.device_info()
        return int(info.get("max_recommended_working_set_size", info.get("memory_size", 0))) - mx.get_active_memory()
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise ConfigError("cannot tell the available memory here; give `kv_memory` in GiB", param="kv_memory_fraction")


def kv_layout(model: nn.Module) -> KVLayout:
    args = model.args
    dtype = model.model.embed_tokens.weight.dtype
    if not mx.issubdtype(dtype, mx.floating):  # quantized embedding: use its scales' dtype
        dtype = model.model.embed_tokens.scales.dtype
    return KVLayout(args.num_hidden_layers, args.num_key_value_heads, args.head_dim, dtype)


class EngineCore:
    def __init__(self, model: nn.Module, config: EngineConfig = EngineConfig()) -> None:
        config.validate()
        args = model.args
        layout = kv_layout(model)
        bytes_per_page = layout.bytes_per_token * config.page_size
        num_pages = config.kv_budget_bytes() // bytes_per_page
        if num_pages < 2:
            raise ConfigError(
                f"a KV budget of {config.kv_budget_bytes()} bytes holds no page of {bytes_per_page} bytes",
                param="kv_memory",
            )
        max_model_len = config.max_model_len or int(args.max_position_embeddings)
        self.scheduler_config = SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_prefill_chunk=config.max_prefill_chunk, max_model_len=max_model_len,
        )
        self.scheduler_config.validate()
        windows = [args.window_of(i) for i in range(args.num_hidden_layers)]
        # Pages behind the window can be freed only when every layer slides (Mistral v0.1, Phi-3);
        # gemma2/3 mix local and global layers, whose local layers just mask.
        uniform_window = windows[0] if len(set(windows)) == 1 else None
        cache_config = CacheConfig(
            page_size=config.page_size, num_pages=num_pages, enable_prefix_caching=config.enable_prefix_caching,
            sliding_window=uniform_window,
        )
        self.scheduler = Scheduler.from_config(self.scheduler_config, cache_config)
        self.store = PagedKVStore(layout, num_pages, config.page_size)
        self.runner = ModelRunner(model, self.store, windows)
        self.num_pages = num_pages
        self.bytes_per_token = layout.bytes_per_token
        logger.info(self.describe())

    def describe(self) -> str:
        """One line for start-up logs: the KV budget in bytes, pages and tokens."""
        page = self.store.page_size
        usable = (self.num_pages - 1) * page
        return (
            f"KV cache: {self.store.nbytes / 2**30:.2f} GiB, {self.num_pages - 1} pages of {page} tokens "
            f"({usable} tokens, {self.bytes_per_token / 1024:.1f} KiB per token)"
        )

    def add_request(self, request: EngineRequest) -> None:
        self.scheduler.add_request(request)

    def abort_request(self, request_id: str) -> bool:
        return self.scheduler.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineOutput]:
        out = self.scheduler.schedule()
        runner_out = self.runner.execute(out)
        return self.scheduler.update_from_output(out, runner_out)

    def metrics(self) -> EngineMetrics:
        return self.scheduler.make_metrics()

    def check_leaks(self) -> None:
        """Raise AssertionError if any page is still held while no request is running (tests, debug)."""
        self.scheduler.kv.pool.check_leaks()
