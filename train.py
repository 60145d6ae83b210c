"""Pre-train Image GPT (§2.1, §3.4) on a CPU, or fine-tune it (§2.3).  python train.py --help

    python train.py                                   # streaks, micro, 8x8: minutes
    python train.py --size s --res 32 --data cifar10 --data-dir ../shared/data   # the paper's iGPT-S
    python train.py --resume --out runs/default       # continue where a run stopped
    python train.py --finetune runs/default/ckpt.npz  # §2.3 fine-tuning, into runs/default-finetune

The flags are runconfig.RunConfig's fields, with their defaults (minigpt_img/runconfig.py).
"""
import argparse
import sys

from minigpt_img.cli import Parser, add_threads_flag, fair_share, run
from minigpt_img.runconfig import add_flags


def parse(argv=None):
    ap = Parser(prog="train.py", description="Pre-train Image GPT on pixels (Ctrl-C saves and stops; "
                "--resume continues).", argument_default=argparse.SUPPRESS)  # flags not given stay
    add_flags(ap)                                      # absent: a resumed run keeps its checkpoint's
    ap.add_argument("--no-augment", dest="augment", action="store_const", const="none",
                    help="the same as --augment none")
    ap.add_argument("--download", action="store_true", help="fetch cifar10/cifar100/stl10 into --data-dir first")
    ap.add_argument("--resume", action="store_true", default=False,
                    help="continue the run in --out from its ckpt.npz")
    add_threads_flag(ap)
    return ap.parse_args(argv)


def train(args, comm) -> int:
    from minigpt_img.download import download
    from minigpt_img.finetune import start_from_probe
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
        trainer.log(f"data-parallel over {comm.size} processes: {trainer.plan.per_process} of each "
                    f"micro-batch's {cfg.batch_size} images per process")
    if cfg.head_from_probe and not args.resume:
        start_from_probe(trainer)  # §2.3 departure (LP-FT): a step before training
    trainer.train()
    return 0


def main(argv=None) -> int:
    return run(train, parse(argv))


if __name__ == "__main__":
    sys.exit(main())
