"""The models a federated study trains, in numpy (no torch); parameters: array lists.

- ``logistic``: binary logistic regression with L2 penalty, local full-batch gradient
  descent (FedProx's proximal term when ``proximal_mu > 0``).
- ``linear``: least squares. With whitened features (the pooled covariance comes from
  the encrypted statistics) the pooled Hessian is the identity, so one local gradient
  step of size 1 per round makes FedAvg *exactly* pooled least squares.
- ``mlp``: one hidden layer (tanh) with a sigmoid output for binary targets, local
  mini-batch gradient descent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from healthlab.errors import InvalidInput

__all__ = ["MODELS", "Model", "TrainConfig", "get_model"]

Params = list[np.ndarray]


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings, sent to every site each round."""

    epochs: int = 5
    lr: float = 0.5
    l2: float = 0.0
    proximal_mu: float = 0.0
    batch_size: int = 0  # 0: full batch
    seed: int = 0


class Model:
    """A model family: initial parameters, local training, prediction, metrics."""

    name = "model"
    task = "binary"

    def init(self, n_features: int, seed: int) -> Params:
        """Initial parameters (the same at every site: the server sends them)."""
        raise NotImplementedError

    def predict(self, params: Params, x: np.ndarray) -> np.ndarray:
        """Probabilities (binary) or values (regression)."""
        raise NotImplementedError

    def gradient(self, params: Params, x: np.ndarray, y: np.ndarray) -> Params:
        """Mean gradient of the loss over the rows."""
        raise NotImplementedError

    def loss(self, params: Params, x: np.ndarray, y: np.ndarray) -> float:
        """Mean loss over the rows."""
        raise NotImplementedError

    def fit(
        self,
        params: Params,
        x: np.ndarray,
        y: np.ndarray,
        config: TrainConfig,
    ) -> Params:
        """Local training from the global ``params``; returns new parameters."""
        global_params = [p.copy() for p in params]
        current = [p.copy() for p in params]
        rng = np.random.default_rng(config.seed)
        n = len(y)
        for _ in range(config.epochs):
            if config.batch_size and config.batch_size < n:
                order = rng.permutation(n)
                batches = [
                    order[i : i + config.batch_size]
                    for i in range(0, n, config.batch_size)
                ]
            else:
                batches = [np.arange(n)]
            for rows in batches:
                grads = self.gradient(current, x[rows], y[rows])
                for i, (p, g) in enumerate(zip(current, grads, strict=True)):
                    step = g + config.l2 * p
                    if config.proximal_mu:
                        step = step + config.proximal_mu * (p - global_params[i])
                    current[i] = p - config.lr * step
        return current


class Logistic(Model):
    """Binary logistic regression: parameters ``[weights (p,), bias (1,)]``."""

    name = "logistic"

    def init(self, n_features: int, seed: int) -> Params:
        return [np.zeros(n_features), np.zeros(1)]

    def predict(self, params: Params, x: np.ndarray) -> np.ndarray:
        z = x @ params[0] + params[1][0]
        return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z, -500, 500))))

    def gradient(self, params: Params, x: np.ndarray, y: np.ndarray) -> Params:
        error = self.predict(params, x) - y
        return [x.T @ error / len(y), np.array([error.mean()])]

    def loss(self, params: Params, x: np.ndarray, y: np.ndarray) -> float:
        p = np.clip(self.predict(params, x), 1e-12, 1 - 1e-12)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


class Linear(Model):
    """Least squares: parameters ``[weights (p,), bias (1,)]``; loss is half the MSE."""

    name = "linear"
    task = "regression"

    def init(self, n_features: int, seed: int) -> Params:
        return [np.zeros(n_features), np.zeros(1)]

    def predict(self, params: Params, x: np.ndarray) -> np.ndarray:
        return np.asarray(x @ params[0] + params[1][0])

    def gradient(self, params: Params, x: np.ndarray, y: np.ndarray) -> Params:
        error = self.predict(params, x) - y
        return [x.T @ error / len(y), np.array([error.mean()])]

    def loss(self, params: Params, x: np.ndarray, y: np.ndarray) -> float:
        return float(0.5 * np.mean(np.square(self.predict(params, x) - y)))


class MLP(Model):
    """One hidden tanh layer, sigmoid output: ``[W1, b1, w2, b2]``."""

    name = "mlp"

    def __init__(self, hidden: int = 16) -> None:
        self.hidden = hidden

    def init(self, n_features: int, seed: int) -> Params:
        rng = np.random.default_rng(seed)
        scale = 1.0 / np.sqrt(n_features)
        return [
            rng.normal(0.0, scale, (n_features, self.hidden)),
            np.zeros(self.hidden),
            rng.normal(0.0, 1.0 / np.sqrt(self.hidden), self.hidden),
            np.zeros(1),
        ]

    def _forward(self, params: Params, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hidden = np.tanh(x @ params[0] + params[1])
        z = hidden @ params[2] + params[3][0]
        return hidden, 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))

    def predict(self, params: Params, x: np.ndarray) -> np.ndarray:
        return self._forward(params, x)[1]

    def gradient(self, params: Params, x: np.ndarray, y: np.ndarray) -> Params:
        hidden, p = self._forward(params, x)
        error = (p - y) / len(y)
        back = np.outer(error, params[2]) * (1 - hidden**2)
        return [x.T @ back, back.sum(axis=0), hidden.T @ error, np.array([error.sum()])]

    def loss(self, params: Params, x: np.ndarray, y: np.ndarray) -> float:
        p = np.clip(self.predict(params, x), 1e-12, 1 - 1e-12)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


MODELS: dict[str, type[Model]] = {"logistic": Logistic, "linear": Linear, "mlp": MLP}


def get_model(name: str) -> Model:
    """The model family called ``name`` (``logistic``, ``linear`` or ``mlp``)."""
    try:
        return MODELS[name]()
    except KeyError:
        raise InvalidInput(
            f"unknown model {name!r}; choose one of {sorted(MODELS)}"
        ) from None


def metrics(
    model: Model, params: Params, x: np.ndarray, y: np.ndarray
) -> dict[str, float]:
    """Sums a site reports on its held-out rows (pooled by adding across sites).

    Binary: ``n``, ``loss_sum``, ``correct``, and positive/negative counts per score
    bin (for a pooled AUC). Regression: ``n``, ``loss_sum``, ``sse``, ``sy``, ``syy``.
    """
    out: dict[str, float] = {
        "n": float(len(y)),
        "loss_sum": model.loss(params, x, y) * len(y),
    }
    prediction = model.predict(params, x)
    if model.task == "binary":
        out["correct"] = float(np.sum((prediction >= 0.5) == (y == 1)))
        bins = np.minimum((prediction * AUC_BINS).astype(int), AUC_BINS - 1)
        for label in (0, 1):
            counts = np.bincount(bins[y == label], minlength=AUC_BINS)
            for i in np.flatnonzero(counts):
                out[f"bin{label}_{i}"] = float(counts[i])
    else:
        out["sse"] = float(np.sum(np.square(prediction - y)))
        out["sy"] = float(np.sum(y))
        out["syy"] = float(np.sum(np.square(y)))
    return out


AUC_BINS = 1000


def summarize(model: Model, sums: dict[str, float]) -> dict[str, float]:
    """Loss, accuracy and AUC (binary) or R² (regression) from pooled sums."""
    n = sums.get("n", 0.0)
    if n <= 0:
        return {}
    out = {"loss": sums["loss_sum"] / n}
    if model.task == "binary":
        out["accuracy"] = sums["correct"] / n
        neg = np.array([sums.get(f"bin0_{i}", 0.0) for i in range(AUC_BINS)])
        pos = np.array([sums.get(f"bin1_{i}", 0.0) for i in range(AUC_BINS)])
        if pos.sum() and neg.sum():
            # P(score_pos > score_neg) + ½ P(tie), ties within a bin
            below = np.cumsum(neg) - neg
            out["auc"] = float(
                (pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum())
            )
    else:
        total = sums["syy"] - sums["sy"] ** 2 / n
        out["r2"] = 1.0 - sums["sse"] / total if total > 0 else float("nan")
    return out
