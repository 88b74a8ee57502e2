"""Reconnect delays: exponential backoff with full jitter (AWS Architecture Blog, "Exponential
Backoff And Jitter"): delay = uniform(0, min(cap, base * 2**attempt)). Full jitter spreads a
fleet that lost its controller at the same moment over the whole window, instead of having every
node dial again in lock step when it comes back."""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, base_s: float, cap_s: float, rng: random.Random | None = None) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.attempt = 0
        self._rng = rng or random.SystemRandom()

    def ceiling(self) -> float:
        # 2**attempt overflows a float near attempt 1024; the cap is reached long before.
        return float(min(self.cap_s, self.base_s * 2.0 ** min(self.attempt, 64)))

    def next_delay(self) -> float:
        delay = self._rng.uniform(0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
