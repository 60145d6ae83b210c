"""Ours against Hugging Face's `transformers` at iGPT-S size (24 layers, width 512, 8 heads) at 32x32,
on the same random weights (exported once with `convert.py`'s export, so transformers loads the very
same numbers): the forward pass of a probe, and sampling, the paper's Figure 1 task.

    python benchmarks/bench.py --cases forward sampling    # each alternately in child processes, medians
    python benchmarks/hf_compare.py --task sampling --impl ours   # one run, one JSON line

forward: 8 images (SOS and 1,023 pixels each) through the whole model, no gradients: ours as probe.py
runs it (features.extract_features), transformers' ImageGPTForCausalImageModeling under
torch.inference_mode. Seconds per pass, the median of 3 after one that warms up.

sampling: a prompt of SOS and 512 pixels for 4 images, then `--steps` pixels (256 by default) drawn
from the full softmax. The same call drawing 1 pixel is timed too, and tokens/s is images x (steps
- 1) over the difference: the decoding steps alone, without the prompt's pass, for both.

    ours          the package's own functions (model.decode, KVCache, sampling.choose) from a
                  script that called threads.configure() first, as the scripts do (sampling:
                  configure(decoding=True), as sample.py does; forward: configure(), as probe.py)
    ours, plain   the same from a plain script that imported NumPy first and set nothing: what a
                  library user runs (the environment's thread-spin variables removed)
    transformers  ImageGPTForCausalImageModeling.generate(do_sample=True, top_k=0, use_cache=True)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CFG = dict(n_layer=24, n_embd=512, n_head=8, n_px=32, vocab=512)   # iGPT-S at 32x32
IMAGES, PROMPT, FORWARD_BATCH = 4, 512, 8
IMPLS = {task: ("ours", "ours, plain", "transformers") for task in ("sampling", "forward")}


def export(folder: Path) -> Path:
    """The random iGPT-S-shaped model as a Hugging Face folder with a random 512-colour palette
    (written once, then reused; sample.py and probe.py take it as they take a released model)."""
    import numpy as np

    from minigpt_img.checkpoint import export_hf
    from minigpt_img.model import GPTConfig, ImageGPT
    if not (folder / "preprocessor_config.json").is_file():
        model = ImageGPT(GPTConfig(**CFG), np.random.default_rng(0))
        head = model.lm_head.weight
        head.data = np.random.default_rng(1).standard_normal(head.shape).astype(np.float32) * 0.02
        export_hf(model, folder, np.random.default_rng(2).uniform(-1, 1, (CFG["vocab"], 3)).astype(np.float32))
    return folder


def prompt_tokens():
    import numpy as np
    x = np.random.default_rng(2).integers(0, CFG["vocab"], (IMAGES, PROMPT))
    return np.concatenate([np.full((IMAGES, 1), CFG["vocab"]), x], axis=1)  # SOS first


def run_ours(folder: Path, steps: int) -> float:
    import numpy as np

    from minigpt_img.checkpoint import load_hf
    from minigpt_img.model import KVCache
    from minigpt_img.sampling import choose
    model, _ = load_hf(folder)
    x = prompt_tokens()
    rng = np.random.default_rng(3)

    def draw(n):
        cache = KVCache(model.config, batch=IMAGES)
        logits = model.decode(x, cache).data[:, -1]
        for _ in range(n):
            token = choose(logits, rng.random(IMAGES))
            logits = model.decode(token[:, None], cache).data[:, -1]
    return decoding_seconds(draw, steps)


def decoding_seconds(draw, steps: int) -> float:
    """draw(n) draws n pixels after the prompt: the time of steps - 1 decoding steps alone."""
    draw(2)                                                               # compile, warm up
    t0 = time.perf_counter()
    draw(1)
    t1 = time.perf_counter()
    draw(steps)
    return (time.perf_counter() - t1) - (t1 - t0)


def run_transformers(folder: Path, steps: int, threads: int) -> float:
    import torch
    from transformers import ImageGPTForCausalImageModeling
    torch.set_num_threads(threads)
    model = ImageGPTForCausalImageModeling.from_pretrained(folder).eval()
    x = torch.from_numpy(prompt_tokens())

    def draw(n):
        with torch.inference_mode():
            model.generate(input_ids=x, max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=0,
                           use_cache=True, pad_token_id=CFG["vocab"])
    return decoding_seconds(draw, steps)


def forward_ours(folder: Path) -> float:
    import numpy as np

    from minigpt_img.checkpoint import load_hf
    from minigpt_img.features import extract_features
    model, _ = load_hf(folder)
    x = np.random.default_rng(2).integers(0, CFG["vocab"], (FORWARD_BATCH, model.config.n_ctx))
    return _median_pass(lambda: extract_features(model, x, "ar", FORWARD_BATCH))


def forward_transformers(folder: Path, threads: int) -> float:
    import numpy as np
    import torch
    from transformers import ImageGPTForCausalImageModeling
    torch.set_num_threads(threads)
    model = ImageGPTForCausalImageModeling.from_pretrained(folder).eval()
    x = np.random.default_rng(2).integers(0, CFG["vocab"], (FORWARD_BATCH, model.config.n_positions))
    x = torch.from_numpy(np.concatenate([np.full((FORWARD_BATCH, 1), CFG["vocab"]), x[:, :-1]], axis=1))

    def run():
        with torch.inference_mode():
            model(input_ids=x)
    return _median_pass(run)


def _median_pass(run, repeats: int = 3) -> float:
    run()                                                                 # compile, warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def child(task: str, impl: str, folder: Path, steps: int, threads: int) -> None:
    if task == "forward":
        seconds = forward_transformers(folder, threads) if impl == "transformers" else forward_ours(folder)
        out = {"impl": impl, "seconds": seconds}
    else:
        seconds = run_transformers(folder, steps, threads) if impl == "transformers" else run_ours(folder, steps)
        out = {"impl": impl, "seconds": seconds, "tokens_per_s": IMAGES * (steps - 1) / seconds}
    from bench import peak_rss_mb  # only now: importing bench.py applies threads.configure
    print(json.dumps({**out, "peak_rss_mb": peak_rss_mb()}))


def bench(task: str, repeats: int, threads: int, steps: int = 256,
          folder: Path = Path("runs/bench-igpt-s-hf")) -> dict:
    """Each implementation in its own child process, alternately; the median of each."""
    import numpy as np
    export(folder)
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(REPO)
    key = "seconds" if task == "forward" else "tokens_per_s"
    runs, peaks = {impl: [] for impl in IMPLS[task]}, {}
    for _ in range(max(1, repeats)):
        for impl in IMPLS[task]:
            args = [sys.executable, __file__, "--task", task, "--impl", impl, "--steps", str(steps),
                    "--threads", str(threads), "--folder", str(folder)] + (["--configure"] if impl == "ours" else [])
            out = json.loads(subprocess.run(args, capture_output=True, text=True, check=True,
                                            env=env).stdout.strip().splitlines()[-1])
            runs[impl].append(out[key])
            peaks[impl] = max(peaks.get(impl, 0.0), out["peak_rss_mb"])
    result = {impl: {key: float(np.median(r)), "peak_rss_mb": peaks[impl]} for impl, r in runs.items()}
    if task == "forward":
        print(f"forward at iGPT-S size at 32x32, {FORWARD_BATCH} images, no gradients, {threads} threads")
        for impl in IMPLS[task]:
            r = result[impl]
            hf = result["transformers"][key]
            ratio = "" if impl == "transformers" else f", ours/transformers {r[key] / hf:.2f}"
            print(f"  {impl:<14} {r[key]:7.2f} s, peak RSS {r['peak_rss_mb']:,.0f} MB{ratio}")
        return result
    print(f"sampling at iGPT-S size (24 layers, width 512) at 32x32: {IMAGES} images, a prompt of {PROMPT} "
          f"pixels, then {steps} pixels each (decoding steps alone), {threads} threads")
    for impl in IMPLS[task]:
        r = result[impl]
        ratio = "" if impl == "transformers" else f", {r[key] / result['transformers'][key]:.2f}x transformers"
        print(f"  {impl:<14} {r[key]:7.1f} tokens/s, peak RSS {r['peak_rss_mb']:,.0f} MB{ratio}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=list(IMPLS), default="sampling")
    ap.add_argument("--impl", choices=IMPLS["sampling"], required=True)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--folder", type=Path, default=Path("runs/bench-igpt-s-hf"))
    ap.add_argument("--configure", action="store_true", help="call threads.configure() before NumPy loads "
                    "(decoding=True for --task sampling, as sample.py)")
    args = ap.parse_args()
    if args.configure:
        sys.path.insert(0, str(REPO))
        from minigpt_img.threads import configure
        configure(args.threads, decoding=args.task == "sampling")
    import numpy  # noqa: F401  (a plain script: NumPy first)
    sys.path.insert(0, str(REPO))
    export(args.folder)
    child(args.task, args.impl, args.folder, args.steps, args.threads)


if __name__ == "__main__":
    main()
