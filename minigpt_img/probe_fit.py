"""§2.4 Linear probing, the regression: a multinomial logistic regression on frozen features.

Legend: N images, C features, K classes.

    p(y | f) = softmax(f W + b)       on standardised f, W (C, K)
    J(W, b)  = -(1/N) sum_i log p(y_i | f_i) + (lambda / 2) ||W||^2
    dJ/dW = (1/N) F^T (P - Y) + lambda W,   dJ/db = (1/N) sum_i (p_i - y_i)

fitted full-batch with L-BFGS (scipy.optimize.minimize), as §3.4 does on CIFAR and STL-10 ("we use
the L-BFGS algorithm for consistency with prior results"), in coordinates that make the problem
round: with the standardised features' covariance X^T X / N = V diag(s) V^T, L-BFGS works on W'
where W = V diag(d) W' and d = (s + lambda)^(-1/2), so the data term's curvature along every
feature direction and the penalty's are both about 1 (a departure for speed; J and its optimum are
the same, the penalty reads (lambda / 2) sum_i d_i^2 ||W'_i||^2). lambda is chosen from a small grid on a
slice of the TRAINING images held out for that purpose, then the probe is refitted on all training
features and scored on the evaluation split, so no choice is made on the reported number. The grid
is walked from the strongest lambda down, each fit starting where the one before stopped (J is
strictly convex: the same optimum, fewer iterations; departure for speed, not in the paper).

§4.7 low-data probes: "we sample 5 random subsets and report mean and standard deviation"; each
subset's probe uses the layer and lambda of the probe fitted on all labels (departure: the paper does
not say how they are chosen with few labels).
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from .kernels import logsumexp
from .streams import generator

L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
EXTEND = 3  # at most this many more lambdas, 10x apart, past an end of the grid that scores best


def loss_and_grad(params: np.ndarray, F: np.ndarray, y: np.ndarray, K: int, lam):
    """J and dJ/dparams for params = [W (C, K) flattened, b (K,)] (formulas in the docstring). lam:
    a number, or (C, 1) per-feature penalties (the rounded coordinates of LogisticProbe.fit)."""
    N, C = F.shape
    W, b = params[:C * K].reshape(C, K), params[C * K:]
    Z = F @ W + b                                                              # (N, K)
    lse = logsumexp(Z, axis=1)                                                 # (N, 1)
    J = float(np.mean(lse[:, 0] - Z[np.arange(N), y]) + 0.5 * np.sum(lam * W * W))
    P = np.exp(Z - lse)                                                        # softmax (N, K)
    P[np.arange(N), y] -= 1.0                                                  # P - Y
    gW = F.T @ P / N + lam * W
    gb = P.sum(axis=0) / N
    return J, np.concatenate([gW.ravel(), gb])


class LogisticProbe:
    """Standardise, then L-BFGS on J in rounded coordinates (module docstring; departure for speed:
    the same optimum). predict() returns class indices."""

    def __init__(self, lam: float = 1e-3, max_iter: int = 500):
        self.lam, self.max_iter = lam, max_iter

    def fit(self, F: np.ndarray, y: np.ndarray, n_classes: int, start=None) -> "LogisticProbe":
        """start: params [W, b] to begin from (a fit with a nearby lambda), else zeros."""
        F = np.asarray(F, np.float64)
        self.mean, self.std = F.mean(axis=0), F.std(axis=0) + 1e-6
        X = (F - self.mean) / self.std
        self.K, C = n_classes, X.shape[1]
        s, V = np.linalg.eigh(X.T @ X / len(X))                                # X^T X / N = V diag(s) V^T
        d = 1.0 / np.sqrt(np.maximum(s, 0.0) + self.lam)                       # (C,)
        Xr = X @ (V * d)                                                       # (N, C) = X V diag(d)
        start = np.zeros(C * n_classes + n_classes) if start is None else start
        x0 = np.concatenate([((V.T @ start[:C * n_classes].reshape(C, n_classes)) / d[:, None]).ravel(),
                             start[C * n_classes:]])                           # W' = diag(1/d) V^T W
        res = minimize(loss_and_grad, x0, args=(Xr, y, n_classes, self.lam * d[:, None] ** 2),
                       jac=True, method="L-BFGS-B", options={"maxiter": self.max_iter})
        self.W = (V * d) @ res.x[:C * n_classes].reshape(C, n_classes)        # back to W: (C, K)
        self.b = res.x[C * n_classes:]
        self.params, self.result = np.concatenate([self.W.ravel(), self.b]), res
        return self

    def raw_weights(self) -> tuple:
        """(A (C, K), c (K,)): the logits on features as they are, F A + c, with the standardisation
        folded in: ((F - mean) / std) W + b = F (W / std) + (b - (mean / std) W)."""
        return self.W / self.std[:, None], self.b - (self.mean / self.std) @ self.W

    def predict(self, F: np.ndarray) -> np.ndarray:
        return (((np.asarray(F, np.float64) - self.mean) / self.std) @ self.W + self.b).argmax(axis=1)

    def accuracy(self, F, y) -> float:
        return float(np.mean(self.predict(F) == y))


def held_out(n: int, fraction: float = 0.1) -> int:
    """How many of n training images fit_probe holds out to choose lambda on."""
    return max(1, int(round(fraction * n)))


def fit_probe(F_train, y_train, n_classes: int, seed: int = 0, grid=L2_GRID,
              holdout: float = 0.1, one_se: bool = False) -> tuple:
    """Choose lambda on a held-out slice of the training features, then refit on all of them.
    one_se: the strongest lambda whose held-out accuracy is within one standard error,
    sqrt(a (1 - a) / n_held_out), of the best a (the "one-standard-error rule": nearly as accurate,
    smaller weights). When an end of the grid scores strictly best, the grid extends past it, 10x at
    a time, up to EXTEND more lambdas, so that the choice is not cut off by the grid.
    -> (the refitted LogisticProbe, its lambda, its held-out accuracy)."""
    rng = generator(seed, "probe_holdout")
    order = rng.permutation(len(y_train))
    n_hold = held_out(len(y_train), holdout)
    hold, fit = order[:n_hold], order[n_hold:]
    fits, scores = {}, {}

    def fit_at(lam, start):
        fits[lam] = LogisticProbe(lam).fit(F_train[fit], y_train[fit], n_classes,
                                           None if start is None else start.params)
        scores[lam] = fits[lam].accuracy(F_train[hold], y_train[hold])

    start = None
    for lam in sorted(grid, reverse=True):  # strongest first, each fit warm-started from the last
        fit_at(lam, start)
        start = fits[lam]
    for _ in range(EXTEND):
        lams = sorted(scores)
        if len(lams) > 1 and scores[lams[0]] > max(scores[l] for l in lams[1:]):
            fit_at(lams[0] / 10, fits[lams[0]])                    # the weakest won: weaker still
        elif len(lams) > 1 and scores[lams[-1]] > max(scores[l] for l in lams[:-1]):
            fit_at(lams[-1] * 10, fits[lams[-1]])                  # the strongest won: stronger still
        else:
            break
    lams = sorted(scores)
    best = max(lams, key=lambda l: (scores[l], -l))  # ties: the weakest, as before
    if one_se:
        top = scores[best]
        best = max(l for l in lams if scores[l] >= top - np.sqrt(top * (1 - top) / n_hold))
    final = LogisticProbe(best).fit(F_train, y_train, n_classes, fits[best].params)
    return final, best, scores[best]


def probe_layer(F_train, y_train, F_eval, y_eval, n_classes: int, seed: int = 0,
                grid=L2_GRID, holdout: float = 0.1) -> dict:
    """fit_probe, then score the evaluation features. -> {lam, holdout_acc, eval_acc}."""
    probe, lam, holdout_acc = fit_probe(F_train, y_train, n_classes, seed, grid, holdout)
    return {"lam": lam, "holdout_acc": holdout_acc, "eval_acc": probe.accuracy(F_eval, y_eval)}


def balanced_subsets(y: np.ndarray, per_class: int, n_subsets: int, seed: int) -> list:
    """n_subsets index arrays, each with `per_class` images of every class, drawn with a seed."""
    classes = np.unique(y)
    out = []
    for s in range(n_subsets):
        rng = generator(seed, "low_data", per_class, s)
        picks = []
        for c in classes:
            members = np.flatnonzero(y == c)
            if len(members) < per_class:
                raise ValueError(f"class {c} has {len(members)} training images, fewer than {per_class}")
            picks.append(rng.choice(members, per_class, replace=False))
        out.append(np.sort(np.concatenate(picks)))
    return out


def low_data_probe(F_train, y_train, F_eval, y_eval, n_classes, per_class: int, lam: float,
                   n_subsets: int = 5, seed: int = 0) -> dict:
    """§4.7: probes fitted on `per_class` labelled images of each class, n_subsets random draws.
    Departure: lambda (and the caller's layer) come from the probe fitted on all labels."""
    accs = [LogisticProbe(lam).fit(F_train[idx], y_train[idx], n_classes).accuracy(F_eval, y_eval)
            for idx in balanced_subsets(y_train, per_class, n_subsets, seed)]
    return {"per_class": per_class, "mean": float(np.mean(accs)), "std": float(np.std(accs)),
            "accs": accs}
