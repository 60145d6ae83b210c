"""§2.4 Linear probing: how good are the features the generative model learned, layer by layer?

Legend: N images, L layers, C width, K classes, T positions.

    f^l = (1/T) sum_t n^l_t          average-pooled normalised activations of layer l (0 <= l <= L):
                                      n^l = norm(h^l), the input to block l's attention (l < L), and
                                      the final norm n^L
    p(y | f) = softmax(f W + b)       multinomial logistic regression on standardised f, W (C, K)
    J(W, b)  = -(1/N) sum_i log p(y_i | f_i) + (lambda / 2) ||W||^2
    dJ/dW = (1/N) F^T (P - Y) + lambda W,   dJ/db = (1/N) sum_i (p_i - y_i)

fitted full-batch with L-BFGS (scipy.optimize.minimize), in coordinates that make the problem
round: with the standardised features' covariance X^T X / N = V diag(s) V^T, L-BFGS works on W'
where W = V diag(d) W' and d = (s + lambda)^(-1/2), so the data term's curvature along every
feature direction and the penalty's are both about 1 (a departure for speed; J and its optimum are
the same, the penalty reads (lambda / 2) sum_i d_i^2 ||W'_i||^2). lambda is chosen from a small grid on a
slice of the TRAINING images held out for that purpose, then the probe is refitted on all training
features and scored on the evaluation split, so no choice is made on the reported number. The grid
is walked from the strongest lambda down, each fit starting where the one before stopped (J is
strictly convex: the same optimum, fewer iterations; departure for speed, not in the paper).

--concat K probes K consecutive layers' features side by side (K C features), centred on the best
single layer: the paper's strongest ImageNet probe concatenates 5 layers of iGPT-XL (15,360 =
5 x 3,072 features). Which 5 it does not say here; centring on the best layer is our choice.

For an AR model the images go in as in pre-training (SOS, then all but the last pixel); a BERT model
sees its inputs masked as in pre-training (§4.6), optionally averaged over several random masks.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from tqdm import tqdm

from .checkpoint import load_model, read_meta
from .data import DataError, cached_tokens, trained_on
from .files import file_digest, load_cached, store_cached
from .model import ImageGPT
from .objectives import image_losses, model_inputs
from .parallel import Solo, strided
from .palette import Palette
from .plots import line_chart
from .streams import generator
from .tensor import no_grad
from .threads import current_threads, set_blas_threads

L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


# ---- features ----------------------------------------------------------------------------------
def extract_features(model, tokens: np.ndarray, objective: str = "ar", batch_size: int = 64,
                     mask_rate: float = 0.15, n_masks: int = 1, seed: int = 0,
                     desc: str = "features", comm: Solo | None = None, fair_share=None):
    """tokens (N, T) -> (pooled features (N, L + 1, C) float32, each image's generative loss (N,)
    float64 from the same pass: objectives.image_losses), one no-grad forward per batch. Under MPI
    the batches are shared out among the ranks and the results summed into every rank.
    fair_share (threads.FairShare): adapt the thread count to the machine's load after each batch."""
    cfg, comm = model.config, comm or Solo()
    feats = np.zeros((len(tokens), cfg.n_layer + 1, cfg.n_embd), np.float32)
    losses = np.zeros(len(tokens))
    repeats = n_masks if objective == "bert" else 1  # AR inputs are not random: one pass is the mean
    with no_grad():
        for b in tqdm(strided(-(-len(tokens) // batch_size), comm), desc=desc, unit="batch", leave=False,
                      disable=not comm.is_root):
            rows = slice(b * batch_size, (b + 1) * batch_size)
            x = np.asarray(tokens[rows], dtype=np.int64)
            rng, acc, loss = generator(seed, "probe_masks", b), 0.0, 0.0
            for _ in range(repeats):
                inputs, causal, mask = model_inputs(x, cfg.sos, objective, mask_rate, rng)
                logits, ns = model.forward_features(inputs, causal, mask)
                acc = acc + np.stack([n.data.mean(axis=1) for n in ns], axis=1)     # (B, L+1, C)
                loss = loss + image_losses(logits.data, x, mask)                    # (B,)
            feats[rows], losses[rows] = acc / repeats, loss / repeats
            if fair_share is not None:
                fair_share.update()
    if fair_share is not None:
        fair_share.reset()  # the fits after this run on as many threads as the process has (fan_out)
    return comm.allreduce_sum(feats), comm.allreduce_sum(losses)


def shared_cached(paths: tuple, compute, comm: Solo) -> tuple:
    """files.cached_array for every rank, for arrays computed together (compute() returns one per
    path): rank 0 checks the cache and says whether it holds them all; if not, all ranks compute them
    together (compute is collective) and rank 0 stores them."""
    arrays = [load_cached(p) for p in paths] if comm.is_root else []
    hit = comm.broadcast(np.array([all(a is not None for a in arrays)], dtype=np.int64))[0]
    if hit:
        return tuple(arrays) if comm.is_root else tuple(load_cached(p) for p in paths)
    arrays = compute()
    if comm.is_root:
        for path, array in zip(paths, arrays):
            store_cached(path, array)
    return tuple(arrays)


def cached_features(stem: Path, model, tokens: np.ndarray, comm: Solo, **kw) -> tuple:
    """extract_features(model, tokens, comm=comm, **kw) -> (features, per-image losses), cached as
    <stem>.npy and <stem>-loss.npy (shared_cached)."""
    return shared_cached((Path(f"{stem}.npy"), Path(f"{stem}-loss.npy")),
                         lambda: extract_features(model, tokens, comm=comm, **kw), comm)


def fan_out(jobs: list, comm: Solo) -> list:
    """[job() for job in jobs], the jobs shared out among the ranks (job i on rank i % size) and
    every result returned to every rank, in order. Each rank runs its jobs side by side on as many
    threads as it has (NumPy releases the GIL in its loops), BLAS at one thread each: a fit's
    rounding then never depends on how many threads the machine offers."""
    workers = current_threads()
    set_blas_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            ids = strided(len(jobs), comm)
            mine = dict(zip(ids, pool.map(lambda i: jobs[i](), ids)))
    finally:
        set_blas_threads(workers)
    merged = {}
    for part in comm.allgather_objects(mine):
        merged.update(part)
    return [merged[i] for i in range(len(jobs))]


# ---- multinomial logistic regression ----------------------------------------------------------
def loss_and_grad(params: np.ndarray, F: np.ndarray, y: np.ndarray, K: int, lam):
    """J and dJ/dparams for params = [W (C, K) flattened, b (K,)] (formulas in the docstring). lam:
    a number, or (C, 1) per-feature penalties (the rounded coordinates of LogisticProbe.fit)."""
    N, C = F.shape
    W, b = params[:C * K].reshape(C, K), params[C * K:]
    Z = F @ W + b                                                              # (N, K)
    Z = Z - Z.max(axis=1, keepdims=True)
    P = np.exp(Z)
    total = P.sum(axis=1)
    J = float(np.mean(np.log(total) - Z[np.arange(N), y]) + 0.5 * np.sum(lam * W * W))
    P /= total[:, None]                                                        # softmax
    P[np.arange(N), y] -= 1.0                                                  # P - Y
    gW = F.T @ P / N + lam * W
    gb = P.sum(axis=0) / N
    return J, np.concatenate([gW.ravel(), gb])


class LogisticProbe:
    """Standardise, then L-BFGS on J. predict() returns class indices."""

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


def fit_probe(F_train, y_train, n_classes: int, seed: int = 0, grid=L2_GRID,
              holdout: float = 0.1, one_se: bool = False) -> tuple:
    """Choose lambda on a held-out slice of the training features, then refit on all of them.
    one_se: the strongest lambda whose held-out accuracy is within one standard error,
    sqrt(a (1 - a) / n_held_out), of the best a (the "one-standard-error rule": nearly as accurate,
    smaller weights). -> (the refitted LogisticProbe, its lambda, its held-out accuracy)."""
    rng = generator(seed, "probe_holdout")
    order = rng.permutation(len(y_train))
    n_hold = max(1, int(round(holdout * len(y_train))))
    hold, fit = order[:n_hold], order[n_hold:]
    fits, start = {}, None
    for lam in sorted(grid, reverse=True):  # strongest first, each fit warm-started from the last
        fits[lam] = start = LogisticProbe(lam).fit(F_train[fit], y_train[fit], n_classes,
                                                   None if start is None else start.params)
    scores = [fits[lam].accuracy(F_train[hold], y_train[hold]) for lam in grid]
    best = int(np.argmax(scores))
    if one_se:
        top = scores[best]
        best = max((i for i in range(len(grid)) if scores[i] >= top - np.sqrt(top * (1 - top) / n_hold)),
                   key=lambda i: grid[i])
    final = LogisticProbe(grid[best]).fit(F_train, y_train, n_classes, fits[grid[best]].params)
    return final, grid[best], scores[best]


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
    """§4.7: probes fitted on `per_class` labelled images of each class, n_subsets random draws."""
    accs = [LogisticProbe(lam).fit(F_train[idx], y_train[idx], n_classes).accuracy(F_eval, y_eval)
            for idx in balanced_subsets(y_train, per_class, n_subsets, seed)]
    return {"per_class": per_class, "mean": float(np.mean(accs)), "std": float(np.std(accs)),
            "accs": accs}


# ---- the report behind probe.py ---------------------------------------------------------------
def _best(rows: list) -> dict:
    """The layer whose probe did best on the held-out training slice (never on the eval split)."""
    return max(rows, key=lambda r: r["holdout_acc"])


def concat_layers(best: int, k: int, n_layers: int) -> list:
    """k consecutive layers of 0..n_layers-1 centred on `best` (shifted to fit at either end)."""
    lo = min(max(0, best - k // 2), n_layers - k)
    return list(range(lo, lo + k))


def concat_name(concat: dict) -> str:
    """How reports and charts name a concatenated probe: 'layers a..b concatenated'."""
    return f"layers {concat['layers'][0]}..{concat['layers'][-1]} concatenated"


def probe_report(ckpt, data=None, data_dir=None, eval_split="test", layers=None, max_train=None,
                 max_eval=None, batch_size=64, labels_per_class=(), bert_masks=1, seed=0,
                 baselines=True, cache_dir="runs/cache", log=print, comm: Solo | None = None,
                 fair_share=None, concat: int = 1) -> dict:
    """Probe every layer of a checkpoint; see probe.py for the options. Returns the report dict.
    Under MPI, features are extracted and the regressions fitted by all ranks together.
    fair_share: a threads.FairShare the feature extraction keeps up to date."""
    ckpt, comm = Path(ckpt), comm or Solo()
    model, centers, meta, _ = load_model(ckpt)
    run, cfg = meta.get("run", {}), model.config
    ds = trained_on(run, cfg.n_px, data, data_dir, where=ckpt)
    name = ds.name
    if eval_split == "test" and ds.test is None:
        raise DataError(f"{name} has no test set in {data_dir or run.get('data_dir', 'data')}: "
                        "use --eval-split val (the held-out 10% of the training set)")
    train, ev = ds.train, (ds.test if eval_split == "test" else ds.val)
    tr_n, ev_n = min(len(train), max_train or len(train)), min(len(ev), max_eval or len(ev))
    x_tr, y_tr = train.images[:tr_n], train.labels[:tr_n]
    x_ev, y_ev = ev.images[:ev_n], ev.labels[:ev_n]
    K = len(ds.classes)
    counts = np.bincount(y_tr, minlength=K)
    for n in labels_per_class:  # checked before any feature is extracted
        if counts.min() < n:
            raise ValueError(f"--labels-per-class {n}: class {ds.classes[int(counts.argmin())]} has only "
                             f"{counts.min()} of the {tr_n} training images: ask for at most {counts.min()}"
                             " per class, or use more training images (--max-train)")
    if not 1 <= concat <= cfg.n_layer + 1:
        raise ValueError(f"--concat {concat}: {ckpt} has layers 0..{cfg.n_layer}: concatenate 2 to "
                         f"{cfg.n_layer + 1} of them")
    palette = Palette(centers)
    with comm.root_first():
        t_tr, t_ev = cached_tokens(x_tr, palette, cache_dir), cached_tokens(x_ev, palette, cache_dir)
    objective = run.get("objective", "ar")
    feat_dir = ckpt.parent / "features"
    key = f"{file_digest(ckpt)[:16]}-{Path(str(name)).name}-{cfg.n_px}-{objective}{bert_masks}"

    def features(m, tokens, split, tag):
        """(features (N, L+1, C), loss per image (N,)) of model m, cached beside the checkpoint."""
        return cached_features(feat_dir / f"{tag}-{key}-{split}{len(tokens)}", m, tokens, comm,
                               objective=objective, batch_size=batch_size,
                               mask_rate=run.get("mask_rate", 0.15), n_masks=bert_masks, seed=seed,
                               desc=f"{tag} {split} features", fair_share=fair_share)

    log(f"probing {ckpt} ({cfg.n_layer} layers, width {cfg.n_embd}) on {name}: {tr_n} train images, "
        f"{ev_n} {eval_split} images, {K} classes")
    (F_tr, loss_tr), (F_ev, loss_ev) = (features(model, t_tr, "train", "trained"),
                                        features(model, t_ev, eval_split, "trained"))
    chosen = list(range(cfg.n_layer + 1)) if layers is None else list(layers)

    def layer_job(F, G, l):
        return lambda: {"layer": l, **probe_layer(F[:, l], y_tr, G[:, l], y_ev, K, seed)}

    log(f"fitting {len(chosen)} layer probes")
    rows = fan_out([layer_job(F_tr, F_ev, l) for l in chosen], comm)
    best = _best(rows)
    report = {"checkpoint": str(ckpt), "data": str(name), "eval_split": eval_split, "n_train": tr_n,
              "n_eval": ev_n, "n_classes": K, "layers": rows, "best": best, "objective": objective,
              # the generative loss on the same images, as they are (no augmentation): the real gap
              "loss": {"train": float(loss_tr.mean()), "eval": float(loss_ev.mean())}}
    if concat > 1:
        ls = concat_layers(best["layer"], concat, cfg.n_layer + 1)
        log(f"fitting a probe on layers {ls[0]}..{ls[-1]} side by side ({concat * cfg.n_embd} features)")
        F, G = F_tr[:, ls].reshape(tr_n, -1), F_ev[:, ls].reshape(ev_n, -1)             # (N, k C)
        fit = fan_out([lambda: probe_layer(F, y_tr, G, y_ev, K, seed)], comm)[0]
        report["concat"] = {"layers": ls, **fit}

    if baselines:
        log("baselines: raw pixels, palette-token histogram, the same model at random init")
        pix_tr = x_tr.reshape(tr_n, -1).astype(np.float32) / 255.0
        pix_ev = x_ev.reshape(ev_n, -1).astype(np.float32) / 255.0
        V = cfg.vocab
        hist_tr = np.stack([np.bincount(t, minlength=V) for t in t_tr]) / t_tr.shape[1]
        hist_ev = np.stack([np.bincount(t, minlength=V) for t in t_ev]) / t_ev.shape[1]
        random_model = ImageGPT(cfg, generator(seed, "random_init"))
        R_tr = features(random_model, t_tr, "train", "random")[0]
        R_ev = features(random_model, t_ev, eval_split, "random")[0]
        jobs = [lambda: probe_layer(pix_tr, y_tr, pix_ev, y_ev, K, seed),
                lambda: probe_layer(hist_tr, y_tr, hist_ev, y_ev, K, seed)]
        jobs += [layer_job(R_tr, R_ev, l) for l in chosen]
        results = fan_out(jobs, comm)
        report["raw_pixels"], report["token_histogram"], rand_rows = results[0], results[1], results[2:]
        report["random_init"] = {"layers": rand_rows, "best": _best(rand_rows)}

    if labels_per_class:
        l = best["layer"]
        report["low_data"] = fan_out([lambda n=n: low_data_probe(F_tr[:, l], y_tr, F_ev[:, l], y_ev, K, n,
                                                                 best["lam"], seed=seed)
                                      for n in labels_per_class], comm)
    return report


def probe_along(snapshots: list, log=print, **kw) -> dict:
    """§4.2: probe checkpoints taken along one run (train.py --snapshots) and pair each one's best
    probe accuracy with its validation loss. The paper finds them tightly related: a better
    generative model gives better features. kw: probe_report's options (baselines are skipped)."""
    points, split = [], None
    for path in sorted(Path(p) for p in snapshots):
        _, meta = read_meta(path)
        if "val_loss" not in meta:
            raise ValueError(f"{path} holds no validation loss: probe the snapshots/ of a run trained "
                             "with --snapshots")
        report = probe_report(path, baselines=False, labels_per_class=(), log=log, **kw)
        split = report["eval_split"]
        points.append({"checkpoint": str(path), "step": meta["step"], "val_loss": meta["val_loss"],
                       "best": report["best"], "layers": report["layers"], "loss": report["loss"]})
        log(f"step {meta['step']}: val loss {meta['val_loss']:.4f}, best probe "
            f"{report['best']['eval_acc']:.2%} (layer {report['best']['layer']}); {_loss_line(report)}")
    return {"points": points, "eval_split": split}


def plot_along(along: dict, path) -> None:
    pts = sorted(along["points"], key=lambda p: p["val_loss"])
    line_chart({"checkpoints along the run": ([p["val_loss"] for p in pts],
                                              [100 * p["best"]["eval_acc"] for p in pts])},
               path, title=f"best-layer probe accuracy vs validation loss ({along['eval_split']} split)",
               xlabel="validation loss (nats per token)", ylabel="accuracy %", ylim=(0, 100))


def _loss_line(report: dict) -> str:
    """The generative loss on the probe's own images, none augmented: how far the model fits the
    training images better than the others."""
    train, ev = report["loss"]["train"], report["loss"]["eval"]
    return (f"generative loss (nats/token, images not augmented): train {train:.4f}, "
            f"{report['eval_split']} {ev:.4f}, gap {ev - train:+.4f}")


def format_report(report: dict) -> str:
    lines = [f"linear probe of {report['checkpoint']} on {report['data']} "
             f"(accuracy on {report['n_eval']} {report['eval_split']} images; lambda chosen on held-out "
             "training images)", "", "layer  held-out acc  eval acc  lambda"]
    rand = {r["layer"]: r for r in report.get("random_init", {}).get("layers", [])}
    for r in report["layers"]:
        extra = f"   random init {rand[r['layer']]['eval_acc']:.2%}" if r["layer"] in rand else ""
        lines.append(f"{r['layer']:>5}  {r['holdout_acc']:>12.2%}  {r['eval_acc']:>8.2%}  "
                     f"{r['lam']:<7g}{extra}")
    b = report["best"]
    lines.append(f"best layer {b['layer']}: {b['eval_acc']:.2%}")
    if "loss" in report:
        lines.append(_loss_line(report))
    if "concat" in report:
        c = report["concat"]
        lines.append(f"{concat_name(c)}: {c['eval_acc']:.2%} (lambda {c['lam']:g})")
    for key, label in (("raw_pixels", "raw pixels"), ("token_histogram", "palette-token histogram")):
        if key in report:
            lines.append(f"baseline, {label}: {report[key]['eval_acc']:.2%}")
    if "random_init" in report:
        rb = report["random_init"]["best"]
        lines.append(f"baseline, same model at random init (best layer {rb['layer']}): {rb['eval_acc']:.2%}")
    for d in report.get("low_data", []):
        lines.append(f"low data, {d['per_class']} labels per class (layer {b['layer']}, 5 draws): "
                     f"{d['mean']:.2%} +- {d['std']:.2%}")
    return "\n".join(lines)


def plot_report(report: dict, path) -> None:
    series = {"trained model": ([r["layer"] for r in report["layers"]],
                                [100 * r["eval_acc"] for r in report["layers"]])}
    if "random_init" in report:
        rows = report["random_init"]["layers"]
        series["random init"] = ([r["layer"] for r in rows], [100 * r["eval_acc"] for r in rows])
    chance = 100 / report["n_classes"]
    hlines = {f"chance {chance:.1f}%": chance}
    if "concat" in report:
        c = report["concat"]
        hlines[f"{concat_name(c)} {100 * c['eval_acc']:.1f}%"] = 100 * c["eval_acc"]
    if "raw_pixels" in report:
        hlines[f"raw pixels {100 * report['raw_pixels']['eval_acc']:.1f}%"] = 100 * report["raw_pixels"]["eval_acc"]
    line_chart(series, path, title=f"linear probe accuracy by layer ({report['data']}, "
               f"{report['eval_split']} split)", xlabel="layer l (features n^l)",
               ylabel="accuracy %", hlines=hlines, ylim=(0, 100))
