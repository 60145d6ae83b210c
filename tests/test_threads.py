"""threads.FairShare: the thread count follows what other processes leave of the CPU."""
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from minigpt_img import threads


class FakeMachine:
    """/proc/stat and the clock under the test's control: `advance(wall, others, ours)` moves time
    on by `wall` seconds with other processes using `others` cores and this one `ours`."""

    def __init__(self, monkeypatch, tick=100):
        self.t, self.busy, self.own, self.tick = 0.0, 0, 0.0, tick
        self.calls = []
        monkeypatch.setattr(threads, "_cpu_jiffies", lambda cpus: self.busy)
        monkeypatch.setattr(threads, "_own_cpu_seconds", lambda: self.own)
        monkeypatch.setattr(threads.time, "monotonic", lambda: self.t)
        monkeypatch.setattr(threads, "set_threads", self.calls.append)

    def advance(self, wall, others, ours):
        self.t += wall
        self.own += ours * wall
        self.busy += int(round((others + ours) * wall * self.tick))


def test_fair_share_follows_the_load(monkeypatch):
    m = FakeMachine(monkeypatch)
    share = threads.FairShare(max_threads=2, interval=3.0, cores=2)
    share._tick = m.tick
    m.advance(1.0, others=1.0, ours=2.0)
    assert share.update() is None and m.calls == []          # not yet `interval` seconds
    m.advance(3.0, others=1.0, ours=1.0)                      # a busy single-threaded process
    assert share.update() == 1 and m.calls == [1] and share.threads == 1
    assert "1.0 of 2 cores busy" in share.describe()
    m.advance(3.0, others=1.0, ours=1.0)
    assert share.update() is None                             # unchanged: nothing set again
    m.advance(3.0, others=0.05, ours=1.0)                     # it finished
    assert share.update() == 2 and m.calls == [1, 2]
    m.advance(3.0, others=0.3, ours=2.0)                      # a light load keeps every thread
    assert share.update() is None
    m.advance(3.0, others=4.0, ours=0.5)                      # never below one thread
    assert share.update() == 1
    share.reset()
    assert m.calls[-1] == 2 and share.threads == 2


def test_fair_share_does_nothing_with_one_thread_or_off_linux(monkeypatch):
    m = FakeMachine(monkeypatch)
    share = threads.FairShare(max_threads=1, interval=0.0, cores=2)
    m.advance(5.0, others=2.0, ours=1.0)
    assert share.update() is None and m.calls == []
    monkeypatch.setattr(threads, "_cpu_jiffies", lambda cpus: None)
    share = threads.FairShare(max_threads=2, interval=0.0, cores=2)
    m.advance(5.0, others=2.0, ours=1.0)
    assert share.update() is None and m.calls == []


def test_set_threads_changes_numba_and_openblas_in_a_running_process():
    """In a fresh process started with 2 threads: after set_threads(1) both pools run 1 thread, and
    set_threads(2) brings NumPy's BLAS back to 2 while the kernels' own BLAS (SciPy's, which numba
    calls inside its threads) stays at 1 once serial_kernel_blas has set it."""
    code = textwrap.dedent("""
        from minigpt_img.threads import (configure, set_threads, serial_kernel_blas, _kernel_blas,
                                         _openblas_function, _openblas_libraries)
        configure(2)
        import numpy, numba, scipy.linalg
        def counts():
            return {p == _kernel_blas(): _openblas_function(p, "get_num_threads")() for p in _openblas_libraries()}
        set_threads(1)
        one = numba.get_num_threads(), counts()
        serial = serial_kernel_blas()
        set_threads(2)
        print(repr((one, serial, counts())))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    (numba_threads, one), serial, two = eval(out)
    assert numba_threads == 1 and one[False] == 1
    assert two == ({False: 2, True: 1} if serial else {False: 2})


@pytest.mark.skipif(not hasattr(threads.os, "sched_getaffinity"), reason="Linux /proc only")
def test_fair_share_sees_a_real_busy_process():
    import time
    share = threads.FairShare(max_threads=2, interval=0.0, cores=2)
    before = share._sample()
    time.sleep(1.5)
    quiet = share.others(before, share._sample())      # what the machine does without the loop
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        before = share._sample()
        time.sleep(1.5)
        after = share._sample()
    finally:
        busy.kill()
        busy.wait()
    assert share.others(before, after) - quiet > 0.5  # the busy loop adds about one core


@pytest.mark.parametrize("batch, lowered", [(2, False), (16, False), (16, True), (24, True)])
def test_a_decoding_step_runs_its_tiny_kernels_on_the_calling_thread_and_the_rest_on_numbas_pool(batch, lowered):
    """In a fresh process with 2 threads: inside a decoding step numba runs 1 thread for the norm (its
    tiny kernels never wake a pool), and the loops that read every weight or the whole cache (each
    sub-layer's, the head's product; attention over the cache when more than 16 rows go through the
    blocks' own forward) run on the count in effect when the KV cache was made: 2, or 1 after
    set_threads(1) (a FairShare or a user lowering it), never more. The count is the same again
    after the step; a prompt of many tokens keeps it, its matmuls through BLAS."""
    code = textwrap.dedent("""
        import json, numba, numpy as np
        from minigpt_img import attention, decode_kernels, threads
        from minigpt_img.model import GPTConfig, ImageGPT, KVCache
        seen = {"norm": [], "matmul": [], "attention": [], "mlp": [], "cache": []}
        cfg = GPTConfig(n_layer=1, n_embd=8, n_head=2, n_px=4, vocab=4)
        batch, lowered = %d, %s
        if lowered:
            threads.set_threads(1)
        m, cache = ImageGPT(cfg, np.random.default_rng(0)), KVCache(cfg, batch)
        norm = m.transformer.h[0].ln_1
        forward = norm.forward
        norm.forward = lambda x: seen["norm"].append(numba.get_num_threads()) or forward(x)
        def spy(module, name, key):
            kernel = getattr(module, name)
            def wrapped(*args):
                seen[key].append(numba.get_num_threads())
                return kernel(*args)
            setattr(module, name, wrapped)
        spy(decode_kernels, "few_rows_matmul", "matmul")
        spy(attention, "decode_layer", "attention")
        spy(decode_kernels, "few_rows_mlp", "mlp")
        spy(attention, "attention_decode", "cache")
        m.decode(np.full((batch, 9), 4), cache)
        assert seen["matmul"] == seen["attention"] == seen["mlp"] == seen["cache"] == [], seen
        m.decode(np.zeros((batch, 1), int), cache)
        print(json.dumps({**seen, "after": numba.get_num_threads()}))
    """) % (batch, lowered)
    env = {**threads.os.environ, "NUMBA_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    pool = 1 if lowered else 2
    assert seen["norm"] == [pool, 1] and seen["after"] == pool, seen
    if batch <= 16:                                                          # ImageGPT._step
        assert seen["matmul"] == [pool], seen                                # lm_head
        assert seen["attention"] == [pool] and seen["mlp"] == [pool] and seen["cache"] == [], seen
    else:                                                                    # the blocks' own forward
        assert seen["cache"] == [pool] and seen["attention"] == seen["mlp"] == [], seen


def test_products_of_many_rows_outside_the_graph_run_on_numbas_threads_and_a_training_forward_on_numpys_blas(
        monkeypatch):
    """Under no_grad (features, evaluation) every product of at least kernels.MANY_ROWS rows by a
    weight goes through kernels.rows_matmul, so the pass uses numba's pool only (NumPy's OpenBLAS
    threads, spinning for as long as they were told when NumPy loaded, never start); with the graph
    recorded, or fewer rows, none does. MANY_ROWS is lowered to this tiny model's 32 rows."""
    import numpy as np

    from minigpt_img import kernels, no_grad
    from minigpt_img.model import GPTConfig, ImageGPT
    calls = []
    rows_matmul = kernels.rows_matmul
    monkeypatch.setattr(kernels, "rows_matmul", lambda a, b: calls.append(a.shape) or rows_matmul(a, b))
    cfg = GPTConfig(n_layer=2, n_embd=8, n_head=2, n_px=4, vocab=4)
    model, tokens = ImageGPT(cfg, np.random.default_rng(0)), np.zeros((2, 16), int)   # 32 rows
    monkeypatch.setattr(kernels, "MANY_ROWS", 33)
    with no_grad():
        model(tokens)
    monkeypatch.setattr(kernels, "MANY_ROWS", 32)
    model(tokens)
    assert calls == []
    with no_grad():
        model(tokens)
    assert calls == [(32, 8), (32, 8), (32, 8), (32, 32)] * cfg.n_layer + [(32, 8)]  # the blocks' 4; lm_head


def test_configure_keeps_freed_memory_so_a_large_block_costs_no_page_faults_the_second_time():
    """In a fresh process: after configure(), allocating a 64 MB array again after freeing one maps
    no fresh pages (glibc: no page faults); without it, every allocation maps fresh ones."""
    code = textwrap.dedent("""
        import resource, sys
        from minigpt_img import threads
        if sys.argv[1] == "on":
            threads.configure()
        import numpy as np
        def faults():
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = np.ones(16 << 20, np.float32); del a
        before = faults()
        for _ in range(3):
            b = np.ones(16 << 20, np.float32); del b
        print((faults() - before) / 3)
    """)
    runs = {}
    for mode in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
        runs[mode] = float(out.stdout.split()[-1])
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc: malloc is left as it is")
    assert runs["on"] < 10 and runs["off"] > 100, runs


def test_configure_for_decoding_leaves_openmp_waiting_as_its_default_and_sample_py_asks_for_it():
    """Training and probing: numba's idle threads sleep at once (OMP_WAIT_POLICY=PASSIVE), leaving the
    cores to OpenBLAS's. Decoding (sample.py) calls no BLAS between its short parallel loops, so
    OpenMP's default wait is kept there; the BLAS spin setting applies to both."""
    code = textwrap.dedent("""
        import os
        from minigpt_img.threads import configure
        configure(decoding=True)
        decoding = os.environ.get("OMP_WAIT_POLICY"), os.environ.get("OPENBLAS_THREAD_TIMEOUT")
        configure()
        training = os.environ.get("OMP_WAIT_POLICY"), os.environ.get("OPENBLAS_THREAD_TIMEOUT")
        import sample
        asked = {}
        sample.run = lambda work, args, **kwargs: asked.update(kwargs) or 0
        sample.main([])
        print(repr((decoding, training, asked)))
    """)
    env = {k: v for k, v in os.environ.items() if k not in threads.SPIN_SETTINGS}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=env["PYTHONPATH"]).stdout
    decoding, training, asked = eval(out)
    assert decoding == (None, threads.SPIN_SETTINGS["OPENBLAS_THREAD_TIMEOUT"])
    assert training == (threads.SPIN_SETTINGS["OMP_WAIT_POLICY"], threads.SPIN_SETTINGS["OPENBLAS_THREAD_TIMEOUT"])
    assert asked == {"decoding": True}
