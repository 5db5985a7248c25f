"""Checks on figures a benchmark prints rounded."""

from __future__ import annotations


def ratio_agrees(ratio: float, numerator: float, denominator: float, decimals: int = 3,
                 ratio_decimals: int = 2) -> bool:
    """Whether `ratio` (printed to `ratio_decimals`) can be numerator / denominator of the unrounded values behind
    the two printed to `decimals`: at 0.041 s a step, rounding alone moves the quotient by 2.5 %."""
    half, half_ratio = 0.5 * 10**-decimals, 0.5 * 10**-ratio_decimals
    low = (numerator - half) / (denominator + half)
    high = (numerator + half) / (denominator - half) if denominator > half else float("inf")
    return low - half_ratio <= ratio <= high + half_ratio
