"""Helpers shared by the test files: finite-difference gradients, image folders, the scripts as modules."""
from pathlib import Path

import numpy as np

from minigpt_img.tensor import Tensor, _topological_order


def numeric_grad(f, arrays, i, upstream, h=1e-5):
    """Central differences of  L = sum(f(*arrays) * upstream)  with respect to arrays[i], in place."""
    x = arrays[i]
    grad = np.zeros(x.shape)
    for idx in np.ndindex(*x.shape):
        old = x[idx]
        x[idx] = old + h
        plus = np.sum(f(*arrays) * upstream)
        x[idx] = old - h
        minus = np.sum(f(*arrays) * upstream)
        x[idx] = old
        grad[idx] = (plus - minus) / (2 * h)
    return grad


def relative_error(analytic, numeric):
    """max |a - n| / max(|a|, |n|, floor) elementwise, where floor = 1e-3 * max|n| ignores entries a
    thousand times below the gradient's own scale (there finite differences measure only noise)."""
    scale = max(np.abs(numeric).max(initial=0.0), 1e-12)
    denom = np.maximum(np.maximum(np.abs(analytic), np.abs(numeric)), 1e-3 * scale)
    return float(np.max(np.abs(analytic - numeric) / denom, initial=0.0))


def gradcheck(fn, arrays, seed=0, tol=1e-6):
    """Check fn's analytic gradients for every float64 input array against central differences.

    fn maps Tensors to a Tensor. The upstream gradient is RANDOM (not ones), so every output element
    is weighed differently. Returns (max relative error, set of Function types in the graph).
    """
    rng = np.random.default_rng(seed)
    for a in arrays:
        assert a.dtype == np.float64, "gradient checks run in float64"
    tensors = [Tensor(a, requires_grad=True) for a in arrays]
    out = fn(*tensors)
    assert out.dtype == np.float64, f"float64 in, {out.dtype} out"
    upstream = rng.standard_normal(out.shape)
    out.backward(upstream)

    def f(*xs):
        return fn(*[Tensor(x) for x in xs]).data

    worst = 0.0
    for i, t in enumerate(tensors):
        num = numeric_grad(f, arrays, i, upstream)
        assert t.grad is not None and t.grad.shape == arrays[i].shape, f"input {i}: no gradient"
        worst = max(worst, relative_error(t.grad, num))
    assert worst < tol, f"max relative error {worst:.3g} >= {tol}"
    ops_seen = {type(t._ctx) for t in _topological_order(out) if t._ctx is not None}
    return worst, ops_seen


def gradcheck_params(loss_fn, params, seed=0, tol=1e-6):
    """Check the gradients of a scalar-or-array loss_fn() (a closure over modules) with respect to
    each float64 parameter Tensor in `params`, perturbing the parameters in place."""
    upstream = np.random.default_rng(seed).standard_normal(loss_fn().shape)
    for p in params:
        assert p.dtype == np.float64 and p.requires_grad
        p.grad = None
    loss_fn().backward(upstream)
    worst = 0.0
    for p in params:
        num = numeric_grad(lambda *_: loss_fn().data, [p.data], 0, upstream)
        worst = max(worst, relative_error(p.grad, num))
    assert worst < tol, f"max relative error {worst:.3g} >= {tol}"
    return worst


def write_image_folder(root, per_class: int, n_classes: int = 3, step: int = 60, noise: int = 40,
                       seed: int = 0):
    """root/c<k>/<i>.png: per_class 8x8 PNGs per class, class k a flat grey of k * step plus uniform
    noise, so the classes differ in colour. Returns root."""
    from pathlib import Path

    from PIL import Image
    root, rng = Path(root), np.random.default_rng(seed)
    for c in range(n_classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.full((8, 8, 3), step * c, np.uint8) + rng.integers(0, noise, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / f"c{c}" / f"{i}.png")
    return root


def load_script(name: str):
    """A top-level script of the repository (train.py, sample.py ...) imported as a module."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"{name}_script", Path(__file__).resolve().parent.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cifar_bytes(images, labels, coarse=None):
    """Official CIFAR binary records: label byte(s), then the R, G, B planes row-major."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    lab = labels[:, None] if coarse is None else np.stack([coarse, labels], 1)
    return np.concatenate([lab.astype(np.uint8), planes], 1).tobytes()


def write_cifar10(root, n_per_batch=4, test=True, seed=0):
    """A cifar-10-batches-bin folder in the official format: five training batches of random images
    (and a test batch of three) -> (folder, training images, their labels)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    all_images, all_labels = [], []
    for i in range(1, 6):
        im = rng.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8)
        lab = rng.integers(0, 10, n_per_batch)
        (folder / f"data_batch_{i}.bin").write_bytes(cifar_bytes(im, lab))
        all_images.append(im)
        all_labels.append(lab)
    if test:
        (folder / "test_batch.bin").write_bytes(cifar_bytes(all_images[0][:3], all_labels[0][:3]))
    (folder / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n\n")
    return folder, np.concatenate(all_images), np.concatenate(all_labels)
