"""Linear probes at every layer (§2.4) and with few labels (§4.7).  python probe.py --help

    python probe.py --ckpt runs/default/ckpt.npz
    python probe.py --ckpt runs/c10/ckpt.npz --data cifar10 --data-dir ../shared/data --eval-split val
    python probe.py --along runs/c10/snapshots --eval-split val   # §4.2: probe vs validation loss
"""
import sys
from pathlib import Path

from minigpt_img.cli import Parser, add_threads_flag, fair_share, run
from minigpt_img.ranges import NONNEGATIVE_INT, POSITIVE_INT
from minigpt_img.runconfig import EVAL_BATCH, declared
from minigpt_img.sizes import PASS_BYTES

CKPT = str(Path(declared("out")) / "ckpt.npz")  # train.py's default run


def parse(argv=None):
    ap = Parser(prog="probe.py", description="Average-pool every layer's features, fit an L2 logistic "
                                 "regression per layer, report accuracy by layer beside baselines.")
    a = ap.add_argument
    a("--ckpt", default=CKPT, help="a train.py checkpoint, a Hugging Face ImageGPT folder, or a hub name such as "
      f"openai/imagegpt-small[@revision] (default {CKPT})")
    a("--data", default=None, help="dataset (default: the one the checkpoint was trained on)")
    a("--data-dir", default=None, help="folder holding the dataset files (default: the checkpoint's)")
    a("--eval-split", choices=["test", "val"], default="test",
      help="score on the official test set, or on the held-out 10%% of the training set (default test)")
    a("--along", default=None, help="§4.2: probe every snapshot in this folder (train.py --snapshots) "
      "and plot best-layer accuracy against validation loss into along.json/along.png (default: off)")
    a("--layers", type=NONNEGATIVE_INT, nargs="+", default=None, help="layers to probe (default: all, 0..L)")
    a("--max-train", type=POSITIVE_INT, default=None, help="use at most this many training images (default: all)")
    a("--max-eval", type=POSITIVE_INT, default=None, help="score on at most this many images (default: all)")
    a("--batch-size", type=POSITIVE_INT, default=EVAL_BATCH, help="images per batch, the unit of progress and of "
      "the work shared among MPI ranks; a forward pass takes fewer where their MLP hidden layer would exceed "
      f"{PASS_BYTES >> 20} MB (16 images of 32x32 at iGPT-S size) (default {EVAL_BATCH})")
    a("--labels-per-class", type=POSITIVE_INT, nargs="*", default=[], help="also probe with this many labels per "
      "class, 5 random draws each, e.g. 4 25 400 (default: none)")
    a("--concat", type=POSITIVE_INT, default=1, help="also probe this many consecutive layers side by side, "
      "centred on the best single layer, as the paper's strongest ImageNet probe (5 layers) (default 1: off)")
    a("--bert-masks", type=POSITIVE_INT, default=1, help="BERT checkpoints: average features over this many "
      "random masks (default 1)")
    a("--no-baselines", action="store_true", help="skip the raw-pixel, histogram and random-init probes")
    a("--seed", type=NONNEGATIVE_INT, default=0, help="seed for masks, held-out slice, subsets (default 0)")
    a("--cache-dir", default=declared("cache_dir"), help="where quantised tokens and features are cached "
      f"(default {declared('cache_dir')})")
    a("--out", default=None, help="folder for probe.json and probe.png (default: beside the checkpoint)")
    add_threads_flag(ap)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    return run(along if args.along else probe, args)


def probe(args, comm) -> int:
    from minigpt_img.files import write_json
    from minigpt_img.hub import home_of, locate
    from minigpt_img.probe_report import format_report, plot_report, probe_report

    report = probe_report(args.ckpt, args.data, args.data_dir, args.eval_split, args.layers,
                          args.max_train, args.max_eval, args.batch_size, args.labels_per_class,
                          args.bert_masks, args.seed, not args.no_baselines, args.cache_dir,
                          log=print if comm.is_root else lambda *a: None, comm=comm,
                          fair_share=fair_share(args, comm), concat=args.concat)
    if not comm.is_root:  # rank 0 writes the report
        return 0
    out = Path(args.out) if args.out else home_of(args.ckpt, locate(args.ckpt))
    write_json(out / "probe.json", report)
    plot_report(report, out / "probe.png")
    print(format_report(report))
    print(f"wrote {out / 'probe.json'} and {out / 'probe.png'}")
    return 0


def along(args, comm) -> int:
    from minigpt_img.files import write_json
    from minigpt_img.probe_report import plot_along, probe_along

    snaps = list(Path(args.along).glob("*.npz"))
    if not snaps:
        raise ValueError(f"no snapshots (*.npz) in {args.along}: train with --snapshots")
    result = probe_along(snaps, data=args.data, data_dir=args.data_dir, eval_split=args.eval_split,
                         layers=args.layers, max_train=args.max_train, max_eval=args.max_eval,
                         batch_size=args.batch_size, bert_masks=args.bert_masks, seed=args.seed,
                         cache_dir=args.cache_dir, comm=comm, log=print if comm.is_root else lambda *a: None)
    if not comm.is_root:
        return 0
    out = Path(args.out or Path(args.along).parent)
    write_json(out / "along.json", result)
    plot_along(result, out / "along.png")
    print(f"wrote {out / 'along.json'} and {out / 'along.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
