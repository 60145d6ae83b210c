"""Benchmarks, measured as ratios within one run (this machine is shared and noisy).

    python benchmarks/bench.py                      # every case
    python benchmarks/bench.py --cases train        # a subset: train forward profile contention sampling
                                                    # attention palette data_parallel
    python benchmarks/bench.py --compare-torch      # also PyTorch on the same model (if installed)
    python benchmarks/bench.py --json out.json      # also write the results

train / forward: a training step (forward, backward, Adam) or a forward pass of micro@16 batch 16,
mini@32 batch 4 and s@32 batch 1 (forward: also s@32 batch 8), on random tokens. Per case: the
median time over the timed steps after three warm-up steps, tokens/s, model FLOP/s (matmuls and
attention; x3 for a training step) and its fraction of the fp32 GEMM peak measured in the same run,
and peak memory (RSS of a child process doing the same). With --compare-torch the same model in
PyTorch (benchmarks/torch_ref.py: iGPT norm, gelu2, SDPA, AdamW) is timed alternately with ours:
printed are the ratio of the medians ours/PyTorch and the range of the per-pair ratios (each of our
steps over the PyTorch step timed right after it), which shows how far the machine moved in the run.

sampling: tokens per second generating 16 images at 32x32 with the KV cache (micro and mini), and
at iGPT-S size against transformers' generate on the same weights, also from a plain script
(benchmarks/hf_compare.py). forward also runs the forward pass of 8 images at iGPT-S size against
transformers there.

attention: multi-head causal attention forward+backward, T=1024, 8 heads, head size 32, batch 4, the
numba flash kernel against the materialised NumPy reference (the same float32 math with the whole
(T, T) matrix per head) and, with --compare-torch, PyTorch's scaled_dot_product_attention, there
and at the attention shapes of the three training cases (kernel and SDPA only). Times are
medians over repeats, taken alternately; peak memory is each variant's rise in peak RSS over its own
baseline, measured in a fresh child process.

profile: where a training step's time goes, op by op, beside each op's FLOP-bound limit
(benchmarks/step_profile.py).

contention: micro@16 batch 16 alone, beside a busy single-threaded process and beside a second job of
the same kind, ours (with train.py's FairShare, and with fixed threads) and PyTorch eager
(benchmarks/contention.py).

data_parallel: micro@16 batch 16 through train.py's Trainer, 1 process x 2 threads against
`mpiexec -n 2` ranks x 1 thread (benchmarks/data_parallel.py): tokens/s and the share of a step spent
averaging gradients (the Allreduce). Needs the [mpi] extra.

palette: exact nearest-colour lookup with 512 colours (k-means on the data), in Mpixel/s, against
scipy.cluster.vq.vq in the same run: the grid kernel alone, the 2^24-colour table's build time, the
table lookup, and quantising 50,000 32x32 images from scratch (table build included). Pixels come
from --data (default shapes; `--data cifar10 --data-dir ../shared/data` for real photographs).
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from minigpt_img.threads import configure  # noqa: E402  (imports nothing heavy)

_pre = argparse.ArgumentParser(add_help=False)
_pre.add_argument("--threads", type=int, default=None)
configure(_pre.parse_known_args()[0].threads)  # before NumPy loads its BLAS

import numpy as np  # noqa: E402

from minigpt_img import attention  # noqa: E402


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM (Linux) starts afresh with each exec'd process;
    getrusage's ru_maxrss would carry over the parent's peak."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- attention -------------------------------------------------------------------------------
ATTN = dict(B=4, NH=8, T=1024, D=32)
ATTN_VARIANTS = {
    "kernel": (attention.attention_forward, attention.attention_backward),
    "reference": (attention.attention_forward_ref, attention.attention_backward_ref),
}


def attention_inputs(B, NH, T, D, seed=0):
    """q, k, v as views of one fused qkv (B, T, 3C), as the model passes them, and dO."""
    rng = np.random.default_rng(seed)
    q, k, v = attention.heads(rng.standard_normal((B, T, 3 * NH * D), dtype=np.float32), NH)
    return [q, k, v, rng.standard_normal((B, T, NH, D), dtype=np.float32)]


def attention_step(variant, q, k, v, do):
    fwd, bwd = ATTN_VARIANTS[variant]
    D, T = q.shape[-1], q.shape[1]
    kernel = variant == "kernel"                                           # tiles as ops.Attention passes them
    o, lse = fwd(q, k, v, True, 0, *(attention.forward_tiles(D, T) if kernel else ()))
    bwd(q, k, v, o, lse, do, True, 0, *(attention.tiles(D) if kernel else ()))


def torch_attention_step(q, k, v, do):
    """PyTorch's fused attention (scaled_dot_product_attention, causal: its flash kernel on a CPU)
    forward + backward on the same numbers, as a function of no arguments."""
    import torch
    import torch.nn.functional as F
    tq, tk, tv, tdo = (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))) for x in (q, k, v, do))
    for t in (tq, tk, tv):
        t.requires_grad_()

    def step():
        for t in (tq, tk, tv):
            t.grad = None
        F.scaled_dot_product_attention(tq, tk, tv, is_causal=True).backward(tdo)
    return step


def attention_steps(variants, inputs) -> dict:
    return {v: (torch_attention_step(*inputs) if v == "torch" else functools.partial(attention_step, v, *inputs))
            for v in variants}


def attention_memory_child(variant: str) -> None:
    """Run in a child process: print the peak-RSS rise of one forward+backward."""
    attention_steps([variant], attention_inputs(1, 1, 65, 32))[variant]()  # load the compiled kernels
    step = attention_steps([variant], attention_inputs(**ATTN))[variant]
    base = peak_rss_mb()
    step()
    print(json.dumps({"peak_rise_mb": peak_rss_mb() - base}))


def bench_attention(repeats: int, compare_torch: bool) -> dict:
    variants = list(ATTN_VARIANTS) + (["torch"] if compare_torch else [])
    steps = attention_steps(variants, attention_inputs(**ATTN))
    for step in steps.values():  # warm-up (compilation, caches)
        step()
    times = _alternately(steps, repeats)
    result = {"shape": ATTN}
    for variant in variants:
        out = subprocess.run([sys.executable, __file__, "--memory-child", variant],
                             capture_output=True, text=True, check=True)
        result[variant] = {"fwd_bwd_s": float(np.median(times[variant])),
                           **json.loads(out.stdout.strip().splitlines()[-1])}
    result["speedup"] = result["reference"]["fwd_bwd_s"] / result["kernel"]["fwd_bwd_s"]
    result["memory_ratio"] = result["kernel"]["peak_rise_mb"] / result["reference"]["peak_rise_mb"]
    s = ATTN
    print(f"attention fwd+bwd  B={s['B']} NH={s['NH']} T={s['T']} D={s['D']} causal float32")
    for variant in variants:
        r = result[variant]
        print(f"  {variant:<10} {r['fwd_bwd_s'] * 1e3:8.1f} ms   peak +{r['peak_rise_mb']:7.1f} MB")
    print(f"  kernel is {result['speedup']:.1f}x faster, "
          f"uses {result['memory_ratio']:.2f}x the reference's memory")
    if compare_torch:
        result["ratio_ours_over_torch"] = result["kernel"]["fwd_bwd_s"] / result["torch"]["fwd_bwd_s"]
        print(f"  kernel / PyTorch's scaled_dot_product_attention: {result['ratio_ours_over_torch']:.2f}")
        result["training_shapes"] = attention_at_training_shapes(repeats)
    return result


def attention_at_training_shapes(repeats: int) -> dict:
    """The kernel against PyTorch's SDPA, forward + backward, at the attention shapes of the
    training cases (MODEL_CASES), alternately; medians."""
    from minigpt_img.sizes import config_for
    results = {}
    for size, res, batch in MODEL_CASES:
        cfg = config_for(size, res)
        shape = dict(B=batch, NH=cfg.n_head, T=cfg.n_ctx, D=cfg.n_embd // cfg.n_head)
        steps = attention_steps(["kernel", "torch"], attention_inputs(**shape))
        for step in steps.values():
            step()
        times = _alternately(steps, max(repeats, 5))
        t = {v: float(np.median(ts)) for v, ts in times.items()}
        results[f"{size}@{res}_b{batch}"] = {"shape": shape, **{f"{v}_fwd_bwd_s": x for v, x in t.items()},
                                             "ratio_ours_over_torch": t["kernel"] / t["torch"]}
        print(f"  at {size}@{res} b{batch}'s shape (B={batch} NH={shape['NH']} T={shape['T']} D={shape['D']}): "
              f"kernel {t['kernel'] * 1e3:.1f} ms, SDPA {t['torch'] * 1e3:.1f} ms, "
              f"ratio {t['kernel'] / t['torch']:.2f}")
    return results


# ---- palette lookup ----------------------------------------------------------------------------
def bench_palette(repeats: int, data: str = "shapes", data_dir: str = "data") -> dict:
    from scipy.cluster.vq import vq

    from minigpt_img.data import load_dataset
    from minigpt_img.palette import Palette, fit_palette, to_unit

    ds = load_dataset(data, data_dir, res=32, procedural_size=10000)
    images = ds.train.images
    images = np.concatenate([images] * -(-50000 // len(images)))[:50000]      # 51.2M pixels
    centers = fit_palette(ds.train.images, k=512, seed=0)
    pixels = images.reshape(-1, 3)
    sub = pixels[:200_000]

    def best(fn):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    Palette(centers).nearest(sub[:10])                                         # compile / load
    t_vq = best(lambda: vq(to_unit(sub).astype(np.float32), centers))
    t_grid = best(lambda: Palette(centers).nearest(pixels[:5_000_000]))
    t_build = best(lambda: Palette(centers).table())
    pal = Palette(centers)
    pal.table()
    t_table = best(lambda: pal.encode(images))
    t_cold = best(lambda: Palette(centers).encode(images))
    mpx = {"scipy_vq": len(sub) / t_vq / 1e6, "grid_kernel": 5.0 / t_grid,
           "table_lookup": len(pixels) / t_table / 1e6, "cold_50k_images": len(pixels) / t_cold / 1e6}
    result = {"data": data, "mpixel_per_s": mpx, "table_build_s": t_build,
              "quantise_50k_images_s": t_cold,
              "ratio_to_vq": {k: v / mpx["scipy_vq"] for k, v in mpx.items() if k != "scipy_vq"}}
    print(f"palette lookup, 512 colours, pixels from {data}")
    for k, v in mpx.items():
        ratio = "" if k == "scipy_vq" else f"  {v / mpx['scipy_vq']:7.1f}x vq"
        print(f"  {k:<16} {v:8.2f} Mpixel/s{ratio}")
    print(f"  table build {t_build:.2f} s; 50,000 32x32 images quantised from scratch in {t_cold:.2f} s")
    return result


# ---- whole-model steps ------------------------------------------------------------------------
MODEL_CASES = [("micro", 16, 16), ("mini", 32, 4), ("s", 32, 1)]
FORWARD_CASES = MODEL_CASES + [("s", 32, 8)]  # and a probe's batch at iGPT-S size


class OursStep:
    """Ours with the same interface as torch_ref.TorchStep. A training step goes through the code
    path train.py runs: Trainer.optimizer_step (batch assembly, augmentation, forward, backward,
    clipping, Adam) on the built-in shapes data at the case's resolution."""

    def __init__(self, cfg, batch, seed=0, size="micro", kind="train"):
        from bench_trainer import bench_trainer

        from minigpt_img.model import ImageGPT
        self.x = np.random.default_rng(seed).integers(0, cfg.vocab, (batch, cfg.n_ctx))
        if kind != "train":
            self.model = ImageGPT(cfg, np.random.default_rng(seed))
            return
        self.trainer = bench_trainer(size, cfg.n_px, batch, seed=seed)
        self.model = self.trainer.model
        assert self.model.config == cfg, f"ours {self.model.config} differs from the case's {cfg}"

    def train_step(self):
        self.trainer.optimizer_step(3e-4)

    def forward(self):
        from minigpt_img import no_grad
        from minigpt_img.objectives import ar_inputs
        with no_grad():
            self.model(ar_inputs(self.x, self.model.config.sos))


def model_flops(cfg, batch: int, train: bool) -> float:
    """Matmul and attention FLOPs of one forward pass (x3 with backward): 2 per multiply-add."""
    L, C, V, T = cfg.n_layer, cfg.n_embd, cfg.vocab, cfg.n_ctx
    tokens = batch * T
    fwd = 2 * tokens * (12 * L * C * C + C * V) + 2 * batch * L * T * T * C  # causal QK^T and PV
    return 3 * fwd if train else fwd


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _alternately(fns: dict, repeats: int) -> dict:
    """{name: [seconds of each round]}: repeats rounds, each calling every function of fns in turn,
    so that the machine's changes of speed hit all of them alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    return times


def _make_step(impl, cfg, batch, threads, size="micro", kind="train"):
    if impl == "ours":
        return OursStep(cfg, batch, size=size, kind=kind)
    from torch_ref import TorchStep
    return TorchStep(cfg, batch, threads, compile=impl == "torch.compile")


def torch_impls() -> list:
    """PyTorch eager, and torch.compile where a C compiler is there for it."""
    import shutil
    return ["torch"] + (["torch.compile"] if shutil.which("cc") or shutil.which("gcc") else [])


def model_memory_child(spec: str) -> None:
    """Child process: peak-RSS rise of one case, spec = kind:size:res:batch:impl."""
    from minigpt_img.sizes import config_for
    kind, size, res, batch, impl = spec.split(":")
    step = _make_step(impl, config_for(size, int(res)), int(batch), _threads(), size, kind)
    fn = step.train_step if kind == "train" else step.forward
    base = peak_rss_mb()
    fn()
    fn()
    print(json.dumps({"peak_rise_mb": peak_rss_mb() - base, "peak_mb": peak_rss_mb()}))


def _threads() -> int:
    import numba
    return numba.get_num_threads()


def bench_model(kind: str, repeats: int, compare_torch: bool, peak: float) -> dict:
    from minigpt_img.sizes import config_for
    impls = ["ours"] + (torch_impls() if compare_torch else [])
    results = {}
    print(f"{kind} ({'forward, backward, Adam' if kind == 'train' else 'forward only'}), "
          f"fp32 GEMM peak {peak:.0f} GFLOP/s, {_threads()} threads")
    for size, res, batch in (MODEL_CASES if kind == "train" else FORWARD_CASES):
        cfg = config_for(size, res)
        steps = {impl: _make_step(impl, cfg, batch, _threads(), size, kind) for impl in impls}
        fns = {impl: (st.train_step if kind == "train" else st.forward) for impl, st in steps.items()}
        for fn in fns.values():
            for _ in range(3):  # warm-up (torch.compile compiles here)
                fn()
        times = _alternately(fns, max(repeats, 5))
        del steps, fns
        case = {}
        flops = model_flops(cfg, batch, kind == "train")
        for impl in impls:
            t = float(np.median(times[impl]))
            out = subprocess.run([sys.executable, __file__, "--memory-child",
                                  f"{kind}:{size}:{res}:{batch}:{impl}"],
                                 capture_output=True, text=True, check=True)
            mem = json.loads(out.stdout.strip().splitlines()[-1])
            case[impl] = {"step_s": t, "tokens_per_s": batch * cfg.n_ctx / t,
                          "gflops": flops / t / 1e9, "peak_fraction": flops / t / 1e9 / peak,
                          "peak_rss_mb": mem["peak_mb"]}
        line = (f"  {size}@{res} b{batch}: ours {case['ours']['step_s'] * 1e3:8.1f} ms, "
                f"{case['ours']['tokens_per_s']:9,.0f} tok/s, {case['ours']['gflops']:6.1f} GFLOP/s "
                f"({case['ours']['peak_fraction']:.0%} of peak), peak RSS {case['ours']['peak_rss_mb']:,.0f} MB")
        for impl in impls[1:]:
            case[f"ratio_ours_over_{impl}"] = case["ours"]["step_s"] / case[impl]["step_s"]
            pairs = np.array(times["ours"]) / np.array(times[impl])  # each of ours over the run after it
            case[f"pair_ratios_ours_over_{impl}"] = pairs.tolist()
            line += (f" | {impl} {case[impl]['step_s'] * 1e3:8.1f} ms, peak RSS "
                     f"{case[impl]['peak_rss_mb']:,.0f} MB, ours/{impl} {case[f'ratio_ours_over_{impl}']:.2f}"
                     f" (pairs {pairs.min():.2f}-{pairs.max():.2f})")
        print(line)
        results[f"{size}@{res}_b{batch}"] = case
    return results


def bench_sampling(repeats: int) -> dict:
    from minigpt_img.model import ImageGPT
    from minigpt_img.sampling import generate
    from minigpt_img.sizes import config_for
    results = {}
    print("sampling with the KV cache, 16 images")
    for size, res in (("micro", 32), ("mini", 32)):
        cfg = config_for(size, res)
        model = ImageGPT(cfg, np.random.default_rng(0))
        generate(model, 2, np.random.default_rng(0))  # warm-up
        t = min(_timed(lambda: generate(model, 16, np.random.default_rng(1))) for _ in range(max(1, repeats // 3)))
        results[f"{size}@{res}"] = {"seconds_16_images": t, "tokens_per_s": 16 * cfg.n_ctx / t}
        print(f"  {size}@{res}: 16 images in {t:.1f} s, {16 * cfg.n_ctx / t:,.0f} tokens/s")
    results.update(against_transformers("sampling", repeats))
    return results


def against_transformers(task: str, repeats: int) -> dict:
    """benchmarks/hf_compare.py at iGPT-S size, when torch and transformers are installed."""
    if not all(importlib.util.find_spec(m) for m in ("torch", "transformers")):
        print(f"  {task} against transformers: skipped (pip install torch==2.13.0 transformers, never a dependency)")
        return {}
    from hf_compare import bench
    return {"igpt_s_against_transformers": bench(task, max(1, repeats // 2), _threads())}


def bench_data_parallel(repeats: int) -> dict:
    """micro@16 batch 16 through the Trainer: 1 process x 2 threads against 2 MPI ranks x 1 thread
    (benchmarks/data_parallel.py), alternately, medians; needs the [mpi] extra."""
    import shutil
    script = str(Path(__file__).resolve().parent / "data_parallel.py")
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        print("data_parallel: skipped (no mpiexec: pip install -e '.[mpi]')")
        return {}
    commands = {"1 process x 2 threads": [sys.executable, script, "--threads", "2"],
                "2 ranks x 1 thread": [mpiexec, "--allow-run-as-root", "--oversubscribe", "-n", "2",
                                       sys.executable, script, "--threads", "1"]}
    runs = {name: [] for name in commands}
    for _ in range(max(1, repeats // 2)):
        for name, command in commands.items():
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            line = next(l for l in out.splitlines()[::-1] if l.startswith("{"))  # mpiexec adds escapes
            runs[name].append(json.loads(line))
    results = {}
    print("data-parallel training, micro@16 batch 16 (global), through the Trainer")
    for name, rs in runs.items():
        tok = float(np.median([r["tokens_per_s"] for r in rs]))
        share = float(np.median([r["allreduce_share"] for r in rs]))
        results[name] = {"tokens_per_s": tok, "allreduce_share": share}
        print(f"  {name}: {tok:,.0f} tokens/s, {share:.1%} of a step in the gradient Allreduce")
    return results


def bench_profile(peak: float) -> dict:
    """Per-op profile of a training step through the Trainer (benchmarks/step_profile.py)."""
    from step_profile import print_profile, profile_step
    results = {}
    print(f"where a training step's time goes (fp32 GEMM peak {peak:.0f} GFLOP/s, {_threads()} threads)")
    for size, res, batch in MODEL_CASES:
        results[f"{size}@{res}_b{batch}"] = p = profile_step(size, res, batch, peak)
        print_profile(f"{size}@{res} b{batch}", p)
    return results


def bench_contention(seconds: float, threads: int, compare_torch: bool) -> dict:
    """A shared CPU (benchmarks/contention.py)."""
    from contention import bench_contention as run
    return run(seconds, threads, compare_torch)


CASES = {  # name -> function of (arguments, fp32 GEMM peak)
    "train": lambda a, peak: bench_model("train", a.repeats, a.compare_torch, peak),
    "forward": lambda a, peak: {**bench_model("forward", a.repeats, a.compare_torch, peak),
                                **against_transformers("forward", a.repeats)},
    "sampling": lambda a, peak: bench_sampling(a.repeats),
    "attention": lambda a, peak: bench_attention(a.repeats, a.compare_torch),
    "palette": lambda a, peak: bench_palette(a.repeats, a.data, a.data_dir),
    "data_parallel": lambda a, peak: bench_data_parallel(a.repeats),
    "profile": lambda a, peak: bench_profile(peak),
    "contention": lambda a, peak: bench_contention(40.0, _threads(), a.compare_torch),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per case (default 5)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--compare-torch", action="store_true", help="also time PyTorch on the same model")
    ap.add_argument("--threads", type=int, default=None, help="threads for numba and BLAS (default: all)")
    ap.add_argument("--data", default="shapes", help="pixel source for the palette case (default shapes)")
    ap.add_argument("--data-dir", default="data", help="folder holding --data's files (default data)")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        if args.memory_child.count(":") == 4:
            model_memory_child(args.memory_child)
        else:
            attention_memory_child(args.memory_child)
        return
    if args.compare_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            sys.exit("--compare-torch needs PyTorch: pip install torch==2.13.0 (never a dependency)")
    import numba
    results = {"machine": {"cpu": platform.processor() or platform.machine(),
                           "threads": numba.get_num_threads(), "python": platform.python_version(),
                           "numpy": np.__version__, "numba": numba.__version__,
                           "date": time.strftime("%Y-%m-%d")}}
    peak = matmul_peak_gflops() if {"train", "forward", "profile"} & set(args.cases) else None
    results["machine"]["fp32_gemm_peak_gflops"] = peak
    for name in args.cases:
        results[name] = CASES[name](args, peak)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
