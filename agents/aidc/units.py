"""Figures as people read them: one way to write a size everywhere (report, CLI, progress)."""

from __future__ import annotations

BINARY_UNITS = (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10))


def human_bytes(nbytes: float) -> str:
    """A size in binary units, three significant digits at most: 4096 -> "4 KiB",
    1572864 -> "1.5 MiB", 4080 (a 4 KiB message split evenly among 5 ranks) -> "3.98 KiB"."""
    for unit, scale in BINARY_UNITS:
        if nbytes >= scale * 0.9995:  # 1023.9 KiB rounds to 1020 KiB, not to "1.02e+03 KiB"
            return f"{_three_digits(nbytes / scale)} {unit}"
    return f"{_three_digits(nbytes)} B"


def _three_digits(value: float) -> str:
    return f"{float(f'{value:.3g}'):g}"
