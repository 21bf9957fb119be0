"""Shared timing helpers: contenders are measured side by side, interleaved round by round, so
background load on a shared machine hits all of them alike. Reported figures are medians."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def interleaved(
    contenders: dict[str, Callable[[], object]], rounds: int = 7, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call for each contender, timed in alternating order each round."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}"
    )


def report(title: str, medians: dict[str, float], ratios: list[tuple[str, str, str, float, str]]) -> bool:
    """Print medians and ratio lines ``(label, numerator, denominator, goal, 'max'|'min')``; True if all goals met."""
    print(f"\n## {title}")
    for name, seconds in medians.items():
        print(f"  {name:<44} {seconds * 1e3:9.1f} ms")
    ok = True
    for label, num, den, goal, kind in ratios:
        ratio = medians[num] / medians[den]
        met = ratio <= goal if kind == "max" else ratio >= goal
        ok &= met
        print(
            f"  {label:<44} {ratio:6.3f}x  (goal {'<=' if kind == 'max' else '>='} {goal}x: {'met' if met else 'MISSED'})"
        )
    return ok
