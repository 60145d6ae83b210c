"""Benchmarks, measured as ratios within one run (this machine is shared and noisy).

    python benchmarks/bench.py                      # every case
    python benchmarks/bench.py --cases attention    # a subset
    python benchmarks/bench.py --json out.json      # also write the results

attention: multi-head causal attention forward+backward, T=1024, 8 heads, head size 32, batch 4, the
numba flash kernel against the materialised NumPy reference (the same float32 math with the whole
(T, T) matrix per head). Times are medians over repeats, taken alternately; peak memory is each
variant's rise in peak RSS over its own baseline, measured in a fresh child process.

palette: exact nearest-colour lookup with 512 colours (k-means on the data), in Mpixel/s, against
scipy.cluster.vq.vq in the same run: the grid kernel alone, the 2^24-colour table's build time, the
table lookup, and quantising 50,000 32x32 images from scratch (table build included). Pixels come
from --data (default shapes; `--data cifar10 --data-dir ../shared/data` for real photographs).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((B * NH, T, D), dtype=np.float32) for _ in range(4)]


def attention_step(variant, q, k, v, do):
    fwd, bwd = ATTN_VARIANTS[variant]
    o, lse = fwd(q, k, v, True, 0)
    bwd(q, k, v, o, lse, do, True, 0)


def attention_memory_child(variant: str) -> None:
    """Run in a child process: print the peak-RSS rise of one forward+backward."""
    attention_step(variant, *attention_inputs(1, 1, 65, 32))  # load the compiled kernels
    inputs = attention_inputs(**ATTN)
    base = peak_rss_mb()
    attention_step(variant, *inputs)
    print(json.dumps({"peak_rise_mb": peak_rss_mb() - base}))


def bench_attention(repeats: int) -> dict:
    inputs = attention_inputs(**ATTN)
    for variant in ATTN_VARIANTS:  # warm-up (compilation, caches)
        attention_step(variant, *inputs)
    times = {v: [] for v in ATTN_VARIANTS}
    for _ in range(repeats):
        for variant in ATTN_VARIANTS:  # alternate, so load changes hit both alike
            t = time.perf_counter()
            attention_step(variant, *inputs)
            times[variant].append(time.perf_counter() - t)
    result = {"shape": ATTN}
    for variant in ATTN_VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--memory-child", variant],
                             capture_output=True, text=True, check=True)
        result[variant] = {"fwd_bwd_s": float(np.median(times[variant])),
                           **json.loads(out.stdout.strip().splitlines()[-1])}
    result["speedup"] = result["reference"]["fwd_bwd_s"] / result["kernel"]["fwd_bwd_s"]
    result["memory_ratio"] = result["kernel"]["peak_rise_mb"] / result["reference"]["peak_rise_mb"]
    s = ATTN
    print(f"attention fwd+bwd  B={s['B']} NH={s['NH']} T={s['T']} D={s['D']} causal float32")
    for variant in ATTN_VARIANTS:
        r = result[variant]
        print(f"  {variant:<10} {r['fwd_bwd_s'] * 1e3:8.1f} ms   peak +{r['peak_rise_mb']:7.1f} MB")
    print(f"  kernel is {result['speedup']:.1f}x faster, "
          f"uses {result['memory_ratio']:.2f}x the reference's memory")
    return result


# ---- palette lookup ----------------------------------------------------------------------------
def bench_palette(repeats: int, data: str = "shapes", data_dir: str = "data") -> dict:
    from scipy.cluster.vq import vq

    from minigpt_img.data import load_dataset
    from minigpt_img.palette import Palette, fit_palette, to_unit

    ds = load_dataset(data, data_dir, res=32, shapes_size=10000)
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


CASES = {"attention": bench_attention, "palette": bench_palette}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per case (default 5)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--data", default="shapes", help="pixel source for the palette case (default shapes)")
    ap.add_argument("--data-dir", default="data", help="folder holding --data's files (default data)")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        attention_memory_child(args.memory_child)
        return
    import numba
    results = {"machine": {"cpu": platform.processor() or platform.machine(),
                           "threads": numba.get_num_threads(), "python": platform.python_version(),
                           "numpy": np.__version__, "numba": numba.__version__,
                           "date": time.strftime("%Y-%m-%d")}}
    for name in args.cases:
        extra = {"data": args.data, "data_dir": args.data_dir} if name == "palette" else {}
        results[name] = CASES[name](args.repeats, **extra)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
