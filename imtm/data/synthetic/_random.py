"""Draws the synthetic generators share, on ``random.Random`` alone (stable across Python versions)."""

from __future__ import annotations

__all__ = ["permutation", "pick"]


def pick(rng, options):
    return options[int(rng.random() * len(options))]


def permutation(rng, n: int) -> list[int]:
    # Fisher-Yates on random() alone (random.shuffle's algorithm is not guaranteed stable).
    p = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        p[i], p[j] = p[j], p[i]
    return p
