"""Progress bars for the long loops that are not training (sharding, feature extraction, latent
encoding, index building), shown only in a terminal: logs, CI output and torchrun ranks (whose
output is piped) get no bar. ``PATCHFLOW_PROGRESS=off`` turns them off."""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def show_progress() -> bool:
    return sys.stderr.isatty() and os.environ.get("PATCHFLOW_PROGRESS", "auto").lower() != "off"


def progress(items: Iterable[T], what: str, total: int | None = None) -> Iterator[T]:
    """Yield ``items``; in a terminal, beside a bar naming ``what`` with the count, rate and time
    left (a bar that only pulses when ``total`` is unknown). The bar goes when the loop ends."""
    if not show_progress():
        yield from items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=total)
        for item in items:
            yield item
            bar.advance(task)
