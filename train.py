"""Pre-train Image GPT (§2.1, §3.4) on a CPU.  python train.py --help

    python train.py                                   # streaks, micro, 8x8: minutes
    python train.py --size s --res 32 --data cifar10 --data-dir ../shared/data   # the paper's iGPT-S
    python train.py --resume --out runs/default       # continue where a run stopped
    python train.py --finetune runs/default/ckpt.npz  # §2.3 fine-tuning, into runs/default-finetune
"""
import argparse
import sys

from minigpt_img.cli import (Parser, add_threads_flag, fair_share, nonnegative_float, nonnegative_int,
                             positive_float, positive_int, run)

S = argparse.SUPPRESS  # flags not given stay absent, so a resumed run keeps its checkpoint's values


def parse(argv=None):
    ap = Parser(prog="train.py", description="Pre-train Image GPT on pixels (Ctrl-C saves and stops; "
                "--resume continues).", argument_default=S)
    a = ap.add_argument
    a("--size", help="model size: nano, micro, mini, s, m, l, xl (default micro)")
    a("--res", type=positive_int, help="image side in pixels after box-filter downsampling (default 16; 8 "
      "for streaks)")
    a("--data", help="streaks | shapes | cifar10 | cifar100 | stl10 | path to a folder of class folders "
      "(default streaks)")
    a("--data-dir", help="folder holding the dataset files (default data)")
    a("--download", action="store_true", help="fetch cifar10/cifar100/stl10 into --data-dir first")
    a("--objective", choices=["ar", "bert"], help="ar (autoregressive) or bert (masked) (default ar)")
    a("--mask-rate", type=positive_float, help="BERT: probability a position is masked (default 0.15)")
    a("--batch-size", type=positive_int, help="images per micro-batch (default by size: 16 up to micro, 8 mini, 4 s, "
      "1 m/l/xl; 8 for streaks)")
    a("--grad-accum", type=positive_int, help="micro-batches per optimiser step (default 1)")
    a("--lr", type=positive_float, help="peak learning rate of Adam (default 3e-3; 1.5e-3 for streaks)")
    a("--steps", type=positive_int, help="optimiser steps in the run (default: --epochs)")
    a("--epochs", type=positive_float, help="passes over the training split when --steps is not given (default 1; "
      "4 for streaks)")
    a("--warmup-steps", type=nonnegative_int, help="linear warm-up steps (default: one epoch, at most 10%% of the run)")
    a("--weight-decay", type=nonnegative_float, help="decoupled weight decay (default 0, as the paper)")
    a("--clip", type=nonnegative_float, help="global gradient-norm clip, 0 for none (default 1.0)")
    a("--palette-size", type=positive_int, help="k-means k, the most colours; images with fewer distinct "
      "colours get one token each (default 512)")
    a("--palette", help="use this palette instead of fitting one: a (k, 3) .npy in [-1, 1] or a Hugging "
      "Face preprocessor_config.json with 'clusters' (OpenAI's released palette) (default: fit)")
    a("--augment", choices=["wrn", "crop", "none"], help="wrn: reflection-pad, random crop and flip (the "
      "paper's CIFAR fine-tuning augmentation); crop: random crops of the full-resolution image, then "
      "downsampled (the paper's pre-training augmentation); none (default: crop when pre-training, wrn "
      "when fine-tuning, none for streaks)")
    a("--no-augment", dest="augment", action="store_const", const="none", help="the same as --augment none")
    a("--seed", type=nonnegative_int, help="seed of init, data order, augmentation, palette (default 0)")
    a("--out", help="run folder for ckpt.npz, metrics.jsonl, loss.png, samples.png (default runs/default)")
    a("--cache-dir", help="where quantised tokens are cached (default runs/cache)")
    a("--resume", action="store_true", default=False, help="continue the run in --out from its ckpt.npz")
    a("--eval-every", type=positive_int, help="steps between validation evaluations (default: 10 per run)")
    a("--eval-images", type=positive_int, help="validation images per evaluation (default 512)")
    a("--log-every", type=positive_int, help="steps between metrics.jsonl lines (default 10)")
    a("--ckpt-every", type=positive_float, help="minutes between checkpoints (default 10)")
    a("--time-budget", type=nonnegative_float, help="stop cleanly after this many minutes of training, counted over "
      "all sessions of a resumed run (default: none)")
    a("--snapshots", action="store_true", help="also keep the weights at every evaluation in "
      "--out/snapshots, to probe them along the run (§4.2) (default: off)")
    a("--samples", type=nonnegative_int, help="images in samples.png at the end (default 16)")
    a("--finetune", help="§2.3: fine-tune this pre-trained ckpt.npz with a classifier (default: pre-train)")
    a("--clf-only", action="store_true", help="fine-tuning: train on L_CLF alone, without L_GEN")
    a("--patience", type=positive_int, help="fine-tuning: stop after this many evaluations without a better "
      "held-out accuracy (default 5)")
    a("--pool-layer", type=nonnegative_int, nargs="+", help="fine-tuning: pool the features n^l of this layer "
      "(0: the embeddings) for the classifier; several layers: their features side by side, as probe.py "
      "--concat (default: the last, n^L, as the paper)")
    a("--head-from-probe", action="store_true", help="fine-tuning: start the classifier from a linear probe "
      "of the pooled features instead of zero (departure: LP-FT; default: off)")
    add_threads_flag(ap)
    return ap.parse_args(argv)


def train(args, comm) -> int:
    from minigpt_img.download import download
    from minigpt_img.runconfig import resolve_config
    from minigpt_img.trainer import Trainer

    given = {k: v for k, v in vars(args).items() if k not in ("resume", "threads", "download")}
    cfg = resolve_config(given, args.resume)
    if getattr(args, "download", False):
        with comm.root_first():  # rank 0 fetches; the others then find the files in place
            download(cfg.data, cfg.data_dir)
    trainer = Trainer(cfg, resume=args.resume, comm=comm, fair_share=fair_share(args, comm))
    trainer.log("config: " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in vars(cfg).items()))
    if comm.size > 1:
        trainer.log(f"data-parallel over {comm.size} processes: {cfg.batch_size // comm.size} of each "
                    f"micro-batch's {cfg.batch_size} images per process")
    trainer.train()
    return 0


def main(argv=None) -> int:
    return run(train, parse(argv))


if __name__ == "__main__":
    sys.exit(main())
