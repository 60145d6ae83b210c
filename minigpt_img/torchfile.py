"""A PyTorch state dict file (pytorch_model.bin) read without torch and without running its pickle.

Not a paper section: how OpenAI's released weights are published on the Hugging Face hub.

torch.save writes a zip archive: <name>/data.pkl, a pickle of the state dict whose tensors are
calls of torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...), and <name>/data/<key>,
each storage's raw little-endian bytes (stored, not compressed). A pickle can call anything it
names, so it is read by an unpickler that knows only what a plain state dict needs:

    collections.OrderedDict                 the dict (and the unused backward hooks)
    torch._utils._rebuild_tensor_v2         a tensor: a strided view of a storage
    torch.<Type>Storage                     the storage types (float, half, bfloat16, int, bool ...)

Anything else it names (os.system, any other global) is refused before anything is built or called.
Every size is checked before it is used: members against the limit, compression refused (a zip
bomb needs it), each storage's bytes against its element count, each tensor's view against its
storage. bfloat16 is widened to float32.
"""
from __future__ import annotations

import pickle
import zipfile
from collections import Counter, OrderedDict

import numpy as np

from .errors import CheckpointError

STORAGES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": "bf16",
            "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
            "ByteStorage": "u1", "BoolStorage": "?"}


class _Storage:
    """A storage the pickle refers to: its dtype, its key in the archive and its element count."""

    def __init__(self, dtype: str, key: str, numel: int):
        self.dtype, self.key, self.numel = dtype, key, numel


class _Tensor:
    """A tensor the pickle builds: a strided view of a storage, read once the pickle is done."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    for v in (offset, *size, *stride):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise pickle.UnpicklingError(f"a tensor's offset, size and stride must be whole numbers, not {v!r}")
    if not isinstance(storage, _Storage) or len(size) != len(stride):
        raise pickle.UnpicklingError("a tensor without a storage, or sizes and strides that do not pair")
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0
    if extent > storage.numel:
        raise pickle.UnpicklingError(f"a tensor reaches element {extent} of a storage of {storage.numel}")
    return _Tensor(storage, offset, tuple(size), tuple(stride))


class _StateDictUnpickler(pickle.Unpickler):
    ALLOWED = {("collections", "OrderedDict"): OrderedDict,
               ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2}

    def find_class(self, module, name):
        if module == "torch" and name in STORAGES:
            return name
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a state dict does not need")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[1] in STORAGES
                and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
            raise pickle.UnpicklingError(f"an unknown persistent id {pid!r}")
        return _Storage(STORAGES[pid[1]], pid[2], pid[4])


def _c_strides(size: tuple) -> tuple:
    """The element strides of a C-ordered (row-major) array of this shape."""
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _read_storage(z: zipfile.ZipFile, member, s: _Storage) -> np.ndarray:
    """A storage's elements (s.numel,) as a writable array read straight into its own buffer
    (bfloat16 widened to float32), after its size is checked against the element count."""
    itemsize = 2 if s.dtype == "bf16" else np.dtype(s.dtype).itemsize
    if member is None or member.file_size != s.numel * itemsize:
        raise ValueError(f"storage {s.key}: {s.numel} elements, but its data "
                         f"{'is missing' if member is None else f'holds {member.file_size} bytes'}")
    buf = bytearray(member.file_size)
    with z.open(member) as f:
        if f.readinto(buf) != len(buf):
            raise EOFError(f"storage {s.key} ends early")
    raw = np.frombuffer(buf, dtype="<u2" if s.dtype == "bf16" else s.dtype)
    return (raw.astype(np.uint32) << 16).view(np.float32) if s.dtype == "bf16" else raw


def read_torch_state(path, max_bytes: int) -> dict:
    """{name: array} of a torch.save'd state dict, read as the module docstring says; anything a
    plain state dict does not hold is refused with CheckpointError. max_bytes: the most its storages
    may hold in all (the caller's memory check)."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = {i.filename: i for i in z.infolist()}
            pickles = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise ValueError("no single <name>/data.pkl: not a file torch.save wrote")
            root = pickles[0][:-len("data.pkl")]
            if infos[pickles[0]].file_size > 64 << 20:
                raise ValueError(f"a {infos[pickles[0]].file_size}-byte pickle: far larger than a state dict's")
            if sum(i.file_size for i in infos.values()) > max_bytes:
                raise ValueError(f"it unpacks to more than the {max_bytes:,} bytes its model may take")
            if any(i.compress_type != zipfile.ZIP_STORED for i in infos.values()):
                raise ValueError("compressed members (torch.save stores its data uncompressed)")
            state = _StateDictUnpickler(z.open(pickles[0])).load()
            if not isinstance(state, dict) or not all(isinstance(v, _Tensor) for v in state.values()):
                raise ValueError("the pickle holds something other than a dict of tensors")
            # Each storage is read once and let go after its last tensor: a tensor that is the whole of
            # a storage no other tensor uses is that storage's array (no copy), any other is copied out.
            # So the weights are in memory once, plus one storage at a time.
            users = Counter(t.storage.key for t in state.values())
            out, storages = {}, {}
            for name, t in state.items():
                s = t.storage
                if s.key not in storages:
                    storages[s.key] = _read_storage(z, infos.get(f"{root}data/{s.key}"), s)
                flat = storages[s.key]
                whole = t.offset == 0 and int(np.prod(t.size)) == s.numel and t.stride == _c_strides(t.size)
                if whole and users[s.key] == 1:
                    out[str(name)] = flat.reshape(t.size)
                else:
                    view = np.lib.stride_tricks.as_strided(flat[t.offset:], shape=t.size,
                                                           strides=[st * flat.itemsize for st in t.stride])
                    out[str(name)] = np.array(view)
                users[s.key] -= 1
                if users[s.key] == 0:
                    del storages[s.key]
            return out
    except (zipfile.BadZipFile, pickle.UnpicklingError, ValueError, EOFError, KeyError, TypeError,
            AttributeError, IndexError, OSError) as e:
        raise CheckpointError(f"{path} is not a usable pytorch_model.bin ({type(e).__name__}: {e}); nothing in "
                              "it was run") from None
