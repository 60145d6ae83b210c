"""§3.3 Model sizes: the paper's iGPT-S/M/L/XL beside sizes a CPU can train (nano, micro, mini: a
departure for CPUs; micro is train.py's default).

Parameters of an ImageGPT at resolution n_px with palette V (biases off, as released):
    L * 12 C^2  (qkv 3C^2, attention output C^2, MLP 8C^2)  +  L * 2C (norms)
    + (V + 1) C (token embeddings, SOS included) + n_px^2 C (positions) + C (final norm) + C V (head)
At 32x32 with V = 512 this gives the paper's 76M (S), 455M (M) and 1.4B (L) parameters.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for the annotations only
    from .model import GPTConfig

# Nothing heavy at the top (the model is imported where a config is built), so that the scripts can
# list the sizes in their flags before NumPy loads.

#          name: (n_layer, n_embd, n_head, default batch, note)
# Memory: weights, gradients and Adam's two moments take 16 bytes per parameter before any activation:
# 1.2 GB for s, 7.3 GB for m, 21.8 GB for l, 109 GB for xl. The default batch keeps a 32x32 training
# step of nano to s well within 16 GB (s at batch 4: 5.9 GB measured); m at batch 1 needs more than
# its 7.3 GB; l (~22 GB) does not fit a 24 GB machine with its activations, and xl fits no single
# machine of this kind. The paper's batch of 128 is reached with --grad-accum (s: --batch-size 4
# --grad-accum 32).
SIZES = {
    "nano":  (2, 32, 2, 16, "tests"),
    "micro": (4, 128, 4, 16, "default, minutes on a CPU"),
    "mini":  (8, 256, 8, 8, "hours on a CPU"),
    "s":     (24, 512, 8, 4, "paper iGPT-S, 76M parameters at 32x32"),
    "m":     (36, 1024, 8, 1, "paper iGPT-M, 455M"),
    "l":     (48, 1536, 16, 1, "paper iGPT-L, 1362M"),
    "xl":    (60, 3072, 16, 1, "paper iGPT-XL, 6.8B (head count not published)"),
}

# The paper's parameter counts (§3.3; L and XL to the million in Table 2), for the test that our sizes
# are the paper's.
PAPER_PARAMS = {"s": 76e6, "m": 455e6, "l": 1362e6, "xl": 6801e6}


def config_for(size: str, n_px: int, vocab: int = 512) -> "GPTConfig":
    """The GPTConfig of a named size at resolution n_px. Unknown names raise ValueError naming them."""
    from .model import GPTConfig

    if size not in SIZES:
        raise ValueError(f"unknown model size '{size}': choose one of {', '.join(SIZES)}")
    n_layer, n_embd, n_head, _, _ = SIZES[size]
    return GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_px=n_px, vocab=vocab)


def default_batch(size: str) -> int:
    return SIZES[size][3] if size in SIZES else 16


def count_parameters(cfg) -> int:
    """The formula in the module docstring (no need to build the model)."""
    C, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab
    per_block = 12 * C * C + 2 * C + (9 * C if cfg.bias else 0)  # biases: qkv 3C, proj C, fc 4C, proj C
    return L * per_block + (V + 1) * C + cfg.n_ctx * C + C + C * V


def training_bytes(cfg, batch: int) -> int:
    """An estimate of a training step's peak memory: weights, gradients and Adam's two moments (16
    bytes per parameter), and what the backward pass keeps, about 24 float32 numbers per token, width
    and layer plus 4 per token and palette colour (logits and their gradient). Measured peaks at
    32x32: s at batch 4 5.9 GB (estimate 6.0), mini at batch 4 1.05 GB (estimate 0.95)."""
    return 16 * count_parameters(cfg) + 4 * batch * cfg.n_ctx * (24 * cfg.n_embd * cfg.n_layer + 4 * cfg.vocab)


def sampling_bytes(cfg, images: int) -> int:
    """An estimate of sampling's memory beside the weights: the KV cache of every layer (keys and
    values, float32) and the first pass's activations and logits, for `images` images at once."""
    return 8 * cfg.n_layer * images * cfg.n_ctx * cfg.n_embd + 4 * images * cfg.n_ctx * (8 * cfg.n_embd + cfg.vocab)


def forward_bytes(cfg, images: int) -> int:
    """An estimate of a no-grad forward pass's memory beside the weights (probe features): about 16
    float32 numbers per token and width live at once (the residual stream, the norm's output, q, k,
    v, the MLP's 4C hidden layer and its activation) and the logits twice; measured 9 to 13 at
    iGPT-S's width at 32x32, batches of 1 and 2."""
    return 4 * images * cfg.n_ctx * (16 * cfg.n_embd + 2 * cfg.vocab)


PASS_BYTES = 128 << 20  # the most bytes the widest activation of a no-grad forward pass may take


def images_per_pass(cfg) -> int:
    """How many images a no-grad forward pass (probe features, evaluations) takes at once: the most
    whose MLP hidden layer, its widest activation (images x T x 4C float32), fits PASS_BYTES; 16 at
    iGPT-S size and 32x32. A batch of more images goes through in groups of this many (passes).
    Larger passes are no faster and hold more memory: measured (2026-12-04, AMD EPYC, 2 threads,
    features to layer 12 of iGPT-S at 32x32) 0.61 s per image at 4 and at 16 images per pass, 0.71 s
    at 32 and 0.98 s at 64, where the process's peak grew to 2.6 GB and 18 s of the 63 went to the
    kernel's page faults; micro and mini at 32x32: the same time per image from 16 to 64 images, the
    memory 2.7x as much."""
    return max(1, PASS_BYTES // (4 * cfg.n_ctx * 4 * cfg.n_embd))


def passes(n_images: int, cfg) -> list[slice]:
    """The images 0..n_images-1 of a batch in groups of at most images_per_pass(cfg), in order: one
    no-grad forward pass each."""
    step = images_per_pass(cfg)
    return [slice(i, min(i + step, n_images)) for i in range(0, n_images, step)]


def available_memory() -> int:
    """Bytes of memory this machine can still give a process (Linux MemAvailable; else all of it)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_problem(need: int, what: str, fix: str) -> str | None:
    """A one-line message when `need` bytes exceed what the machine has, else None."""
    have = available_memory()
    if need <= have:
        return None
    return f"{what} needs about {need / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB available: {fix}"
