"""minigpt_img: Image GPT (Chen et al., "Generative Pretraining from Pixels", ICML 2020) in NumPy."""
from .tensor import Tensor, Function, no_grad

__all__ = ["Tensor", "Function", "no_grad"]
