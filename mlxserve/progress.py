"""Progress bars for long work (tqdm on stderr; silent when stderr is not a terminal and in tests)."""

from __future__ import annotations

import sys
from typing import Callable

from tqdm import tqdm


def byte_progress(total_bytes: int, label: str) -> Callable[[int], None]:
    """A bar counting bytes; returns ``update(n)``. Closes itself when the total is reached."""
    bar = tqdm(
        total=total_bytes, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
        file=sys.stderr, disable=not sys.stderr.isatty(), leave=False,
    )

    def update(n: int) -> None:
        bar.update(n)
        if bar.n >= bar.total:
            bar.close()

    return update
