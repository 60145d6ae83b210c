"""One way to name a model: a checkpoint of ours, a Hugging Face ImageGPT folder, or a hub name.

Not a paper section: the paper's models are published as openai/imagegpt-small, -medium and -large on
the Hugging Face hub (config.json, preprocessor_config.json with the 512 palette clusters, and the
weights as pytorch_model.bin, for some revisions model.safetensors too).

    runs/c10/ckpt.npz                 a train.py checkpoint (a file)
    path/to/imagegpt-small            a Hugging Face folder (config.json and the weights)
    openai/imagegpt-small[@revision]  a hub name: first the local Hugging Face cache, as every HF tool
                                      lays it out ($HF_HUB_CACHE, else $HF_HOME/hub, else
                                      ~/.cache/huggingface/hub: models--openai--imagegpt-small/
                                      refs/<revision> holds a commit, snapshots/<commit>/ the files),
                                      then the hub itself through huggingface_hub (pip install -e
                                      ".[hub]"), with its progress bar, resumable and verified
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import CheckpointError

WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # a folder's weights, in the order they are preferred
FILES = ("config.json", "preprocessor_config.json", *WEIGHTS)
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")


def weights_file(folder: Path) -> Path | None:
    """The weights of a Hugging Face folder (WEIGHTS, the first present), or None."""
    return next((folder / n for n in WEIGHTS if (folder / n).is_file()), None)


def home_of(name, path: Path) -> Path:
    """Where a script writes what it makes of a model (probe.json, samples) unless told: beside a
    checkpoint, in a Hugging Face folder of the user's, and for a model in the hub's cache (never
    written into) <owner>--<name> in the working folder. path: locate(name)."""
    if path.is_file():
        return path.parent
    if not path.resolve().is_relative_to(cache_root().resolve()):
        return path
    return Path(str(name).replace("/", "--").replace("@", "-"))


def cache_root() -> Path:
    """The Hugging Face hub cache, from the environment variables every HF tool reads."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface" / "hub"


def cached_snapshot(repo: str, revision: str = "main") -> Path | None:
    """The cached folder of repo at revision (a branch, a tag or a commit), or None when the cache
    holds no snapshot of it with a config and weights."""
    base = cache_root() / ("models--" + repo.replace("/", "--"))
    ref = base / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    folder = base / "snapshots" / commit
    return folder if (folder / "config.json").is_file() and weights_file(folder) is not None else None


def locate(name) -> Path:
    """The local file or folder a model name stands for (the module docstring), fetching a hub name
    that the cache does not hold; one CheckpointError line when it cannot be had."""
    path = Path(name)
    if path.exists():
        return path
    text = str(name)
    if not HUB_NAME.match(text):
        raise CheckpointError(f"no checkpoint at {name}: name a train.py checkpoint, a Hugging Face ImageGPT "
                              "folder, or a hub name such as openai/imagegpt-small")
    repo, _, revision = text.partition("@")
    revision = revision or "main"
    folder = cached_snapshot(repo, revision)
    if folder is not None:
        return folder
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(f"{text} is not in the Hugging Face cache ({cache_root()}), and fetching it needs "
                              "huggingface_hub: pip install -e \".[hub]\"") from None
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=list(FILES)))
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{text} is not in the Hugging Face cache ({cache_root()}) and the hub cannot be "
                              "reached (offline): fetch it once where there is a network, or copy the cache "
                              "here") from None
    except Exception as e:  # the hub's own errors: unknown repository or revision, refused, no network
        raise CheckpointError(f"{text} could not be fetched from the Hugging Face hub "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
