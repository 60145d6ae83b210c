"""§4 The linear-probe experiments behind probe.py: every layer (§4.1), along a run (§4.2), several
layers side by side (§4.4), few labels (§4.7), beside baselines.

For each layer l the pooled features f^l of the training and evaluation images (features.py) get a
logistic regression whose lambda is chosen on held-out training images (probe_fit.py); the reported
accuracy is on the evaluation split. §4.1: "it is important to search for the best layer": the best
layer is the one that did best on the held-out training images, never on the evaluation split.

--concat K probes K consecutive layers' features side by side (K C features), as §4.4: "we
concatenate features from 5 layers centered at the best single layer of iGPT-XL" (at the ends of
the model the window is shifted to fit).

Baselines, not in the paper: the same regression on raw pixels, on the palette-token histogram, and
on the same network at random initialisation, so that a probe's accuracy says how much the
pre-training added.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .checkpoint import model_digest, open_model, read_meta
from .data import cached_tokens, trained_on
from .errors import CheckpointError
from .features import cached_features, seconds_per_image, side_by_side
from .forecast import human_time
from .model import ImageGPT
from .palette import Palette
from .parallel import Solo, fan_out
from .plots import line_chart
from .probe_fit import held_out, low_data_probe, probe_layer
from .runconfig import declared
from .sizes import forward_bytes, images_per_pass, memory_problem
from .streams import generator


def _best(rows: list) -> dict:
    """The layer whose probe did best on the held-out training slice (never on the eval split)."""
    return max(rows, key=lambda r: r["holdout_acc"])


def concat_layers(best: int, k: int, n_layers: int) -> list:
    """k consecutive layers of 0..n_layers-1 centred on `best`, as §4.4; departure: shifted to fit
    at either end of the model, where the paper's iGPT-XL never needed it."""
    lo = min(max(0, best - k // 2), n_layers - k)
    return list(range(lo, lo + k))


def concat_name(concat: dict) -> str:
    """How reports and charts name a concatenated probe: 'layers a..b concatenated'."""
    return f"layers {concat['layers'][0]}..{concat['layers'][-1]} concatenated"


def probe_report(ckpt, data, data_dir, eval_split, layers, max_train, max_eval, batch_size, labels_per_class,
                 bert_masks, seed, baselines=True, cache_dir=None, log=print, comm: Solo | None = None,
                 fair_share=None, concat: int = 1) -> dict:
    """Probe every layer of a checkpoint with probe.py's settings (its flags hold the defaults);
    concat 1 and no labels_per_class: those probes off. Returns the report dict.
    Under MPI, features are extracted and the regressions fitted by all ranks together.
    fair_share: a threads.FairShare the feature extraction keeps up to date."""
    ckpt, comm = Path(ckpt), comm or Solo()
    cache_dir = Path(cache_dir or declared("cache_dir"))
    model, centers, meta, path = open_model(ckpt)
    if centers is None:
        raise CheckpointError(f"{ckpt} holds no palette: its tokens mean no colours")
    run, cfg = meta.get("run", {}), model.config
    ds = trained_on(run, cfg.n_px, data, data_dir, where=ckpt)
    name = ds.name
    if eval_split == "test" and ds.test is None:  # as fine-tuning does: the validation split, which chose nothing
        log(f"{name} has no test split here: the accuracies are on its validation split (the 10% of the "
            "training set held out by the seeded split), which chooses nothing")
        eval_split = "val"
    train, ev = ds.train, (ds.test if eval_split == "test" else ds.val)
    tr_n, ev_n = min(len(train), max_train or len(train)), min(len(ev), max_eval or len(ev))
    x_tr, y_tr = train.images[:tr_n], train.labels[:tr_n]
    x_ev, y_ev = ev.images[:ev_n], ev.labels[:ev_n]
    K = len(ds.classes)
    if tr_n < 10:  # a tenth is held out to choose lambda: fewer would leave nothing to fit or to score
        raise ValueError(f"{tr_n} training image(s): a probe needs at least 10 (a tenth is held out to choose "
                         "lambda); raise --max-train")
    counts = np.bincount(y_tr, minlength=K)
    for n in labels_per_class:  # checked before any feature is extracted
        if counts.min() < n:
            raise ValueError(f"--labels-per-class {n}: class {ds.classes[int(counts.argmin())]} has only "
                             f"{counts.min()} of the {tr_n} training images: ask for at most {counts.min()}"
                             " per class, or use more training images (--max-train)")
    outside = sorted({l for l in (layers or ()) if l > cfg.n_layer})
    if outside:  # before any feature is extracted
        raise ValueError(f"--layers {' '.join(map(str, outside))}: {ckpt} has layers 0..{cfg.n_layer} (0: the "
                         f"embeddings, {cfg.n_layer}: the final norm's output)")
    if not 1 <= concat <= cfg.n_layer + 1:
        raise ValueError(f"--concat {concat}: {ckpt} has layers 0..{cfg.n_layer}: concatenate 2 to "
                         f"{cfg.n_layer + 1} of them")
    palette = Palette(centers)
    with comm.root_first():
        t_tr, t_ev = cached_tokens(x_tr, palette, cache_dir), cached_tokens(x_ev, palette, cache_dir)
    objective = run.get("objective", "ar")
    feat_dir = cache_dir / "features"
    chosen = list(range(cfg.n_layer + 1)) if layers is None else sorted(set(layers))
    # the forward passes stop at the deepest layer asked for (and a --concat window centred below it)
    deepest = min(cfg.n_layer, max(chosen) + concat // 2)
    upto = deepest if deepest < cfg.n_layer else None
    at_once = min(batch_size, images_per_pass(cfg))
    problem = memory_problem(forward_bytes(cfg, at_once), f"the forward passes of {at_once} images at once",
                             "lower --batch-size")
    if problem:  # before any feature is extracted
        raise ValueError(problem)
    key = (f"{model_digest(path)[:16]}-{Path(str(name)).name}-{cfg.n_px}-{objective}{bert_masks}"
           + (f"-upto{deepest}" if upto is not None else ""))

    def stem(tag, split, tokens) -> Path:
        return feat_dir / f"{tag}-{key}-{split}{len(tokens)}"

    def features(m, tokens, split, tag):
        """(features (N, deepest+1, C), loss per image (N,) or None) of model m, cached in --cache-dir."""
        return cached_features(stem(tag, split, tokens), m, tokens, comm,
                               objective=objective, batch_size=batch_size,
                               mask_rate=run.get("mask_rate"), n_masks=bert_masks, seed=seed,
                               desc=f"{tag} {split} features", fair_share=fair_share, upto=upto)

    log(f"probing {ckpt} ({cfg.n_layer} layers, width {cfg.n_embd}) on {name}: {tr_n} train images, "
        f"{ev_n} {eval_split} images, {K} classes" +
        (f"; the forward passes stop at layer {deepest}, the deepest asked for" if upto is not None else ""))
    if not Path(f"{stem('trained', 'train', t_tr)}.npy").is_file():  # features to extract: say the cost
        per = seconds_per_image(model, t_tr, objective, run.get("mask_rate"), upto)
        passes = (tr_n + ev_n) * (2 if baselines else 1)  # the random-init model's features too
        line = (f"about {human_time(per)} per image: {human_time(per * passes)} for the features of "
                f"{passes} images{' (the random-init baseline doubles them)' if baselines else ''}")
        if per * passes > 600:
            line += ("; for a first try: --max-train 2000 --max-eval 500" +
                     (" --no-baselines" if baselines else "") +
                     (" --layers " + " ".join(map(str, range(0, cfg.n_layer // 2 + 1, max(1, cfg.n_layer // 12))))
                      if upto is None else ""))
        log(line)
    (F_tr, loss_tr), (F_ev, loss_ev) = (features(model, t_tr, "train", "trained"),
                                        features(model, t_ev, eval_split, "trained"))

    def layer_job(F, G, l):
        return lambda: {"layer": l, **probe_layer(F[:, l], y_tr, G[:, l], y_ev, K, seed)}

    log(f"fitting {len(chosen)} layer probes")
    rows = fan_out([layer_job(F_tr, F_ev, l) for l in chosen], comm)
    best = _best(rows)
    report = {"checkpoint": str(ckpt), "data": str(name), "eval_split": eval_split, "n_train": tr_n,
              "n_holdout": held_out(tr_n), "n_eval": ev_n, "n_classes": K, "layers": rows, "best": best,
              "objective": objective}
    if loss_tr is not None:  # the generative loss on the same images, as they are (no augmentation): the real gap
        report["loss"] = {"train": float(loss_tr.mean()), "eval": float(loss_ev.mean())}
    if concat > 1:
        ls = concat_layers(best["layer"], concat, deepest + 1)
        log(f"fitting a probe on layers {ls[0]}..{ls[-1]} side by side ({concat * cfg.n_embd} features)")
        F, G = side_by_side(F_tr, ls), side_by_side(F_ev, ls)                          # (N, k C)
        fit = fan_out([lambda: probe_layer(F, y_tr, G, y_ev, K, seed)], comm)[0]
        report["concat"] = {"layers": ls, **fit}

    if baselines:
        log("baselines: raw pixels, palette-token histogram, the same model at random init")
        pix_tr = x_tr.reshape(tr_n, -1).astype(np.float32) / 255.0
        pix_ev = x_ev.reshape(ev_n, -1).astype(np.float32) / 255.0
        V = cfg.vocab
        hist_tr = np.stack([np.bincount(t, minlength=V) for t in t_tr]) / t_tr.shape[1]
        hist_ev = np.stack([np.bincount(t, minlength=V) for t in t_ev]) / t_ev.shape[1]
        model = None  # the trained weights are done with: the random ones take their place in memory
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
        report = probe_report(path, baselines=False, labels_per_class=(), log=log, **kw)  # kw: probe.py's
        split = report["eval_split"]
        points.append({"checkpoint": str(path), "step": meta["step"], "val_loss": meta["val_loss"],
                       "best": report["best"], "layers": report["layers"], "loss": report.get("loss")})
        log(f"step {meta['step']}: val loss {meta['val_loss']:.4f}, best probe "
            f"{report['best']['eval_acc']:.2%} (layer {report['best']['layer']})"
            + (f"; {_loss_line(report)}" if "loss" in report else ""))
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


def standard_error(acc: float, n: int) -> float:
    """The standard error of an accuracy measured on n images: sqrt(a (1 - a) / n)."""
    return float(np.sqrt(acc * (1 - acc) / max(n, 1)))


def format_report(report: dict) -> str:
    n_ev, split = report["n_eval"], report["eval_split"]
    n_fit = report["n_train"] - report.get("n_holdout", 0)
    lines = [f"linear probe of {report['checkpoint']} on {report['data']}",
             f"each layer: a logistic regression on its average-pooled features; lambda (and below, the best "
             f"layer) chosen on {report.get('n_holdout', '?')} held-out training images after fitting on {n_fit}, "
             f"then refitted on all {report['n_train']}; eval acc on {n_ev} {split} images, which choose nothing "
             f"(+- one standard error)", "", "layer  held-out acc  eval acc          lambda"]
    rand = {r["layer"]: r for r in report.get("random_init", {}).get("layers", [])}
    for r in report["layers"]:
        extra = f"   random init {rand[r['layer']]['eval_acc']:.2%}" if r["layer"] in rand else ""
        lines.append(f"{r['layer']:>5}  {r['holdout_acc']:>12.2%}  {r['eval_acc']:>8.2%} +- "
                     f"{standard_error(r['eval_acc'], n_ev):.2%}  {r['lam']:<7g}{extra}")
    b = report["best"]
    lines.append(f"best layer {b['layer']}: {b['eval_acc']:.2%} +- {standard_error(b['eval_acc'], n_ev):.2%}")
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
                     f"{d['mean']:.2%} +- {d['std']:.2%} (standard deviation over the draws)")
    if "raw_pixels" in report and report["raw_pixels"]["eval_acc"] > b["eval_acc"]:
        lines.append(f"warning: raw pixels ({report['raw_pixels']['eval_acc']:.2%}) beat the best layer "
                     f"({b['eval_acc']:.2%}): the model has not learned features worth probing yet; train it "
                     "longer (more --steps or --epochs), as the paper's §4.2 finds features improve as the "
                     "validation loss falls")
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
