"""The files of one training run, in its --out folder.

Not a paper section: bookkeeping around the §3.4 loop.

    ckpt.npz                   the latest checkpoint: weights, Adam's moments, step (checkpoint.py)
    metrics.jsonl              one JSON line per logged step ("train") and per evaluation ("eval")
    loss.png                   the training and validation loss against the step
    samples.png                pre-training: images sampled at the end
    best.npz                   fine-tuning: the weights of the best held-out accuracy so far
    finetune.json, accuracy.png  fine-tuning: the best checkpoint's score on the test set
    snapshots/step<N>.npz      with --snapshots: the weights at every evaluation (§4.2)
"""
from __future__ import annotations

import json
from pathlib import Path

from .files import FolderLock, open_append, remove_stale_temps, write_atomic
from .plots import line_chart


class RunFolder:
    def __init__(self, out):
        self.path = Path(out)
        self.ckpt = self.path / "ckpt.npz"
        self.best = self.path / "best.npz"
        self.metrics = self.path / "metrics.jsonl"
        self._lock = FolderLock(self.path)

    def lock(self) -> list:
        """Hold the folder for this process (files.FolderBusy if another live run has it), then
        remove the temporary files a killed writer left in it; returns those removed."""
        self._lock.acquire()
        return remove_stale_temps(self.path) + remove_stale_temps(self.path / "snapshots")

    def unlock(self) -> None:
        self._lock.release()

    def snapshot(self, step: int) -> Path:
        return self.path / "snapshots" / f"step{step:07d}.npz"

    def open_metrics(self, step: int):
        """metrics.jsonl for appending, after dropping the lines logged past `step`, the step the
        run (re)starts from: a run killed after its last checkpoint logged steps it will redo."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.metrics.exists():
            keep = [r for r in self.records() if r["step"] <= step]
            text = "".join(json.dumps(r) + "\n" for r in keep)
            write_atomic(self.metrics, lambda f: f.write(text.encode()))
        return open_append(self.metrics)

    @staticmethod
    def write(f, step: int, **record) -> None:
        f.write(json.dumps({"step": step, **record}) + "\n")
        f.flush()

    def records(self) -> list[dict]:
        """The records of metrics.jsonl; a line a crash tore mid-write (not JSON) is dropped."""
        out = []
        for line in self.metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and \
                    {"kind", "loss"} <= set(record):
                out.append(record)
        return out

    def plot_accuracy(self, title: str, chance: float, evaluated: str = "validation") -> None:
        """accuracy.png: the "eval" records' accuracy against the step (fine-tuning), on the
        `evaluated` images."""
        pts = [(r["step"], 100 * r["acc"]) for r in self.records() if r["kind"] == "eval" and "acc" in r]
        if pts:
            line_chart({f"{evaluated} accuracy": tuple(zip(*pts))}, self.path / "accuracy.png", title=title,
                       xlabel="step", ylabel="accuracy %", hlines={f"chance {chance:.1f}%": chance},
                       ylim=(0, 100))

    def plot_loss(self, title: str, ylabel: str, hlines: dict, evaluated: str = "validation") -> None:
        """loss.png: the "train" and "eval" records' loss against the step (eval: on the `evaluated`
        images)."""
        records = self.records()
        series = {}
        for kind, label in (("train", "train"), ("eval", evaluated)):
            pts = [(r["step"], r["loss"]) for r in records if r["kind"] == kind]
            if pts:
                series[label] = tuple(zip(*pts))
        if series:
            line_chart(series, self.path / "loss.png", title=title, xlabel="step", ylabel=ylabel,
                       hlines=hlines)
