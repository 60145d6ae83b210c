"""minigpt_img: Image GPT (Chen et al., "Generative Pretraining from Pixels", ICML 2020) in NumPy.

Importing the package loads nothing heavy until a name is used, so scripts can set thread options
(minigpt_img.threads) before NumPy starts.
"""
__all__ = ["Tensor", "Function", "no_grad"]


def __getattr__(name):
    if name in __all__:
        from . import tensor
        return getattr(tensor, name)
    raise AttributeError(f"module 'minigpt_img' has no attribute {name!r}")
