"""Sample from a trained (or imported) Image GPT.  python sample.py --help

    python sample.py --ckpt runs/default/ckpt.npz                       # samples.png
    python sample.py --ckpt runs/default/ckpt.npz --complete --data cifar10 --data-dir ../shared/data
    python sample.py --init-from path/to/imagegpt-small --complete ...  # OpenAI's released weights
"""
import sys
from pathlib import Path

from minigpt_img.cli import Parser, add_threads_flag, run
from minigpt_img.ranges import NONNEGATIVE, NONNEGATIVE_INT, POSITIVE_INT
from minigpt_img.runconfig import declared

CKPT = str(Path(declared("out")) / "ckpt.npz")  # train.py's default run


def parse(argv=None):
    ap = Parser(prog="sample.py", description="Unconditional samples or half-image completions as a "
                                 "PNG grid.")
    a = ap.add_argument
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--ckpt", default=CKPT, help="a train.py checkpoint, a Hugging Face ImageGPT folder, or a hub "
                     f"name such as openai/imagegpt-small[@revision] (default {CKPT})")
    src.add_argument("--init-from", help="the same as --ckpt (a Hugging Face folder or hub name)")
    a("--complete", action="store_true", help="complete evaluation images instead of sampling from nothing")
    a("--data", default=None, help="dataset for --complete (default: the checkpoint's training data)")
    a("--data-dir", default=None, help="folder holding the dataset files (default: the checkpoint's)")
    a("--n", type=POSITIVE_INT, default=None, help="samples, or images to complete (default 16, or 8 with --complete)")
    a("--per-image", type=POSITIVE_INT, default=4, help="completions per image (default 4)")
    a("--frac", type=float, default=0.5, help="fraction of image rows given to --complete (default 0.5)")
    a("--temperature", type=NONNEGATIVE, default=1.0, help="softmax temperature, 0 for argmax (default 1.0)")
    a("--top-k", type=POSITIVE_INT, default=None, help="sample among the k likeliest colours only (default: all)")
    a("--seed", type=NONNEGATIVE_INT, default=0, help="sampling seed (default 0)")
    a("--scale", type=POSITIVE_INT, default=None, help="nearest-neighbour upscaling of the grid (default: ~96 px per image)")
    a("--out", default=None, help="output PNG (default samples-seed<seed>.png or completions-seed<seed>.png "
      "beside the checkpoint; train.py's own samples.png is left as it is)")
    a("--palette-preview", default=None, metavar="PNG", help="§3.2: no model; write images of --data beside "
      "their palette-quantised versions to PNG (--palette-size colours fitted with --seed)")
    a("--palette-size", type=POSITIVE_INT, default=declared("palette_size"),
      help=f"--palette-preview: k, the most colours (default {declared('palette_size')})")
    add_threads_flag(ap)
    return ap.parse_args(argv)


def palette_preview(args) -> int:
    from minigpt_img.data import load_dataset
    from minigpt_img.palette import preview
    from minigpt_img.plots import image_grid, save_png

    ds = load_dataset(args.data or declared("data"), args.data_dir or declared("data_dir"), seed=args.seed)
    shown = ds.val.images[:args.n or 16]
    pairs = preview(ds.train.images, shown, args.palette_size, args.seed)
    path = save_png(image_grid(pairs, ncols=8, scale=max(1, 128 // shown.shape[1])), args.palette_preview)
    print(f"wrote {path}: {len(shown)} {ds.name} images (left) beside their palette-quantised versions (right)")
    return 0


def sample(args, comm) -> int:
    import numpy as np

    if args.palette_preview:
        return palette_preview(args)

    from minigpt_img.checkpoint import CheckpointError, open_model
    from minigpt_img.hub import home_of
    from minigpt_img.data import trained_on
    from minigpt_img.palette import Palette
    from minigpt_img.plots import GRID_PAD, image_grid, save_png, with_caption
    from minigpt_img.sampling import completion_rows, sample_shared
    from minigpt_img.sizes import memory_problem, sampling_bytes
    from minigpt_img.streams import generator
    from minigpt_img.streaks import judge_samples

    name = args.init_from or args.ckpt
    model, centers, meta, path = open_model(name)
    run_settings = meta.get("run", {})
    # beside a checkpoint, in a Hugging Face folder; never inside the hub's cache (hub.home_of)
    where = home_of(name, path)
    if run_settings.get("objective") == "bert":
        raise CheckpointError(f"{name} is a BERT model: it defines no raster-order sampler; "
                              "sample from an AR checkpoint (train.py --objective ar)")
    if centers is None:
        raise CheckpointError(f"{name} holds no palette (preprocessor_config.json 'clusters', or a train.py "
                              "checkpoint's): sampled tokens cannot become colours")
    if args.temperature < 0 or (args.top_k is not None and args.top_k < 1):
        raise ValueError("--temperature must be >= 0 and --top-k >= 1")
    if not 0 <= args.frac < 1:
        raise ValueError("--frac must lie in [0, 1)")
    palette, cfg = Palette(centers), model.config
    n_images = (args.n or 8) * args.per_image if args.complete else (args.n or 16)
    problem = memory_problem(sampling_bytes(cfg, n_images), f"sampling {n_images} images of {cfg.n_px}x{cfg.n_px} at once",
                             "ask for fewer with --n (or --per-image)")
    if problem:
        raise CheckpointError(problem)
    source = name
    settings = (f"temperature {args.temperature:g}, top-k {args.top_k or 'all'}, seed {args.seed}, "
                f"{cfg.n_px}x{cfg.n_px}")
    rng = np.random.default_rng(args.seed)  # the user's own sampling seed
    scale = args.scale or max(1, 96 // cfg.n_px)
    if args.complete:
        n = args.n or 8
        ds = trained_on(run_settings, cfg.n_px, args.data, args.data_dir,
                        where=f"{name} (imported weights)" if path.is_dir() else name)
        split = ds.test if ds.test is not None else ds.val
        images = split.images[:n]
        if comm.is_root:
            print(f"completing {len(images)} {ds.name} {'test' if ds.test is not None else 'validation'} "
                  f"images from their top {args.frac:.0%}, {args.per_image} completions each")
        rows = completion_rows(model, palette, images, args.per_image, args.frac, rng,
                               args.temperature, args.top_k, progress=True, comm=comm)
        out = Path(args.out or where / f"completions-seed{args.seed}.png")
        labels = ["original", f"given top {args.frac:.0%}"] + [f"completion {i + 1}" for i in range(args.per_image)]
        grid = with_caption(image_grid(rows, ncols=2 + args.per_image, scale=scale),
                            [f"{source}: {ds.name} images completed from their top {args.frac:.0%}",
                             settings], labels, column_width=cfg.n_px * scale + GRID_PAD)
    else:
        n = args.n or 16
        tokens = sample_shared(model, n, rng, args.temperature, args.top_k, progress=True, comm=comm)
        out = Path(args.out or where / f"samples-seed{args.seed}.png")
        images = palette.decode(tokens)                                  # (n, n_px, n_px, 3)
        grid = with_caption(image_grid(images, ncols=min(8, n), scale=scale),
                            [f"{source}: {n} samples", settings])
        if run_settings.get("data") == "streaks" and comm.is_root:  # the data's own judgement
            print(judge_samples(images, generator(0, "streaks", 2)))
    if comm.is_root:  # the processes drew the images together; rank 0 writes them
        save_png(grid, out)
        print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    return run(sample, parse(argv), decoding=True)


if __name__ == "__main__":
    sys.exit(main())
