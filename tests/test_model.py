"""§2.2/§3.3: the Image GPT model: shapes, names, init, causality, KV cache, sizes, learning."""
import numpy as np
import pytest

from minigpt_img import no_grad, ops
from minigpt_img.model import GPTConfig, ImageGPT, KVCache
from minigpt_img.optim import Adam
from minigpt_img.sizes import PAPER_PARAMS, SIZES, config_for, count_parameters

from helpers import gradcheck_params

TINY = GPTConfig(n_layer=2, n_embd=16, n_head=2, n_px=4, vocab=7)


def tokens(cfg, B, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab + 1, (B, cfg.n_ctx))


def test_hugging_face_parameter_names_and_shapes():
    m = ImageGPT(TINY, np.random.default_rng(0))
    shapes = {n: p.shape for n, p in m.named_parameters()}
    C, V = TINY.n_embd, TINY.vocab
    assert shapes["transformer.wte.weight"] == (V + 1, C)
    assert shapes["transformer.wpe.weight"] == (TINY.n_ctx, C)
    assert shapes["transformer.h.1.attn.c_attn.weight"] == (C, 3 * C)
    assert shapes["transformer.h.0.attn.c_proj.weight"] == (C, C)
    assert shapes["transformer.h.0.mlp.c_fc.weight"] == (C, 4 * C)
    assert shapes["transformer.h.0.mlp.c_proj.weight"] == (4 * C, C)
    assert shapes["transformer.h.0.ln_1.weight"] == shapes["transformer.ln_f.weight"] == (C,)
    assert shapes["lm_head.weight"] == (C, V)
    assert len(shapes) == 2 + TINY.n_layer * 6 + 2
    assert not any(n.endswith("bias") for n in shapes)


def test_initialisation_follows_released_igpt():
    cfg = GPTConfig(n_layer=4, n_embd=64, n_head=4, n_px=16, vocab=32)
    p = dict(ImageGPT(cfg, np.random.default_rng(0)).named_parameters())
    std = {n: float(t.data.std()) for n, t in p.items()}
    assert std["transformer.wte.weight"] == pytest.approx(0.02, rel=0.1)
    assert std["transformer.wpe.weight"] == pytest.approx(0.01, rel=0.1)
    assert std["transformer.h.0.attn.c_attn.weight"] == pytest.approx(64 ** -0.5, rel=0.1)
    assert std["transformer.h.3.attn.c_proj.weight"] == pytest.approx((64 * 4) ** -0.5, rel=0.1)
    assert std["transformer.h.0.mlp.c_proj.weight"] == pytest.approx(0.02, rel=0.1)
    assert np.all(p["lm_head.weight"].data == 0)
    assert np.all(p["transformer.ln_f.weight"].data == 1)
    # seeded: the same Generator seed gives the same model
    q = dict(ImageGPT(cfg, np.random.default_rng(0)).named_parameters())
    assert all(np.array_equal(p[n].data, q[n].data) for n in p)


def test_forward_shapes_and_features():
    m = ImageGPT(TINY, np.random.default_rng(0))
    x = tokens(TINY, 3)
    logits, feats = m.forward_features(x)
    assert logits.shape == (3, TINY.n_ctx, TINY.vocab) and logits.dtype == np.float32
    assert len(feats) == TINY.n_layer + 1 and all(f.shape == (3, TINY.n_ctx, 16) for f in feats)
    # n^0 = norm(h^0) with h^0 = W_te[x] + W_pe, and the logits are n^L W_head
    h0 = m.transformer.wte.weight.data[x] + m.transformer.wpe.weight.data
    n0 = h0 / np.sqrt(np.mean(h0 ** 2, axis=-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(feats[0].data, n0, rtol=1e-5, atol=1e-6)
    # the same pass as the plain forward (the whole pass is checked against reference.py in
    # test_reference.py)
    np.testing.assert_array_equal(m(x).data, logits.data)


def test_a_forward_pass_without_gradients_keeps_no_features():
    """forward (and decode) let each n^l go once the next block has read it: the pass's peak
    (NumPy's allocations, traced) stays far below the L + 1 features that forward_features keeps."""
    import tracemalloc
    cfg = GPTConfig(n_layer=48, n_embd=32, n_head=2, n_px=16, vocab=8)
    m = ImageGPT(cfg, np.random.default_rng(0))
    x = tokens(cfg, 2)
    features_bytes = (cfg.n_layer + 1) * x.size * cfg.n_embd * 4                 # 49 x (2, 256, 32) float32: 3.2 MB
    with no_grad():
        m(x[:, :8])                                                               # kernels compiled
        tracemalloc.start()
        try:
            m(x)
            forward_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            m.forward_features(x)
            features_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert features_peak > features_bytes                                         # the check can see them
    assert forward_peak < features_bytes / 2, (forward_peak, features_bytes)


def test_causality_ar_and_not_bert():
    cfg = GPTConfig(n_layer=2, n_embd=16, n_head=2, n_px=5, vocab=7)
    m = ImageGPT(cfg, np.random.default_rng(0))
    m.lm_head.weight.data = np.random.default_rng(1).standard_normal((16, 7)).astype(np.float32)
    x = tokens(cfg, 2)
    base = m(x).data
    for t in [0, 1, 12, cfg.n_ctx - 1]:
        y = x.copy()
        y[:, t] = (y[:, t] + 1) % (cfg.vocab + 1)
        changed = m(y).data
        np.testing.assert_array_equal(changed[:, :t], base[:, :t])  # never changes earlier logits
        assert not np.allclose(changed[:, t], base[:, t])
    y = x.copy()
    y[:, -1] = (y[:, -1] + 1) % (cfg.vocab + 1)
    assert not np.allclose(m(y, causal=False).data[:, 0], m(x, causal=False).data[:, 0])


def test_bert_input_mask_zeroes_token_embeddings_only():
    m = ImageGPT(TINY, np.random.default_rng(0))
    x = tokens(TINY, 2)
    mask = np.zeros_like(x, dtype=bool)
    mask[:, 3] = True
    _, f1 = m.forward_features(x, causal=False, input_mask=mask)
    y = x.copy()
    y[:, 3] = (y[:, 3] + 2) % TINY.vocab
    _, f2 = m.forward_features(y, causal=False, input_mask=mask)
    np.testing.assert_array_equal(f1[0].data, f2[0].data)  # the masked token is invisible
    # ... but its position is not: h^0 there is the position embedding alone, n^0 = norm(W_pe[3])
    from minigpt_img.reference import norm
    wpe, g = m.transformer.wpe.weight.data[3], m.transformer.h[0].ln_1.weight.data
    np.testing.assert_allclose(f1[0].data[:, 3], np.broadcast_to(norm(wpe, g), (2, len(wpe))), rtol=1e-5)
    assert np.abs(wpe).max() > 1e-3  # a zeroed position embedding would give n^0 = 0 there


@pytest.mark.parametrize("batch,bias", [(3, False), (3, True), (9, False), (17, False)])
def test_kv_cache_equals_full_forward(batch, bias):
    """A prefix at once, then steps of one token and of two: through decode's own step (at most 16
    rows: batch 3; batch 9's one-token steps) and through the blocks' forward (batch 9's two-token
    step, batch 17), with and without biases."""
    cfg = GPTConfig(n_layer=3, n_embd=32, n_head=4, n_px=9, vocab=11, bias=bias)  # 81 > one tile
    m = ImageGPT(cfg, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    for name, p in m.named_parameters():
        if name.endswith("bias") or name == "lm_head.weight":
            p.data = rng.standard_normal(p.shape).astype(np.float32) * 0.5
    x = tokens(cfg, batch)
    with no_grad():
        full = m(x).data
        cache = KVCache(cfg, batch=batch)
        steps = [m.decode(x[:, :5], cache).data]          # a prefix at once (completions)
        steps.append(m.decode(x[:, 5:7], cache).data)     # two tokens per image
        for t in range(7, cfg.n_ctx):
            steps.append(m.decode(x[:, t:t + 1], cache).data)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceed the context"):
        m.decode(x[:, :1], cache)


def test_bad_inputs():
    m = ImageGPT(TINY, np.random.default_rng(0))
    with pytest.raises(ValueError, match="tokens must lie"):
        m(np.full((1, 4), TINY.vocab + 1))
    with pytest.raises(ValueError, match="exceed the context"):
        m(np.zeros((1, TINY.n_ctx + 1), dtype=int))
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=4)
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        config_for("huge", 32)


@pytest.mark.parametrize("size", ["s", "m", "l"])
def test_parameter_counts_match_the_paper(size):
    assert count_parameters(config_for(size, 32)) == pytest.approx(PAPER_PARAMS[size], rel=0.01)


@pytest.mark.parametrize("bias", [False, True])
def test_count_parameters_formula_matches_the_model(bias):
    cfg = GPTConfig(n_layer=3, n_embd=24, n_head=3, n_px=5, vocab=9, bias=bias)
    assert ImageGPT(cfg, np.random.default_rng(0)).num_parameters() == count_parameters(cfg)
    assert set(SIZES) >= {"nano", "micro", "mini", "s", "m", "l", "xl"}


def test_whole_model_gradient_float64():
    cfg = GPTConfig(n_layer=1, n_embd=8, n_head=2, n_px=2, vocab=5, bias=True)
    rng = np.random.default_rng(0)
    m = ImageGPT(cfg, rng, dtype=np.float64)
    for p in m.parameters():  # away from the init's zeros and ones, so every path carries gradient
        p.data = p.data + rng.standard_normal(p.shape) * 0.3
    x = tokens(cfg, 2)
    mask = np.array([[True, False, False, True], [False, True, False, False]])
    gradcheck_params(lambda: ops.cross_entropy(m(x), x % cfg.vocab), m.parameters())
    gradcheck_params(lambda: m(x, causal=False, input_mask=mask), m.parameters())


def test_tiny_model_overfits_one_batch():
    cfg = GPTConfig(n_layer=2, n_embd=32, n_head=2, n_px=4, vocab=8)
    m = ImageGPT(cfg, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    x = rng.integers(0, cfg.vocab, (4, cfg.n_ctx))
    inputs = np.concatenate([np.full((4, 1), cfg.sos), x[:, :-1]], axis=1)
    # The first pixel follows the same SOS in every row: it cannot be memorised (log 4 nats), so it
    # is left out of the loss; every later pixel has a context that identifies its row.
    weights = np.ones(x.shape)
    weights[:, 0] = 0.0
    opt = Adam(m.parameters(), lr=3e-3)
    for _ in range(300):
        loss = ops.cross_entropy(m(inputs), x, weights=weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()  # from log(8) = 2.08 nats


def test_default_batch_by_size():
    from minigpt_img.sizes import default_batch
    from minigpt_img.runconfig import resolve_config
    assert [default_batch(s) for s in ("nano", "micro", "mini", "s", "m")] == [16, 16, 8, 4, 1]
    assert resolve_config({"size": "s", "data": "cifar10"}, resume=False).batch_size == 4
    assert resolve_config({"size": "s", "batch_size": 2}, resume=False).batch_size == 2
    assert resolve_config({"size": "s", "data": "streaks"}, resume=False).batch_size == 8  # the preset first
    assert resolve_config({"size": "s"}, resume=False).batch_size == 4  # the paper's sizes: CIFAR-10
