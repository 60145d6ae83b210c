"""§2.4/§4.7 linear probes and §2.3 fine-tuning."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize

from minigpt_img import ops
from minigpt_img.checkpoint import load_arrays, read_meta
from minigpt_img.features import extract_features, side_by_side
from minigpt_img.finetune import start_from_probe
from minigpt_img.probe_fit import LogisticProbe, balanced_subsets, fit_probe, loss_and_grad, probe_layer
from minigpt_img.probe_report import concat_layers
from minigpt_img.model import GPTConfig, ImageGPT
from minigpt_img.objectives import ar_inputs, ar_loss
from minigpt_img.runconfig import ConfigError, RunConfig, resolve_config
from minigpt_img.trainer import Trainer

from helpers import numeric_grad, relative_error, write_image_folder

REPO = Path(__file__).resolve().parent.parent


def test_features_are_the_models_pooled_n_l():
    cfg = GPTConfig(n_layer=3, n_embd=16, n_head=2, n_px=4, vocab=9)
    m = ImageGPT(cfg, np.random.default_rng(0))
    x = np.random.default_rng(1).integers(0, 9, (5, 16))
    F, losses = extract_features(m, x, "ar", 2)
    assert F.shape == (5, 4, 16) and F.dtype == np.float32
    _, ns = m.forward_features(ar_inputs(x, cfg.sos))
    for l in range(4):  # float32 through batches of 2 against one of 5: BLAS may round another way
        np.testing.assert_allclose(F[:, l], ns[l].data.mean(axis=1), rtol=1e-5, atol=1e-6)
    # each image's AR loss from the same pass: their mean is the loss of the whole batch
    assert losses.shape == (5,) and losses.mean() == pytest.approx(ar_loss(m, x).item(), rel=1e-5)
    assert losses[3] == pytest.approx(ar_loss(m, x[3:4]).item(), rel=1e-5)
    Fb, bert_losses = extract_features(m, x, "bert", 64, mask_rate=0.15, n_masks=2)
    assert Fb.shape == F.shape and not np.allclose(Fb, F) and bert_losses.shape == (5,)


def test_probe_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    F, y = rng.standard_normal((20, 4)), rng.integers(0, 3, 20)
    params = rng.standard_normal(4 * 3 + 3)
    _, g = loss_and_grad(params, F, y, 3, 0.1)
    num = numeric_grad(lambda p: np.array(loss_and_grad(p, F, y, 3, 0.1)[0]), [params], 0, np.array(1.0))
    assert relative_error(g, num) < 1e-6
    lam = rng.uniform(0.01, 2.0, (4, 1))  # per-feature penalties, as in the rounded coordinates
    _, g = loss_and_grad(params, F, y, 3, lam)
    num = numeric_grad(lambda p: np.array(loss_and_grad(p, F, y, 3, lam)[0]), [params], 0, np.array(1.0))
    assert relative_error(g, num) < 1e-6


def test_lbfgs_reaches_the_optimum_on_a_separable_problem():
    rng = np.random.default_rng(0)
    centres = np.array([[10.0, 0, 0], [-10.0, 0, 0], [0, 10.0, 0]])  # far apart: separable
    y = rng.integers(0, 3, 300)
    F = centres[y] + rng.standard_normal((300, 3))
    probe = LogisticProbe(lam=1e-2).fit(F, y, 3)
    assert probe.accuracy(F, y) == 1.0
    X = (F - probe.mean) / probe.std
    params = np.concatenate([probe.W.ravel(), probe.b])
    J, g = loss_and_grad(params, X, y, 3, 1e-2)
    assert np.linalg.norm(g) < 1e-4  # first-order optimal; the objective is strictly convex in W
    tight = minimize(loss_and_grad, np.zeros_like(params), args=(X, y, 3, 1e-2), jac=True,
                     method="BFGS", options={"gtol": 1e-10, "maxiter": 5000})
    assert J == pytest.approx(tight.fun, abs=1e-7)
    # warm-started from another lambda's optimum (the grid's walk): the same optimum
    warm = LogisticProbe(lam=1e-2).fit(F, y, 3, start=LogisticProbe(lam=1.0).fit(F, y, 3).params)
    assert loss_and_grad(warm.params, X, y, 3, 1e-2)[0] == pytest.approx(tight.fun, abs=1e-7)


def test_fits_run_side_by_side_with_results_independent_of_the_thread_count():
    """fan_out runs a rank's fits on its threads at once, BLAS at one thread each: the same
    results, in order, whether the process has one thread or two."""
    from minigpt_img.parallel import Solo, fan_out
    from minigpt_img.threads import current_threads, set_threads
    rng = np.random.default_rng(3)
    F, y = rng.standard_normal((300, 20)), rng.integers(0, 4, 300)
    jobs = [lambda lam=lam: LogisticProbe(lam).fit(F, y, 4).W for lam in (1e-4, 1e-2, 1.0)]
    before = current_threads()
    try:
        set_threads(1)
        one = fan_out(jobs, Solo())
        set_threads(2)
        two = fan_out(jobs, Solo())
    finally:
        set_threads(before)
    assert len(one) == 3 and all(np.array_equal(a, b) for a, b in zip(one, two))
    assert not np.array_equal(one[0], one[2])  # in order: each job's own result


def test_low_data_subsets_are_balanced_and_seeded():
    y = np.repeat(np.arange(4), 30)
    a = balanced_subsets(y, 5, 3, seed=1)
    b = balanced_subsets(y, 5, 3, seed=1)
    assert len(a) == 3 and all(np.array_equal(u, v) for u, v in zip(a, b))
    assert all(np.bincount(y[idx]).tolist() == [5] * 4 for idx in a)
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a[0], balanced_subsets(y, 5, 1, seed=2)[0])
    with pytest.raises(ValueError, match="fewer than 31"):
        balanced_subsets(y, 31, 1, seed=0)


def test_probe_layer_picks_lambda_without_the_eval_split():
    """lambda is the grid value with the best held-out TRAINING accuracy: the same whatever the
    evaluation split holds, here its true labels or their opposites."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    F = y[:, None] * 3.0 + rng.standard_normal((300, 3))
    grid = (1e-3, 1e3)  # 1e3 shrinks W to ~0: chance on every split; 1e-3 fits
    r = probe_layer(F[:200], y[:200], F[200:], y[200:], 2, grid=grid)
    flipped = probe_layer(F[:200], y[:200], F[200:], 1 - y[200:], 2, grid=grid)
    assert r["lam"] == flipped["lam"] <= 1e-3 and r["holdout_acc"] == flipped["holdout_acc"] > 0.8
    assert r["eval_acc"] > 0.8 and flipped["eval_acc"] == pytest.approx(1 - r["eval_acc"])


# ---- on a tiny trained checkpoint ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    for split, n, seed in (("train", 16, 0), ("test", 5, 1)):
        write_image_folder(root / "imgs" / split, per_class=n, step=80, noise=30, seed=seed)
    cfg = resolve_config(dict(size="nano", res=8, data=str(root / "imgs"), palette_size=16, batch_size=4,
                              steps=8, eval_every=4, eval_images=8, out=str(root / "run"),
                              cache_dir=str(root / "cache"), samples=2, snapshots=True))
    Trainer(cfg, log=lambda *a: None).train()
    return root


def test_probe_script_writes_the_report(tiny_run):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "probe.py"), "--ckpt", str(tiny_run / "run" / "ckpt.npz"),
                        "--cache-dir", str(tiny_run / "cache"), "--labels-per-class", "2", "4", "--concat", "2"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads((tiny_run / "run" / "probe.json").read_text())
    assert [row["layer"] for row in report["layers"]] == [0, 1, 2]
    assert {"raw_pixels", "token_histogram", "random_init", "low_data"} <= set(report)
    assert report["loss"]["train"] > 0 and report["loss"]["eval"] > 0
    assert f"train {report['loss']['train']:.4f}, test {report['loss']['eval']:.4f}" in r.stdout
    assert report["eval_split"] == "test" and report["n_eval"] == 15
    assert [d["per_class"] for d in report["low_data"]] == [2, 4]
    best = report["best"]["layer"]
    assert best in report["concat"]["layers"] and len(report["concat"]["layers"]) == 2
    assert "concatenated" in r.stdout
    assert (tiny_run / "run" / "probe.png").is_file() and "best layer" in r.stdout
    assert "s per image:" in r.stdout and "for the features of" in r.stdout  # said before the features
    assert list((tiny_run / "cache" / "features").glob("trained-*.npy"))  # cached for the next probe


def test_concatenated_layers_centre_on_the_best_and_fit_inside():
    assert concat_layers(5, 5, 13) == [3, 4, 5, 6, 7]
    assert concat_layers(0, 5, 13) == [0, 1, 2, 3, 4] and concat_layers(12, 5, 13) == [8, 9, 10, 11, 12]
    assert concat_layers(2, 2, 3) == [1, 2] and concat_layers(1, 3, 3) == [0, 1, 2]


def test_a_concat_wider_than_the_model_is_refused_before_any_feature(tiny_run):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "probe.py"), "--ckpt", str(tiny_run / "run" / "ckpt.npz"),
                        "--cache-dir", str(tiny_run / "cache"), "--concat", "4"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2 and "--concat 4" in r.stderr and "layers 0..2" in r.stderr
    assert "Traceback" not in r.stderr and "features" not in r.stdout


def test_probe_without_a_test_set_reports_on_validation_and_says_so(tmp_path, tiny_run):
    """As fine-tuning does; and the report explains itself: how the layer was chosen, on how many
    images, each accuracy's standard error, and a warning when raw pixels beat the best layer."""
    import shutil
    shutil.copytree(tiny_run / "imgs" / "train", tmp_path / "flat")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "probe.py"), "--ckpt", str(tiny_run / "run" / "ckpt.npz"),
                        "--data", str(tmp_path / "flat"), "--cache-dir", str(tiny_run / "cache"),
                        "--out", str(tmp_path / "report")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "has no test split here: the accuracies are on its validation split" in r.stdout
    report = json.loads((tmp_path / "report" / "probe.json").read_text())
    assert report["eval_split"] == "val" and report["n_eval"] == 5 and report["n_holdout"] == 4
    assert "chosen on 4 held-out training images after fitting on 39, then refitted on all 43" in r.stdout
    assert "eval acc on 5 val images" in r.stdout and "+- " in r.stdout
    from minigpt_img.probe_report import format_report
    worse = {**report, "raw_pixels": {**report["raw_pixels"], "eval_acc": 1.01}}
    assert "warning: raw pixels" in format_report(worse) and "train it longer" in format_report(worse)
    better = {**report, "raw_pixels": {**report["raw_pixels"], "eval_acc": -0.01}}
    assert "warning" not in format_report(better)


def test_probe_along_the_run_pairs_accuracy_with_validation_loss(tiny_run, tmp_path):
    """§4.2: every snapshot of the run probed; each point carries its step and validation loss."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "probe.py"), "--along", str(tiny_run / "run" / "snapshots"),
                        "--cache-dir", str(tiny_run / "cache"), "--layers", "1", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    along = json.loads((tmp_path / "along.json").read_text())
    assert [p["step"] for p in along["points"]] == [4, 8]
    assert all(p["val_loss"] > 0 and 0 <= p["best"]["eval_acc"] <= 1 for p in along["points"])
    assert all(p["loss"] is None for p in along["points"])  # --layers 1: the passes stop below the logits
    assert (tmp_path / "along.png").is_file()
    empty = subprocess.run([sys.executable, str(REPO / "probe.py"), "--along", str(tmp_path)],
                           capture_output=True, text=True, env=env, timeout=600)
    assert empty.returncode == 2 and "--snapshots" in empty.stderr and "Traceback" not in empty.stderr


def test_finetuning_head_starts_at_zero_and_loss_is_the_sum(tiny_run, tmp_path):
    cfg = resolve_config({"finetune": str(tiny_run / "run" / "ckpt.npz"), "out": str(tmp_path / "ft"),
                          "steps": 6, "eval_every": 2}, resume=False)
    pre = json.loads(str(load_arrays(tiny_run / "run" / "ckpt.npz")["config"]))["meta"]["run"]
    assert cfg.lr == pytest.approx(pre["lr"] / 10) and cfg.size == "nano" and cfg.res == 8
    ft = Trainer(cfg, log=lambda *a: None)
    head = ft.task.heads["score"]
    assert np.all(head.weight.data == 0) and head.weight.shape == (32, 3)
    x, y, _ = ft.batch(0, 0)
    gen, clf_logits = ft.task.forward(ft.model, x, None)
    total = ft.task.loss(ft.model, x, y, None)
    assert total.item() == pytest.approx(gen.item() + ops.cross_entropy(clf_logits, y).item(), rel=1e-6)
    assert ops.cross_entropy(clf_logits, y).item() == pytest.approx(np.log(3), rel=1e-6)  # zero head
    assert ft.train() == "done"
    assert "L_GEN + L_CLF" in ft.chart()[0] and ft.chart()[2] == {}  # no pre-training unigram line
    assert (tmp_path / "ft" / "accuracy.png").is_file()
    summary = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert summary["eval_split"] == "test" and summary["n_eval"] == 15
    assert (tmp_path / "ft" / "best.npz").is_file()


def test_finetuning_stopped_by_its_time_budget_still_scores_the_best_checkpoint(tiny_run, tmp_path):
    cfg = resolve_config({"finetune": str(tiny_run / "run" / "ckpt.npz"), "out": str(tmp_path / "tb"),
                          "steps": 1000, "eval_every": 500, "time_budget": 1e-9}, resume=False)
    ft = Trainer(cfg, log=lambda *a: None)
    assert ft.train() == "time budget" and ft.step == 1  # stopped before its first evaluation
    summary = json.loads((tmp_path / "tb" / "finetune.json").read_text())
    assert summary["steps"] == 1 and summary["n_eval"] == 15
    assert (tmp_path / "tb" / "best.npz").is_file()


def test_finetuning_early_stops(tiny_run, tmp_path):
    cfg = resolve_config({"finetune": str(tiny_run / "run" / "ckpt.npz"), "out": str(tmp_path / "es"),
                          "steps": 1000, "eval_every": 1, "patience": 2, "lr": 1e-12}, resume=False)
    ft = Trainer(cfg, log=lambda *a: None)
    assert ft.train() == "done" and ft.step == 3  # accuracy never improves after the first eval


def test_finetuning_without_a_test_set_chooses_its_checkpoint_on_held_out_training_images(tiny_run, tmp_path):
    """The validation split gives the result when there is no test set, so it must choose nothing:
    early stopping scores a held-out slice of the training images, which fine-tuning does not train on."""
    import shutil
    from minigpt_img.data import cached_tokens, load_dataset
    shutil.copytree(tiny_run / "imgs" / "train", tmp_path / "flat")           # no test/ folder
    cfg = resolve_config({"finetune": str(tiny_run / "run" / "ckpt.npz"), "data": str(tmp_path / "flat"),
                          "out": str(tmp_path / "ft"), "steps": 4, "eval_every": 2}, resume=False)
    lines = []
    ft = Trainer(cfg, log=lines.append)
    ds = load_dataset(str(tmp_path / "flat"), res=8, seed=cfg.seed)          # 43 train / 5 val images
    assert ft.plan.eval_on == "held-out training" and len(ft.data.val_tokens) == ft.plan.n_eval == 4  # 10% of 43
    assert len(ft.data.train_tokens) == len(ft.data.ds.train) == 39
    np.testing.assert_array_equal(ft.data.val_tokens, cached_tokens(ds.train.images[39:], ft.data.palette,
                                                                     cfg.cache_dir))
    np.testing.assert_array_equal(ft.data.val_labels, ds.train.labels[39:])
    np.testing.assert_array_equal(ft.data.ds.val.labels, ds.val.labels)      # validation untouched
    assert any("39 train (4 more held out to choose the checkpoint on) / 5 val" in l for l in lines)
    assert ft.train() == "done"
    summary = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert summary["chosen_on"] == "held-out training"
    assert summary["eval_split"] == "validation" and summary["n_eval"] == 5


def test_finetuning_pools_the_layer_it_is_given(tiny_run, tmp_path):
    pre = str(tiny_run / "run" / "ckpt.npz")
    cfg = resolve_config({"finetune": pre, "out": str(tmp_path / "p1"), "steps": 2, "pool_layer": 1},
                         resume=False)
    ft = Trainer(cfg, log=lambda *a: None)
    head = ft.task.heads["score"]
    head.weight.data[...] = np.random.default_rng(0).standard_normal(head.weight.shape)
    x, _, _ = ft.batch(0, 0)
    _, logits = ft.task.forward(ft.model, x, None)
    feats = ft.model.forward_features(ar_inputs(x, ft.model.config.sos), True, None)[1]
    np.testing.assert_allclose(logits.data, feats[1].data.mean(axis=1) @ head.weight.data, rtol=1e-5, atol=1e-6)
    assert ft.train() == "done"
    assert json.loads((tmp_path / "p1" / "finetune.json").read_text())["pool_layer"] == [1]
    with pytest.raises(ConfigError, match="--pool-layer 3: nano has layers 0 to 2"):
        Trainer(resolve_config({"finetune": pre, "out": str(tmp_path / "p3"), "pool_layer": 3}, resume=False),
                log=lambda *a: None)
    assert not (tmp_path / "p3" / "ckpt.npz").exists()


def test_finetuning_pools_several_layers_side_by_side(tiny_run, tmp_path):
    cfg = resolve_config({"finetune": str(tiny_run / "run" / "ckpt.npz"), "out": str(tmp_path / "p02"),
                          "steps": 2, "pool_layer": [0, 2]}, resume=False)
    ft = Trainer(cfg, log=lambda *a: None)
    head = ft.task.heads["score"]
    assert head.weight.shape == (64, 3) and not hasattr(head, "bias")
    head.weight.data[...] = np.random.default_rng(0).standard_normal(head.weight.shape)
    x, _, _ = ft.batch(0, 0)
    _, logits = ft.task.forward(ft.model, x, None)
    feats = ft.model.forward_features(ar_inputs(x, ft.model.config.sos), True, None)[1]
    f = np.concatenate([feats[0].data.mean(axis=1), feats[2].data.mean(axis=1)], axis=1)   # (B, 2C)
    np.testing.assert_allclose(logits.data, f @ head.weight.data, rtol=1e-5, atol=1e-5)
    assert ft.train() == "done"
    for bad in ([1, 1], []):
        with pytest.raises(ConfigError, match="must name one or more different layers"):
            RunConfig(finetune="x", pool_layer=bad)


def test_finetuning_head_from_probe_starts_where_the_probe_is(tiny_run, tmp_path):
    """--head-from-probe: the classifier's logits at step 0 are the linear probe's on the pooled
    features of the training images (standardisation folded in), and the start is scored and kept."""
    pre = str(tiny_run / "run" / "ckpt.npz")
    lines = []
    cfg = resolve_config({"finetune": pre, "out": str(tmp_path / "lp"), "steps": 2, "pool_layer": [1, 2],
                          "head_from_probe": True, "cache_dir": str(tmp_path / "cache")}, resume=False)
    ft = Trainer(cfg, log=lines.append)
    start_from_probe(ft)
    tokens, labels = ft.data.train_tokens, ft.data.ds.train.labels
    F = side_by_side(extract_features(ft.model, tokens, "ar", 64)[0], [1, 2])                  # (N, 2C)
    probe = fit_probe(F, labels, 3, cfg.seed, one_se=True)[0]
    _, logits = ft.task.forward(ft.model, np.asarray(tokens, np.int64), None)
    standardised = ((F - probe.mean) / probe.std) @ probe.W + probe.b                       # (N, K)
    np.testing.assert_allclose(logits.data, standardised, rtol=1e-4, atol=1e-4)
    assert np.array_equal(logits.data.argmax(axis=1), probe.predict(F))
    assert any("classifier started from a linear probe on layers [1, 2]" in l for l in lines)
    assert any(l.startswith("step 0: accuracy") for l in lines)
    assert read_meta(tmp_path / "lp" / "best.npz")[1]["step"] == 0      # the start is the best so far
    assert list((tmp_path / "cache" / "features").glob("finetune-*.npy"))
    assert ft.train() == "done"
    assert json.loads((tmp_path / "lp" / "finetune.json").read_text())["head_from_probe"] is True
    # without the flag the head starts at zero, without a bias (the released iGPT's)
    plain = Trainer(resolve_config({"finetune": pre, "out": str(tmp_path / "zero")}, resume=False),
                    log=lambda *a: None)
    assert not hasattr(plain.task.heads["score"], "bias") and not plain.task.heads["score"].weight.data.any()


def test_the_one_standard_error_rule_takes_the_strongest_lambda_nearly_as_good():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    F = np.eye(3)[y] * 1.5 + rng.standard_normal((400, 3))     # overlapping classes: weights stay finite
    grid = (1e-4, 1e-2, 1.0, 100.0)
    _, best_lam, best_acc = fit_probe(F, y, 3, grid=grid)
    probe, lam, acc = fit_probe(F, y, 3, grid=grid, one_se=True)
    assert lam >= best_lam and acc >= best_acc - np.sqrt(best_acc * (1 - best_acc) / 40)
    assert lam == 1.0 and best_lam < 1.0  # here lambda 1 is within a standard error, 100 is not
    assert np.linalg.norm(probe.W) < np.linalg.norm(fit_probe(F, y, 3, grid=(best_lam,))[0].W)


def test_a_fine_tune_interrupted_after_an_evaluation_without_improvement_resumes_exactly(tiny_run, tmp_path):
    """The evaluations' decisions (the best score, the evaluations since it) are in the checkpoint:
    stopped by SIGINT right after an evaluation that did not improve, then resumed, a fine-tune
    stops early at the same step, with the same best.npz, final weights and finetune.json, as one
    never stopped; and its best checkpoint is scored on every test image."""
    import signal
    pre = str(tiny_run / "run" / "ckpt.npz")
    settings = {"finetune": pre, "steps": 1000, "eval_every": 1, "patience": 3, "lr": 1e-12}
    quiet = {"log": lambda *a: None}
    straight = Trainer(resolve_config({**settings, "out": str(tmp_path / "a")}), **quiet)
    assert straight.train() == "done" and straight.stop_reason == "early stop"

    def interrupt_after_a_worse_evaluation(run):
        if run.best["evals_since"] == 1 and run.stop_reason is None:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, caught by the run: save and stop
    first = Trainer(resolve_config({**settings, "out": str(tmp_path / "b")}), **quiet)
    assert first.train(on_step=interrupt_after_a_worse_evaluation) == "interrupted"
    assert first.step < straight.step and not (tmp_path / "b" / "finetune.json").exists()
    resumed = Trainer(resolve_config({"out": str(tmp_path / "b")}, resume=True), resume=True, **quiet)
    assert resumed.best["evals_since"] == 1
    assert resumed.train() == "done" and resumed.step == straight.step
    for name in ("ckpt.npz", "best.npz"):
        a, b = load_arrays(tmp_path / "a" / name), load_arrays(tmp_path / "b" / name)
        weights = [k for k in a if k.startswith(("model/", "head/"))]
        assert weights and all(np.array_equal(a[k], b[k]) for k in weights), name
    summary = json.loads((tmp_path / "a" / "finetune.json").read_text())
    assert summary == json.loads((tmp_path / "b" / "finetune.json").read_text())
    assert summary["n_eval"] == 15 and summary["eval_acc"] > 0  # scored after the early stop


def test_a_fine_tune_ended_by_its_time_budget_between_evaluations_resumes_exactly(tiny_run, tmp_path,
                                                                                    monkeypatch):
    """The time budget ends a fine-tune between evaluations, whose last weights then measure better
    than every evaluation: they are scored (finetune.json names ckpt.npz), but best.npz and the
    checkpoint's best stay as the scheduled evaluations left them, so the resumed run ends with the
    best.npz and finetune.json of one never stopped. Accuracies are scripted by step."""
    from minigpt_img.evaluation import Evaluation
    measure = Evaluation.measure
    scripted = {2: 0.5, 3: 0.9, 4: 0.4, 6: 0.45}

    def by_step(self, tokens, labels, batch_size=64, desc="evaluating"):
        m = measure(self, tokens, labels, batch_size, desc)
        return m if desc == "scoring" else {**m, "acc": scripted[self.step]}
    monkeypatch.setattr(Evaluation, "measure", by_step)
    settings = {"finetune": str(tiny_run / "run" / "ckpt.npz"), "steps": 6, "eval_every": 2, "patience": 10}
    quiet = {"log": lambda *a: None}
    straight = Trainer(resolve_config({**settings, "out": str(tmp_path / "a")}), **quiet)
    assert straight.train() == "done"

    def budget_ends_at_step_3(run):
        if run.step == 3:
            run.stop_reason = "time budget"
    first = Trainer(resolve_config({**settings, "out": str(tmp_path / "b")}), **quiet)
    assert first.train(on_step=budget_ends_at_step_3) == "time budget"
    stopped = json.loads((tmp_path / "b" / "finetune.json").read_text())
    assert (stopped["best_file"], stopped["best_step"], stopped["best_acc"]) == ("ckpt.npz", 3, 0.9)
    assert json.loads(str(load_arrays(tmp_path / "b" / "best.npz")["config"]))["meta"]["step"] == 2
    resumed = Trainer(resolve_config({"out": str(tmp_path / "b")}, resume=True), resume=True, **quiet)
    assert resumed.train() == "done"
    a, b = load_arrays(tmp_path / "a" / "best.npz"), load_arrays(tmp_path / "b" / "best.npz")
    assert all(np.array_equal(a[k], b[k]) for k in a if k.startswith(("model/", "head/")))
    summary = json.loads((tmp_path / "a" / "finetune.json").read_text())
    assert summary == json.loads((tmp_path / "b" / "finetune.json").read_text())
    assert (summary["best_file"], summary["best_step"], summary["best_acc"]) == ("best.npz", 2, 0.5)


def test_a_probe_whose_forward_passes_would_not_fit_is_refused_before_it_starts(tiny_run, monkeypatch):
    """With memory for the weights but not for 64 images' forward pass: one line naming the need and
    --batch-size, before any feature is extracted; a batch that fits goes on."""
    from minigpt_img import probe_report as pr
    from minigpt_img import sizes
    monkeypatch.setattr(sizes, "available_memory", lambda: 2 << 20)  # 2 MiB: the nano weights fit
    args = dict(ckpt=tiny_run / "run" / "ckpt.npz", data=None, data_dir=None, eval_split="test", layers=[1],
                max_train=20, max_eval=10, labels_per_class=(), bert_masks=1, seed=0, baselines=False,
                cache_dir=tiny_run / "cache", log=lambda *a: None)
    with pytest.raises(ValueError, match=r"64 images at once needs about .* lower --batch-size"):
        pr.probe_report(batch_size=64, **args)
    assert pr.probe_report(batch_size=4, **args)["best"]["layer"] == 1


def test_the_lambda_grid_extends_past_an_end_that_wins():
    """When the weakest lambda of the grid scores best on the held-out images, weaker ones are tried
    (up to probe_fit.EXTEND more), so the choice is not the grid's edge by construction."""
    from minigpt_img import probe_fit
    rng = np.random.default_rng(0)
    y = rng.choice(3, 600, p=[0.6, 0.25, 0.15])   # unbalanced: a strong penalty predicts the majority
    F = np.eye(3)[y] * 2.0 + rng.standard_normal((600, 3))
    tried = []
    fit = probe_fit.LogisticProbe.fit

    def spy(self, *a, **kw):
        tried.append(self.lam)
        return fit(self, *a, **kw)
    probe_fit.LogisticProbe.fit = spy
    try:
        _, lam, _ = fit_probe(F, y, 3, grid=(1.0, 10.0))   # 1 beats 10: weaker ones are tried
    finally:
        probe_fit.LogisticProbe.fit = fit
    assert min(tried) < 1.0 and lam <= 1.0
    assert len(set(tried)) <= 2 + probe_fit.EXTEND


def test_a_batch_goes_through_forward_passes_of_at_most_images_per_pass(monkeypatch):
    """A batch larger than sizes.images_per_pass goes through the model in groups of that many
    images, with the features and losses of a single pass: the same masks for BERT, drawn per batch."""
    from minigpt_img import sizes
    assert sizes.images_per_pass(sizes.config_for("s", 32)) == 16 < 64       # probe.py's default batch
    cfg = GPTConfig(n_layer=2, n_embd=16, n_head=2, n_px=4, vocab=9)
    m = ImageGPT(cfg, np.random.default_rng(0))
    x = np.random.default_rng(1).integers(0, 9, (7, 16))
    whole = {obj: extract_features(m, x, obj, 5, mask_rate=0.25) for obj in ("ar", "bert")}
    seen = []
    forward = m.forward_features
    m.forward_features = lambda inputs, *a, **kw: seen.append(len(inputs)) or forward(inputs, *a, **kw)
    monkeypatch.setattr(sizes, "PASS_BYTES", 2 * 4 * cfg.n_ctx * 4 * cfg.n_embd)  # two images per pass
    assert sizes.images_per_pass(cfg) == 2
    for obj in ("ar", "bert"):
        seen.clear()
        F, losses = extract_features(m, x, obj, 5, mask_rate=0.25)
        assert seen == [2, 2, 1, 2]                             # batches of 5 and 2 images
        np.testing.assert_allclose(F, whole[obj][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(losses, whole[obj][1], rtol=1e-5)


def test_the_forward_pass_stops_at_the_deepest_layer_asked_for():
    """forward_features(upto=k) runs the blocks below k only: n^0..n^k as the full pass has them,
    no logits; extract_features(upto=k) returns those features and no losses."""
    cfg = GPTConfig(n_layer=4, n_embd=16, n_head=2, n_px=4, vocab=9)
    m = ImageGPT(cfg, np.random.default_rng(0))
    for p in m.parameters():
        p.data = (p.data + np.random.default_rng(1).standard_normal(p.shape) * 0.1).astype(np.float32)
    x = np.random.default_rng(2).integers(0, 9, (3, 16))
    _, full = m.forward_features(ar_inputs(x, cfg.sos))
    calls = []
    blocks = m.transformer.h
    for i, b in enumerate(blocks):
        forward = b.forward
        b.forward = lambda *a, i=i, f=forward: calls.append(i) or f(*a)
    logits, part = m.forward_features(ar_inputs(x, cfg.sos), upto=2)
    assert logits is None and len(part) == 3 and calls == [0, 1]
    for a, b in zip(part, full):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-6, atol=1e-7)
    F, losses = extract_features(m, x, "ar", 2, upto=2)
    F_full, _ = extract_features(m, x, "ar", 2)
    assert losses is None and F.shape == (3, 3, 16)
    np.testing.assert_allclose(F, F_full[:, :3], rtol=1e-6, atol=1e-7)
