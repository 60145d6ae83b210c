"""§3.1 Datasets: loading, the train/validation split, resolution, augmentation, and token caching.

Every dataset gives uint8 images (N, H, W, 3) and int64 labels (N,), split as the paper does (§3.1:
"For CIFAR-10, CIFAR-100 and STL-10, we split off 10% of the provided training set"):
the official training set is shuffled with a seed and 10% held out for validation; the official test
set is used when its files are present.

    cifar10, cifar100   official *binary* versions (records: label byte(s) + 1024 R, 1024 G, 1024 B),
                        from the extracted folder or straight from the official .tar.gz; never unpickled
    stl10               official binary version (96x96, each channel stored column-major)
    streaks             binary lines in four directions (streaks.py): no files, the offline default
    shapes              procedurally drawn shapes (shapes.py): no files
    <folder>            one sub-folder of images per class (or train/ and test/ holding those)

Resolution (§3.2 downsampling): an area (box) filter to --res, applied only when --res differs from
the data's own size.

Augmentation (train.py's --augment):
    wrn    reflection-pad 4 pixels (scaled with the resolution), take a random crop of the original
           size, flip horizontally with probability 1/2: the Wide-ResNet augmentation the paper uses
           when fine-tuning on CIFAR (§3.1). Quantising is per pixel, so cropping and flipping token
           grids equals quantising augmented images: it runs on tokens (`augment`).
    crop   the paper's pre-training augmentation: a random square crop of the full-resolution image,
           downsampled to --res, then quantised (`random_resized_crops`). §3.1: "we randomly resize
           an image such that the shorter sidelength is in the range [256, 384] and then take a
           random 224 x 224 crop", crops of 224/384 to 224/256 (0.58 to 0.875) of the side;
           departure: here 3/4 of the side or more, up to the whole image.
    none
Pre-training defaults to crop and fine-tuning to wrn, as the paper (runconfig.BASE). `streaks` is
not augmented (runconfig.DATA_PRESETS): a flip turns one diagonal class into the other.
"""
from __future__ import annotations

import hashlib
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError
from .files import cached_array
from .shapes import CLASSES as SHAPE_CLASSES, make_shapes
from .streaks import CLASSES as STREAK_CLASSES, make_streaks
from .sizes import memory_problem
from .streams import generator


@dataclass
class Split:
    images: np.ndarray   # (N, H, W, 3) uint8
    labels: np.ndarray   # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    name: str
    classes: list
    train: Split
    val: Split
    test: Split | None   # None when the official test files are not present
    full_train: np.ndarray | None = None  # train's images before downsampling (load_dataset(full_train=True))

    @property
    def res(self) -> int:
        return self.train.images.shape[1]


# ---- the official binary formats ---------------------------------------------------------------
# name: (folder, archive, train files, test files, label bytes per record, which label byte, classes file)
BINARY = {
    "cifar10": ("cifar-10-batches-bin", "cifar-10-binary.tar.gz",
                [f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"], 1, 0,
                "batches.meta.txt"),
    "cifar100": ("cifar-100-binary", "cifar-100-binary.tar.gz", ["train.bin"], ["test.bin"], 2, 1,
                 "fine_label_names.txt"),
    "stl10": ("stl10_binary", "stl10_binary.tar.gz", ["train_X.bin", "train_y.bin"],
              ["test_X.bin", "test_y.bin"], None, None, "class_names.txt"),
}
N_CLASSES = {"cifar10": 10, "cifar100": 100, "stl10": 10}
# Images in each official file: a file cut at a record boundary still parses, so its count is checked.
OFFICIAL_RECORDS = {**{f"data_batch_{i}.bin": 10000 for i in range(1, 6)}, "test_batch.bin": 10000,
                    "train.bin": 50000, "test.bin": 10000, "train_X.bin": 5000, "test_X.bin": 8000}
MANIFESTS = {"SHA256SUMS": "sha256", "MD5SUMS": "md5"}  # checksum files verified when present


class _Source:
    """Reads member files of a dataset from its extracted folder or from its .tar.gz."""

    def __init__(self, name: str, data_dir: Path):
        folder, archive = BINARY[name][:2]
        candidates = [data_dir / folder, data_dir]
        self.folder = next((c for c in candidates if (c / BINARY[name][2][0]).is_file()), None)
        self.tar = None
        if self.folder is None and (data_dir / archive).is_file():
            try:
                self.tar = tarfile.open(data_dir / archive, "r:gz")
                self.members = {Path(m.name).name: m for m in self.tar.getmembers() if m.isfile()}
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DataError(f"{data_dir / archive} is damaged ({e}): delete it and download again "
                                f"(--download)") from None
        if self.folder is None and self.tar is None:
            raise DataError(f"{name} not found in {data_dir}: expected {data_dir / folder}/ or "
                            f"{data_dir / archive}; pass --data-dir, or --download to fetch it")
        self.where = str(self.folder or data_dir / archive)
        self.sums = {}  # member: (algorithm, hex digest) from a checksum file beside the data
        for manifest, algorithm in MANIFESTS.items():
            if self.has(manifest):
                for line in self.read(manifest).decode(errors="replace").splitlines():
                    parts = line.split()
                    if len(parts) == 2:
                        self.sums[Path(parts[1].lstrip("*")).name] = (algorithm, parts[0].lower())

    def has(self, member: str) -> bool:
        return (self.folder / member).is_file() if self.folder else member in self.members

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()

    def read(self, member: str) -> bytes:
        if not self.has(member):
            raise DataError(f"{self.where} has no {member}: the download is incomplete; "
                            "download the dataset again (--download)")
        try:
            if self.folder:
                raw = (self.folder / member).read_bytes()
            else:
                raw = self.tar.extractfile(self.members[member]).read()
        except (OSError, EOFError, tarfile.TarError) as e:
            raise DataError(f"cannot read {member} from {self.where} ({e}): the file is damaged; "
                            "download it again (--download)") from None
        if member in self.sums:
            algorithm, expected = self.sums[member]
            if hashlib.new(algorithm, raw).hexdigest() != expected:
                raise DataError(f"{self.where}/{member} does not match its {algorithm} checksum "
                                "file: it is damaged or changed; download it again (--download)")
        return raw


def _check_count(where: str, n: int, official: bool) -> None:
    expected = OFFICIAL_RECORDS.get(Path(where).name)
    if official and expected is not None and n != expected:
        raise DataError(f"{where} holds {n} images where the official file has {expected}: it is "
                        "truncated or not the official file; download it again (--download)")


def _cifar_records(raw: bytes, label_bytes: int, label_at: int, n_classes: int, where: str,
                   official: bool) -> Split:
    rec = label_bytes + 3072
    if len(raw) == 0 or len(raw) % rec:
        raise DataError(f"{where} has {len(raw)} bytes, not a whole number of {rec}-byte records: it "
                        "is truncated or not the binary version; download it again (--download)")
    _check_count(where, len(raw) // rec, official)
    a = np.frombuffer(raw, np.uint8).reshape(-1, rec)
    labels = a[:, label_at].astype(np.int64)
    if labels.max() >= n_classes:
        raise DataError(f"{where}: label {labels.max()} >= {n_classes}: not this dataset's binary file")
    images = a[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # R, G, B planes -> HWC
    return Split(np.ascontiguousarray(images), labels)


def _stl_split(src: _Source, x_file: str, y_file: str, official: bool) -> Split:
    raw_x, raw_y = src.read(x_file), src.read(y_file)
    size = 3 * 96 * 96
    if len(raw_x) % size or len(raw_x) // size != len(raw_y):
        raise DataError(f"{src.where}/{x_file} ({len(raw_x)} bytes) and {y_file} ({len(raw_y)} labels) "
                        "do not match: a file is truncated; download again (--download)")
    _check_count(f"{src.where}/{x_file}", len(raw_y), official)
    if len(raw_y) and not 1 <= min(raw_y) <= max(raw_y) <= 10:
        raise DataError(f"{src.where}/{y_file}: labels must be 1..10: not STL-10's label file")
    # each image is 3 planes of 96x96 stored column-major: (N, C, W, H) -> (N, H, W, C)
    images = np.frombuffer(raw_x, np.uint8).reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)
    return Split(np.ascontiguousarray(images), np.frombuffer(raw_y, np.uint8).astype(np.int64) - 1)


def _load_binary(name: str, data_dir: Path, official: bool):
    src = _Source(name, data_dir)
    try:
        return _read_binary(name, src, official)
    finally:
        src.close()


def _read_binary(name: str, src: _Source, official: bool):
    folder, archive, train_files, test_files, label_bytes, label_at, classes_file = BINARY[name]
    if name == "stl10":
        train = _stl_split(src, *train_files, official)
        test = _stl_split(src, *test_files, official) if all(src.has(f) for f in test_files) else None
    else:
        parts = [_cifar_records(src.read(f), label_bytes, label_at, N_CLASSES[name], f"{src.where}/{f}",
                                official) for f in train_files]
        train = Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))
        test = (_cifar_records(src.read(test_files[0]), label_bytes, label_at, N_CLASSES[name],
                               f"{src.where}/{test_files[0]}", official) if src.has(test_files[0]) else None)
    classes = [f"class {i}" for i in range(N_CLASSES[name])]
    if src.has(classes_file):
        names = [s for s in src.read(classes_file).decode().splitlines() if s.strip()]
        classes = names if len(names) == len(classes) else classes
    return classes, train, test


# ---- an image folder -----------------------------------------------------------------------
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


def _as_8bit(im, f: Path):
    """An image with 8 bits per channel: 16-bit greyscale scaled down (Pillow's own conversion clips
    it, and most pixels would become white); float images are refused (their range is unknown)."""
    if im.mode.startswith("I;16") or im.mode == "I":
        values = np.asarray(im, dtype=np.float64)                              # 0 .. 65535
        return Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        raise DataError(f"{f} holds floating-point pixels, whose range is not known: save it with 8 bits "
                        "per channel")
    return im


def _image_files(folder: Path) -> list:
    """The image files of a class folder, in order; anything but a regular file is refused (a FIFO
    named .png would block the read forever)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    for f in files:
        if not f.is_file():
            raise DataError(f"{f} is not a regular file: remove it from the image folder")
    return files


def _read_image(f: Path, res: int | None) -> np.ndarray:
    """One image file as (res, res, 3) uint8: centre square crop, then the box filter to res (the
    crop's own size when res is None). Images too large to decode safely are refused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                im = _as_8bit(im, f).convert("RGB")
                side = min(im.size)
                left, top = (im.width - side) // 2, (im.height - side) // 2
                im = im.crop((left, top, left + side, top + side))
                res = side if res is None else res
                if side < res:
                    raise DataError(f"{f} is {side}x{side} after cropping, smaller than --res {res}: "
                                    "choose a smaller --res or remove the image")
                if side != res:
                    im = im.resize((res, res), Image.BOX)
                return np.asarray(im, np.uint8)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise DataError(f"{f} has more pixels than an image may safely have ({Image.MAX_IMAGE_PIXELS:,}): "
                        "shrink it or remove it") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read image {f} ({type(e).__name__}): remove or replace it") from None


def _side(f: Path) -> int:
    """The side of an image file's centre square, from its header (no pixel is decoded)."""
    try:
        with Image.open(f) as im:
            return min(im.size)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read image {f} ({type(e).__name__}): remove or replace it") from None


def _read_folder(root: Path, classes: list, res: int | None, required: bool = True) -> Split | None:
    """Every image of root/<class>/ for the given classes. A class folder may be missing only
    where not `required` (a test/ folder need not hold every class); None if there is no image."""
    images, labels = [], []
    for label, cls in enumerate(classes):
        if not (root / cls).is_dir() and not required:
            continue
        files = _image_files(root / cls)
        if not files and required:
            raise DataError(f"{root / cls} holds no images: add some, or remove the empty class folder")
        for f in files:
            images.append(_read_image(f, res))
            labels.append(label)
    if not images:
        if not required:
            return None
        raise DataError(f"{root} holds no images in {', '.join(classes)}: put images in one sub-folder "
                        "per class")
    return Split(np.stack(images), np.asarray(labels, np.int64))


def _load_folder(root: Path, res: int | None):
    if not root.is_dir():
        raise DataError(f"unknown dataset '{root}': use streaks, shapes, cifar10, cifar100, stl10, or a "
                        "folder of class sub-folders")
    base = root / "train" if (root / "train").is_dir() else root
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name != "test")
    if not classes:
        raise DataError(f"{base} has no class sub-folders: put each class's images in its own folder")
    if res is None:  # every image at the smallest side any of them has (its centre square)
        folders = [base / c for c in classes] + [root / "test" / c for c in classes if (root / "test" / c).is_dir()]
        sides = [_side(f) for folder in folders for f in _image_files(folder)]
        res = min(sides) if sides else None
    train = _read_folder(base, classes, res)
    test = None
    if base != root and (root / "test").is_dir():
        unknown = sorted(p.name for p in (root / "test").iterdir() if p.is_dir() and p.name not in classes)
        if unknown:
            raise DataError(f"{root / 'test'} has classes that {base} has not ({', '.join(unknown[:3])}): "
                            "every test class needs training images")
        test = _read_folder(root / "test", classes, train.images.shape[1], required=False)
    return classes, train, test


# ---- resolution, split, augmentation -------------------------------------------------------
def resize(images: np.ndarray, res: int, name: str = "the data") -> np.ndarray:
    """Area (box) filter to res x res; untouched when already that size."""
    native = images.shape[1]
    if res == native:
        return images
    if res > native:
        raise DataError(f"--res {res} is larger than {name}'s {native}x{native} images: choose "
                        f"{native} or less")
    return np.stack([np.asarray(Image.fromarray(im).resize((res, res), Image.BOX)) for im in images])


def split_train_val(split: Split, seed: int, val_fraction: float = 0.1):
    """Seeded shuffle of the training set; the last val_fraction becomes validation (at least one
    image when val_fraction > 0, so every run can be evaluated)."""
    if val_fraction > 0 and len(split) < 2:
        raise DataError(f"{len(split)} training image: a run needs at least 2 (one to train on, one to "
                        "validate on); add images")
    order = generator(seed, "split").permutation(len(split))
    n_val = max(1, int(round(len(split) * val_fraction))) if val_fraction > 0 else 0
    tr, va = order[:len(split) - n_val], order[len(split) - n_val:]
    return Split(split.images[tr], split.labels[tr]), Split(split.images[va], split.labels[va])


PROCEDURAL = {"streaks": (STREAK_CLASSES, make_streaks), "shapes": (SHAPE_CLASSES, make_shapes)}


def check_present(name: str, data_dir) -> None:
    """Raise DataError (naming --data-dir and --download) when an official data set's files are not
    where load_dataset would read them: found before a run creates anything, not after."""
    if name in BINARY:
        _Source(name, _data_dir(name, data_dir)).close()


def _data_dir(name: str, data_dir) -> Path:
    """The folder an official data set is read from (--data-dir), which must be given."""
    if data_dir is None:
        raise DataError(f"{name}: no --data-dir says where its files are")
    return Path(data_dir)


def load_dataset(name: str, data_dir=None, res: int | None = None, seed: int = 0,
                 val_fraction: float = 0.1, procedural_size: int = 14000, official: bool = True,
                 full_train: bool = False) -> Dataset:
    """A dataset by name (or folder path), split into train / val (/ test), at resolution res.
    official=False accepts binary files with other record counts than the official ones (the tests'
    small files in the official formats). procedural_size: training images drawn for streaks or
    shapes (a fifth as many test images). full_train: also keep the training images as loaded,
    before downsampling, in the same order (--augment crop cuts its crops from them; the built-in
    sets are drawn at res). data_dir: where the official binary sets are (--data-dir); the built-in
    sets and folders do not read it."""
    if res is not None and res < 1:
        raise DataError(f"--res must be positive, got {res}")
    if not str(name).strip():
        raise DataError("--data names no data set: give streaks, shapes, cifar10, cifar100, stl10 or a folder")
    if name in PROCEDURAL:
        r = res or 32
        problem = memory_problem(3 * 4 * (procedural_size + procedural_size // 5) * r * r, f"{name} at {r}x{r}",
                                 "choose a smaller --res")
        if problem:
            raise DataError(problem)
        classes, draw = PROCEDURAL[name]
        train = Split(*draw(procedural_size, r, generator(seed, name, 0)))
        test = Split(*draw(max(procedural_size // 5, 10), r, generator(0, name, 1)))  # the same for every seed
        classes = list(classes)
    elif name in BINARY:
        classes, train, test = _load_binary(name, _data_dir(name, data_dir), official)
    else:
        classes, train, test = _load_folder(Path(name), res)
    native = train                                               # as loaded, before downsampling
    if full_train and name not in PROCEDURAL and name not in BINARY:
        native = _load_folder(Path(name), None)[1]               # folders were read at res: again
    if res is not None:
        train = Split(resize(train.images, res, name), train.labels)
        test = Split(resize(test.images, res, name), test.labels) if test is not None else None
    train, val = split_train_val(train, seed, val_fraction)
    full = split_train_val(native, seed, val_fraction)[0].images if full_train else None  # same split
    return Dataset(str(name), classes, train, val, test, full)


def augment(grids: np.ndarray, rng: np.random.Generator, pad: int | None = None) -> np.ndarray:
    """Random crop after reflection padding, and random horizontal flip, of (B, H, W, ...) grids
    (images or token grids): the Wide-ResNet augmentation of the paper's CIFAR fine-tuning. pad
    defaults to 4 pixels at 32x32, scaled with the resolution."""
    B, H, W = grids.shape[:3]
    pad = max(1, round(4 * H / 32)) if pad is None else pad
    widths = [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * (grids.ndim - 3)
    padded = np.pad(grids, widths, mode="reflect")
    oy = rng.integers(0, 2 * pad + 1, B)
    ox = rng.integers(0, 2 * pad + 1, B)
    flip = rng.random(B) < 0.5
    rows = oy[:, None] + np.arange(H)                                          # (B, H)
    cols = ox[:, None] + np.arange(W)                                          # (B, W)
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    return padded[np.arange(B)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_resized_crops(images: np.ndarray, res: int, rng: np.random.Generator,
                         smallest: float = 0.75) -> np.ndarray:
    """The paper's pre-training augmentation, lightweight random-resized crops: from each
    full-resolution image (B, S, S, 3) a square of side s, drawn uniformly from ceil(smallest * S)
    to S pixels, at a random place, box-filtered to (res, res). No padding, so no mirrored pixels;
    no flip. Departure: §3.1 resizes "such that the shorter sidelength is in the range [256, 384]"
    before a 224 crop, crops of 0.58 to 0.875 of the side; here smallest = 3/4 to the whole side
    (56-100% of the area), so that a 16x16 model sees some whole images.
    -> (B, res, res, 3) uint8"""
    B, S = images.shape[:2]
    side = rng.integers(max(1, int(np.ceil(smallest * S))), S + 1, B)       # (B,)
    top = rng.integers(0, S - side + 1)                                      # (B,) 0 .. S - side
    left = rng.integers(0, S - side + 1)
    return np.stack([np.asarray(Image.fromarray(im[t:t + k, l:l + k]).resize((res, res), Image.BOX))
                     for im, k, t, l in zip(images, side, top, left)])


# ---- quantised tokens, cached on disk ----------------------------------------------------------
def cached_tokens(images: np.ndarray, palette, cache_dir) -> np.ndarray:
    """palette.encode(images) as (N, H*W) uint16, kept in cache_dir under a hash of the images, the
    palette and the resolution, so a second run does not quantise again (files.cached_array: a file
    whose contents do not match its recorded digest is rebuilt)."""
    h = hashlib.sha256()
    h.update(np.asarray(images.shape).tobytes())
    h.update(np.ascontiguousarray(images).data)
    h.update(np.ascontiguousarray(palette.centers, dtype=np.float32).data)
    path = Path(cache_dir) / f"tokens-{h.hexdigest()[:24]}.npy"
    return cached_array(path, lambda: palette.encode(images).astype(np.uint16),
                        shape=(len(images), images.shape[1] * images.shape[2]), dtype=np.uint16)


def trained_on(run: dict, res: int, data: str | None = None, data_dir: str | None = None,
               where="the checkpoint") -> Dataset:
    """The dataset a train.py run (its saved settings `run`) was trained on, at resolution res and
    split with the run's seed, unless `data` / `data_dir` name another."""
    name = data or run.get("data")
    if name is None:
        raise DataError(f"{where} does not say which data it was trained on: pass --data")
    return load_dataset(name, data_dir or run.get("data_dir"), res=res, seed=run.get("seed", 0))
