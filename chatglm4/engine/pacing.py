"""How many prompt tokens a prefill chunk may hold so that it lasts about a given time.

A fixed number of tokens per chunk pauses the decoding streams longer and longer as a prompt goes
on, because each token attends to every one before it: on 2 CPU cores a 64-token chunk of SmolLM2-135M
takes 0.12 s at a prompt's start and 0.4 s at its 2,800th token, and a slower machine doubles both.
So the scheduler sizes chunks by time. A forward over t new tokens after p cached ones costs about

    c0 + c1 * t + c2 * t * (p + t / 2)   seconds

(reading the weights once; the linear layers per token; attention per token and key). Every prefill's
measured time refits c0..c2 by least squares, recent forwards weighing more, so the sizes follow this
machine, this model and its precision without a setting per box."""

from __future__ import annotations

# Feature scales, so that the three coefficients are of similar size for the solver.
_TOKENS = 64.0
_PAIRS = 65536.0
# Weight of the past at each new observation: about the last five forwards count.
DECAY = 0.8
# The smallest chunk: below it a forward's fixed cost (reading the weights) is most of its time.
MIN_CHUNK_TOKENS = 8
# Ridge term: keeps the fit defined while all observations look alike (the same chunk size).
RIDGE = 1e-6


def _features(start: int, tokens: int, rows: int = 1) -> tuple[float, float, float]:
    return 1.0, rows * tokens / _TOKENS, rows * tokens * (start + tokens / 2) / _PAIRS


class ChunkPacer:
    """Chunk sizes within [min_tokens, max_tokens] whose predicted forward time is within `seconds`."""

    def __init__(self, seconds: float, max_tokens: int, min_tokens: int = MIN_CHUNK_TOKENS):
        import numpy as np

        if seconds <= 0 or max_tokens <= 0:
            raise ValueError("seconds and max_tokens must be positive")
        self.seconds = seconds
        self.max_tokens = max_tokens
        self.min_tokens = min(min_tokens, max_tokens)
        self._xx = np.zeros((3, 3))  # decayed sum of x xᵀ
        self._xy = np.zeros(3)  # decayed sum of x y
        self._coef: np.ndarray | None = None

    def observe(self, start: int, tokens: int, seconds: float, rows: int = 1) -> None:
        """Records that a forward over `tokens` new tokens after `start` cached ones took `seconds`
        (`rows` prompts of that shape in one forward: whole prompts prefilled together)."""
        import numpy as np

        if tokens <= 0 or seconds <= 0:
            return
        x = np.array(_features(start, tokens, rows))
        self._xx = DECAY * self._xx + np.outer(x, x)
        self._xy = DECAY * self._xy + x * seconds
        # Negative costs are noise: clipped, every term grows with the chunk, so `tokens` can bisect.
        self._coef = np.clip(np.linalg.solve(self._xx + RIDGE * np.eye(3), self._xy), 0.0, None)

    def predict(self, start: int, tokens: int) -> float | None:
        """Predicted seconds of a forward over `tokens` after `start`; None before any observation."""
        if self._coef is None:
            return None
        return float(sum(c * f for c, f in zip(self._coef, _features(start, tokens))))

    def tokens(self, start: int) -> int:
        """The most tokens (at least min_tokens) a chunk starting after `start` cached tokens may hold."""
        if self._coef is None:
            return self.max_tokens
        lo, hi = self.min_tokens, self.max_tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.predict(start, mid) <= self.seconds:
                lo = mid
            else:
                hi = mid - 1
        return lo
