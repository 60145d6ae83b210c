"""The same Image GPT in PyTorch, for `bench.py --compare-torch` only (torch is never a dependency).

Same shapes and math as minigpt_img.model: iGPT norm (x / sqrt(mean(x^2) + 1e-5) * g), gelu2, fused
qkv without biases, scaled_dot_product_attention (causal), untied head over the palette, AdamW with
beta2 0.95 and no weight decay. Written as a PyTorch user would for speed: the norm is F.rms_norm
(one fused op), AdamW is the fused implementation where this build has it, and with compile=True
the model goes through torch.compile (which needs a C compiler on the machine).
"""
import torch
import torch.nn.functional as F
from torch import nn


class Norm(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(C))

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight, eps=1e-5)


class Block(nn.Module):
    def __init__(self, C, NH):
        super().__init__()
        self.NH = NH
        self.ln_1, self.ln_2 = Norm(C), Norm(C)
        self.c_attn = nn.Linear(C, 3 * C, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)
        self.c_fc = nn.Linear(C, 4 * C, bias=False)
        self.mlp_proj = nn.Linear(4 * C, C, bias=False)

    def forward(self, h):
        B, T, C = h.shape
        q, k, v = self.c_attn(self.ln_1(h)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.NH, C // self.NH).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        h = h + self.c_proj(a)
        x = self.c_fc(self.ln_2(h))
        return h + self.mlp_proj(x * torch.sigmoid(1.702 * x))


class TorchImageGPT(nn.Module):
    def __init__(self, n_layer, n_embd, n_head, n_ctx, vocab):
        super().__init__()
        self.wte = nn.Embedding(vocab + 1, n_embd)
        self.wpe = nn.Parameter(torch.randn(n_ctx, n_embd) * 0.01)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = Norm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx):
        h = self.wte(idx) + self.wpe[: idx.shape[1]]
        for block in self.h:
            h = block(h)
        return self.lm_head(self.ln_f(h))


class TorchStep:
    """One training step (forward, backward, AdamW) or one forward pass, on fixed tokens."""

    def __init__(self, cfg, batch, threads, seed=0, compile=False):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        self.model = TorchImageGPT(cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_ctx, cfg.vocab)
        params = list(self.model.parameters())
        try:
            self.opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
        except (RuntimeError, TypeError):  # a build without fused CPU AdamW
            self.opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0)
        if compile:
            self.model = torch.compile(self.model)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, cfg.vocab, (batch, cfg.n_ctx), generator=g)
        self.inputs = torch.cat([torch.full((batch, 1), cfg.vocab), self.x[:, :-1]], dim=1)

    def train_step(self):
        logits = self.model(self.inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.x.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def forward(self):
        with torch.inference_mode():
            self.model(self.inputs)
