"""The latency models behind `predicted-latency-producer`: the features, an online least-squares
model learned in process, and a linear model with coefficients from upstream's training server.

Features of one (request, endpoint) pair, in `FEATURES` order: the endpoint's KV-cache use (0..1),
the request's input tokens, the endpoint's waiting and running requests, the share of the prompt's
prefix blocks it holds (0..1), the prefill tokens epp has in flight there, and the tokens this
endpoint would have to prefill for the request (input x (1 - prefix share)). TTFT is fitted on all
of them, TPOT on the first four (decode speed depends on the batch, not on this prompt's cache).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

# Column order of a feature matrix; the names are the training server's where it has them.
FEATURES = (
    "kv_cache_percentage",
    "input_token_length",
    "num_request_waiting",
    "num_request_running",
    "prefix_cache_score",
    "prefill_tokens_in_flight",
    "uncached_input_tokens",  # epp's own interaction term (the sidecar engineers its own)
)
TPOT_FEATURES = 4  # the leading columns TPOT is fitted on


class OnlineLinearModel:
    """Least squares over the most recent `window` observations (a ring buffer: bounded memory),
    refitted every `refit_every` new observations once `min_samples` have been seen. Predicts
    nothing (None) until its first fit, and never less than the smallest observation in the window
    (a line extrapolated past the data must not promise a latency faster than any seen). Columns
    are standardised before the fit (features range from 0..1 to tens of thousands) and a small
    ridge term keeps a constant column solvable."""

    def __init__(
        self, features: int, *, window: int = 2048, min_samples: int = 32, refit_every: int = 16
    ) -> None:
        if window < min_samples or min_samples < 2:
            raise ValueError("need window >= min_samples >= 2")
        self.features = features
        self.window = window
        self.min_samples = min_samples
        self.refit_every = refit_every
        self._x = np.zeros((window, features))
        self._y = np.zeros(window)
        self._next = 0  # next slot of the ring
        self.samples = 0  # observations held (<= window)
        self.seen = 0  # observations ever added
        self._since_fit = 0
        self.intercept = 0.0
        self.coef: FloatArray | None = None
        self.floor = 0.0  # the smallest observation in the window at the last fit

    def add(self, x: FloatArray, y: float) -> None:
        """One observation (`x`: this model's `features` columns); refits when due."""
        self._x[self._next] = x[: self.features]
        self._y[self._next] = y
        self._next = (self._next + 1) % self.window
        self.samples = min(self.samples + 1, self.window)
        self.seen += 1
        self._since_fit += 1
        if self.samples >= self.min_samples and (self.coef is None or self._since_fit >= self.refit_every):
            self.fit()

    def fit(self) -> None:
        n = self.samples
        if n < 2:
            return
        x, y = self._x[:n], self._y[:n]
        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        scale[scale == 0.0] = 1.0
        z = (x - mean) / scale
        y_mean = float(y.mean())
        # Ridge normal equations on standardised columns: (zᵀz + λI) w = zᵀ(y - ȳ); a tiny λ keeps
        # a constant (all-zero after centring) column solvable. A d x d solve, not an n x d one.
        gram = z.T @ z
        gram[np.diag_indices_from(gram)] += 1e-6 * n
        w = np.linalg.solve(gram, z.T @ (y - y_mean))
        self.coef = w / scale
        self.intercept = y_mean - float(self.coef @ mean)
        self.floor = max(0.0, float(y.min()))
        self._since_fit = 0

    def predict(self, x: FloatArray) -> FloatArray | None:
        """One prediction per row of `x` (never below `floor`); None before the first fit."""
        if self.coef is None:
            return None
        out: FloatArray = np.maximum(x[:, : self.features] @ self.coef + self.intercept, self.floor)
        return out


class CoefficientModel:
    """A linear model from named coefficients (the training server's Bayesian Ridge model, as its
    /metrics page publishes them); features it has no coefficient for count 0, and coefficients
    for features epp does not compute are ignored."""

    def __init__(self, intercept: float, coefficients: Mapping[str, float]) -> None:
        self.intercept = intercept
        self.coef = np.array([coefficients.get(name, 0.0) for name in FEATURES])

    def predict(self, x: FloatArray) -> FloatArray:
        out: FloatArray = np.maximum(x @ self.coef + self.intercept, 0.0)
        return out
