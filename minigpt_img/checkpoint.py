"""Checkpoints: our .npz format, and Hugging Face ImageGPT import/export.

Our checkpoints are one .npz (read with allow_pickle=False; the config is stored as JSON text):
    config            JSON of GPTConfig (plus whatever the caller adds under "meta")
    model/<name>      every parameter, by its Hugging Face name
    palette           (V, 3) float32 colours in [-1, 1], when known
    <other keys>      whatever the caller adds: train.py adds opt/<name> (Adam's moments and step
                      count) and head/<name>/<param> (fine-tuning's classifier); the step, the run's
                      settings and its training time go into the config's "meta". No random state is
                      saved: every random stream is a function of (seed, step) (streams.py).
Writes are atomic (files.write_atomic): a temporary file in the same folder, flushed to disk, then
renamed over the old one, so a crash mid-write leaves the previous checkpoint intact.

Hugging Face ImageGPT (`config.json` + `model.safetensors` or `pytorch_model.bin` (torchfile.py) +
`preprocessor_config.json`): the same
parameter names. Its blocks use GPT-2's Conv1D (weights stored (in, out), as here) but its lm_head is
a torch nn.Linear stored (out, in), so that one weight is transposed on the way in and out. Its
vocab_size counts SOS (V + 1), its n_positions is n_px^2, and its palette is `clusters`.

safetensors is read and written here directly rather than through the `safetensors` package: the
format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then raw little-endian buffers. Forty lines, no extra dependency, and never any pickle.
"""
from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import numpy as np

from .errors import CheckpointError
from .files import file_digest, write_atomic, write_json
from .hub import locate, weights_file
from .model import GPTConfig, ImageGPT
from .palette import check_palette
from .sizes import count_parameters, memory_problem
from .torchfile import read_torch_state



# ---- our .npz ---------------------------------------------------------------------------------
def save_arrays(path, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays to `path` (.npz) atomically."""
    write_atomic(path, lambda f: np.savez(f, **arrays))


def sub_state(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The entries under `prefix/`, with the prefix taken off: sub_state(arrays, "model") is the
    model's state dict, sub_state(arrays, "opt") the optimiser's."""
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in arrays.items() if k.startswith(prefix + "/")}


def load_arrays(path, keys=None) -> dict[str, np.ndarray]:
    """The arrays of a .npz checkpoint (only `keys`, when given: the others are not read). A file
    whose arrays would not fit in memory is refused before any is read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: pass the ckpt.npz a training run wrote")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # every .npz is a zip archive
            raise CheckpointError(f"{path} is not a checkpoint (not an .npz archive): pass the ckpt.npz "
                                  "a training run wrote")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("a single array, not a checkpoint's archive of arrays")
            wanted = [k for k in z.files if keys is None or k in keys]
            size = sum(i.file_size for i in z.zip.infolist() if i.filename[:-len(".npy")] in wanted)
            problem = memory_problem(size, f"{path}", "it is not a checkpoint this machine can load")
            if problem:
                raise CheckpointError(problem)
            return {k: z[k] for k in wanted}
    except CheckpointError:
        raise
    except Exception as e:  # zipfile/format errors: a truncated or foreign file
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); "
                              "it may be truncated: use an intact copy or retrain") from None


def read_meta(path) -> tuple[GPTConfig, dict]:
    """(model config, meta) of a checkpoint, reading only its small `config` entry, not the weights."""
    return read_config(load_arrays(path, keys=("config",)), path)


def save_model(path, model: ImageGPT, palette=None, meta: dict | None = None,
               extra: dict[str, np.ndarray] | None = None) -> None:
    config = {"config": dataclasses.asdict(model.config), "meta": meta or {}}
    arrays = {"config": np.array(json.dumps(config))}
    arrays.update({f"model/{k}": v for k, v in model.state_dict().items()})
    if palette is not None:
        arrays["palette"] = np.asarray(palette, dtype=np.float32)
    arrays.update(extra or {})
    save_arrays(path, arrays)


def read_config(arrays: dict[str, np.ndarray], path="checkpoint") -> tuple[GPTConfig, dict]:
    try:
        stored = json.loads(str(arrays["config"]))
        fields = stored["config"]
        meta = stored.get("meta", {})
        if not isinstance(fields, dict) or not isinstance(meta, dict):
            raise TypeError("its config and meta must be JSON objects")
        wrong = [k for k in ("n_layer", "n_embd", "n_head", "n_px", "vocab") if not _whole(fields.get(k))]
        if wrong or not isinstance(fields.get("bias", False), bool):
            raise TypeError(f"{', '.join(wrong) or 'bias'} must be whole numbers (bias: true or false)")
        return GPTConfig(**fields), meta
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has no valid model config ({e}); it was not written by "
                              "minigpt_img") from None


def check_finite(state: dict, where) -> None:
    """Refuse weights with a NaN or an infinity, checked on load as on save: such a model samples
    garbage and its probes report NaN losses without a word."""
    bad = [k for k, v in state.items() if np.issubdtype(np.asarray(v).dtype, np.floating) and
           not np.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{where} holds non-finite weights (NaN or inf) in {', '.join(bad[:3])}: it "
                              "cannot be used; take an earlier checkpoint")


def check_fits(cfg: GPTConfig, where) -> None:
    """Refuse a config whose weights alone would not fit in memory (a crafted or foreign file)."""
    problem = memory_problem(4 * count_parameters(cfg), f"the model of {where}",
                             "it is not a model this machine can hold")
    if problem:
        raise CheckpointError(problem)


def load_model(path, dtype=np.float32):
    """-> (model, palette or None, meta dict, all arrays) from one of our checkpoints."""
    cfg, _ = read_meta(path)
    check_fits(cfg, path)
    arrays = load_arrays(path)
    cfg, meta = read_config(arrays, path)
    model = ImageGPT(cfg, None, dtype=dtype)  # no initial draw: the weights are loaded below
    check_finite(sub_state(arrays, "model"), path)
    try:
        model.load_state_dict(sub_state(arrays, "model"), copy=False)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: weights do not fit its own config ({e})") from None
    palette = arrays.get("palette")
    if palette is not None:
        try:
            palette = check_palette(palette, path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        if len(palette) != cfg.vocab:
            raise CheckpointError(f"{path}: its palette has {len(palette)} colours, its model {cfg.vocab} tokens")
    return model, palette, meta, arrays


def open_model(name, dtype=np.float32):
    """-> (model, palette or None, meta, the local path) of a model named as hub.py says: a
    checkpoint of ours, a Hugging Face ImageGPT folder, or a hub name."""
    path = locate(name)
    if path.is_dir():
        model, palette = load_hf(path, dtype)
        return model, palette, {"source": str(name)}, path
    model, palette, meta, _ = load_model(path, dtype)
    return model, palette, meta, path


def start_arrays(name) -> tuple:
    """(arrays as a checkpoint of ours holds them, the local path) of a model to start a run from:
    a Hugging Face folder or hub name becomes "model/..." weights, its palette and its config."""
    path = locate(name)
    if not path.is_dir():
        return load_arrays(path), path
    model, palette = load_hf(path)
    if palette is None:
        raise CheckpointError(f"{path} has no preprocessor_config.json with the palette ('clusters'): its "
                              "tokens mean no colours")
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    arrays["palette"] = palette
    arrays["config"] = np.array(json.dumps({"config": dataclasses.asdict(model.config), "meta": {"source": str(name)}}))
    return arrays, path


def model_digest(path) -> str:
    """A digest of the weights at a local model path: the checkpoint file, or a folder's weights file."""
    path = Path(path)
    if path.is_dir():
        path = weights_file(path)
    return file_digest(path)


# ---- safetensors -----------------------------------------------------------------------------
_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
              "I8": "i1", "U8": "u1", "BOOL": "?"}


def _whole(value) -> bool:
    """An int (not a bool): what a size, an offset or a count read from a file must be."""
    return isinstance(value, int) and not isinstance(value, bool)


def read_safetensors(path) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as NumPy arrays (bfloat16 is widened to float32). The
    header is checked before any tensor is read: its length against the file's, and every tensor's
    offsets against the data section and against its dtype and shape."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, 100 << 20):
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        body = size - 8 - n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            shape = info["shape"]
            if not all(_whole(v) for v in (begin, end, *shape)):
                raise ValueError(f"tensor {name}: offsets {begin}..{end} and shape {shape} must be whole numbers")
            itemsize = 2 if info["dtype"] == "BF16" else np.dtype(_ST_DTYPES[info["dtype"]]).itemsize
            count = int(np.prod(shape, dtype=np.int64))
            if not (0 <= begin <= end <= body and end - begin == count * itemsize):
                raise ValueError(f"tensor {name}: offsets {begin}..{end} do not fit its shape "
                                 f"{shape} or the {body}-byte data section")
        spans = sorted(tuple(info["data_offsets"]) for k, info in header.items() if k != "__metadata__")
        for (_, end), (begin, _) in zip(spans, spans[1:]):
            if begin < end:  # the reference safetensors library refuses overlaps too
                raise ValueError(f"two tensors overlap in the data section (at byte {begin})")
    except (struct.error, ValueError, TypeError, KeyError, OSError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({type(e).__name__}: {e})") from None
    out = {}
    with open(path, "rb") as f:  # each tensor read straight into its own array: the weights exist once
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            arr = np.empty(int(np.prod(info["shape"], dtype=np.int64)),
                           dtype="<u2" if info["dtype"] == "BF16" else _ST_DTYPES[info["dtype"]])
            f.seek(8 + n + begin)
            if f.readinto(memoryview(arr).cast("B")) != end - begin:
                raise CheckpointError(f"{path} ends inside tensor {name}: the file is truncated")
            if info["dtype"] == "BF16":  # the top 16 bits of a float32
                arr = (arr.astype(np.uint32) << 16).view(np.float32)
            out[name] = arr.reshape(info["shape"])
    return out


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    codes = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
    header, offset, buffers = {}, 0, []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": codes[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        buffers.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    def write(f):
        f.write(struct.pack("<Q", len(text)) + text)
        for raw in buffers:
            f.write(raw)
    write_atomic(path, write)


# ---- Hugging Face ImageGPT -------------------------------------------------------------------
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older HF versions
PIL_BOX = 4  # PIL.Image.BOX, as an image processor's "resample" setting names it


def load_hf(directory, dtype=np.float32):
    """-> (model, palette or None) from a Hugging Face ImageGPT folder: config.json, the weights as
    model.safetensors or pytorch_model.bin (read without torch: torchfile.py), and optionally
    preprocessor_config.json (the palette)."""
    d = Path(directory)
    weights = weights_file(d)
    if not (d / "config.json").is_file() or weights is None:
        raise CheckpointError(f"{d} has no {'config.json' if not (d / 'config.json').is_file() else 'weights'}: "
                              "point at a Hugging Face ImageGPT folder (config.json and model.safetensors or "
                              "pytorch_model.bin)")
    try:
        hf = json.loads((d / "config.json").read_text())
        if not isinstance(hf, dict):
            raise TypeError("not a JSON object")
        for key in ("n_positions", "n_embd", "n_layer", "n_head", "vocab_size"):
            if not _whole(hf[key]) or not 1 <= hf[key] <= 1 << 32:
                raise ValueError(f"{key} {hf[key]!r} is not a whole number from 1 to 2^32")
        for key in ("layer_norm_epsilon",):
            if key in hf and (not isinstance(hf[key], (int, float)) or isinstance(hf[key], bool)):
                raise TypeError(f"{key} {hf[key]!r} is not a number")
        for key in ("n_inner",):
            if hf.get(key) is not None and not _whole(hf[key]):
                raise TypeError(f"{key} {hf[key]!r} is not a whole number")
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{d}/config.json is not an ImageGPT config ({type(e).__name__}: {e})") from None
    n_px = int(round(hf["n_positions"] ** 0.5))
    problems = []
    if hf.get("model_type", "imagegpt") != "imagegpt":
        problems.append(f"model_type {hf.get('model_type')!r}")
    if n_px * n_px != hf["n_positions"]:
        problems.append(f"n_positions {hf['n_positions']} is not a square")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        problems.append(f"n_inner {hf['n_inner']} (this model needs 4 * n_embd)")
    if hf.get("activation_function", "quick_gelu") != "quick_gelu":
        problems.append(f"activation {hf['activation_function']}")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        problems.append("a non-standard attention scaling")
    if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        problems.append(f"layer_norm_epsilon {hf['layer_norm_epsilon']}")
    if problems:
        raise CheckpointError(f"{d}: not an Image GPT this code implements: {', '.join(problems)}")
    try:
        cfg = GPTConfig(n_layer=hf["n_layer"], n_embd=hf["n_embd"], n_head=hf["n_head"], n_px=n_px,
                        vocab=hf["vocab_size"] - 1)
    except ValueError as e:
        raise CheckpointError(f"{d}/config.json: {e}") from None
    check_fits(cfg, d)

    raw = (read_safetensors(weights) if weights.suffix == ".safetensors" else
           read_torch_state(weights, max_bytes=2 * 8 * count_parameters(dataclasses.replace(cfg, bias=True)) + (64 << 20)))
    tensors = {k: v for k, v in raw.items() if not k.endswith(_HF_BUFFERS)}
    wrong = [k for k, v in tensors.items() if not np.issubdtype(v.dtype, np.floating)]
    if wrong:
        raise CheckpointError(f"{weights}: {', '.join(wrong[:3])} are not floating-point weights")
    if "lm_head.weight" in tensors:
        tensors["lm_head.weight"] = tensors["lm_head.weight"].T  # nn.Linear (V, C) -> (C, V)
    biases = [v for k, v in tensors.items() if k.endswith(".bias")]
    has_bias = any(np.any(b != 0) for b in biases)
    if not has_bias:  # OpenAI's released weights have no biases: HF stores zeros
        tensors = {k: v for k, v in tensors.items() if not k.endswith(".bias")}
    cfg = dataclasses.replace(cfg, bias=has_bias)
    model = ImageGPT(cfg, None, dtype=dtype)  # no initial draw: the weights are loaded below
    check_finite(tensors, weights)
    try:
        model.load_state_dict(tensors, copy=False)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{weights} does not match its config.json: {e}") from None

    palette = None
    pre = d / "preprocessor_config.json"
    if pre.is_file():
        try:
            settings = json.loads(pre.read_text())
            clusters = settings.get("clusters") if isinstance(settings, dict) else None
            palette = None if clusters is None else check_palette(clusters, pre)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{pre}: not a usable palette ({e})") from None
        if palette is not None and palette.shape != (cfg.vocab, 3):
            raise CheckpointError(f"{pre}: clusters {palette.shape} do not fit vocab {cfg.vocab}")
    return model, palette


def export_hf(model: ImageGPT, directory, palette=None) -> None:
    """Write a folder that transformers' ImageGPTForCausalImageModeling.from_pretrained loads."""
    cfg, d = model.config, Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.asarray(v, dtype=np.float32) for k, v in model.state_dict().items()}
    tensors["lm_head.weight"] = np.ascontiguousarray(tensors["lm_head.weight"].T)
    if not cfg.bias:  # HF's Conv1D always has a bias: zeros are the same function
        C = cfg.n_embd
        for i in range(cfg.n_layer):
            for name, n in (("attn.c_attn", 3 * C), ("attn.c_proj", C), ("mlp.c_fc", 4 * C),
                            ("mlp.c_proj", C)):
                tensors[f"transformer.h.{i}.{name}.bias"] = np.zeros(n, np.float32)
    write_safetensors(d / "model.safetensors", tensors, {"format": "pt"})
    hf_config = {
        "architectures": ["ImageGPTForCausalImageModeling"], "model_type": "imagegpt",
        "vocab_size": cfg.vocab + 1, "n_positions": cfg.n_ctx, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "quick_gelu", "layer_norm_epsilon": 1e-5,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": False,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
    }
    write_json(d / "config.json", hf_config)
    if palette is not None:
        pre = {"image_processor_type": "ImageGPTImageProcessor", "clusters": np.asarray(palette).tolist(),
               "do_resize": True, "size": {"height": cfg.n_px, "width": cfg.n_px},
               "resample": PIL_BOX,  # the box filter data.resize uses (the processor's own default is bilinear)
               "do_normalize": True, "do_color_quantize": True}
        write_json(d / "preprocessor_config.json", pre)
