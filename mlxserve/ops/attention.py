"""The one attention entry point every model family calls.

Dense (contiguous-cache) attention: MLX's fused ``scaled_dot_product_attention`` when it can express
the computation, and an explicit float32 path for logit soft-capping (Gemma 2), which the fused
kernel has no parameter for. The paged-cache path and the custom Metal kernels plug in here later.
"""

from __future__ import annotations

import mlx.core as mx


def attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    scale: float,
    mask: mx.array | str | None,
    softcap: float | None = None,
) -> mx.array:
    """queries (B, H, L, D), keys/values (B, H_kv, S, D) with H % H_kv == 0 -> (B, H, L, D).

    mask: None, "causal" (aligned to the last query row), or bool (L, S) / (B, 1, L, S), True = keep.
    """
    if softcap is None:
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
    return _softcapped_attention(queries, keys, values, scale=scale, mask=mask, softcap=softcap)


def _softcapped_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    scale: float,
    mask: mx.array | str | None,
    softcap: float,
) -> mx.array:
    B, H, L, D = queries.shape
    H_kv, S = keys.shape[1], keys.shape[2]
    repeats = H // H_kv
    # Group query heads by their KV head instead of repeating K/V: (B, H_kv, repeats, L, D).
    q = (queries * scale).reshape(B, H_kv, repeats, L, D)
    scores = q @ mx.expand_dims(keys, 2).swapaxes(-1, -2)  # (B, H_kv, repeats, L, S)
    scores = mx.tanh(scores.astype(mx.float32) / softcap) * softcap
    if isinstance(mask, str):
        mask = causal_mask(L, S)
    elif mask is not None and mask.ndim == 4:  # (B, 1, L, S) -> broadcast over the head groups
        mask = mask[:, :, None]
    if mask is not None:
        scores = mx.where(mask, scores, mx.finfo(mx.float32).min)
    probs = mx.softmax(scores, axis=-1).astype(values.dtype)
    out = probs @ mx.expand_dims(values, 2)  # (B, H_kv, repeats, L, D)
    return out.reshape(B, H, L, values.shape[-1])


def causal_mask(L: int, S: int) -> mx.array:
    """(L, S) bool lower-right aligned causal mask: query i sits at position S - L + i."""
    q = mx.arange(S - L, S)[:, None]
    return mx.arange(S)[None, :] <= q
