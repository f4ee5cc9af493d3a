"""The run's metrics log: one JSON line per epoch in ``metrics.jsonl`` (and TensorBoard events
in ``tb/``), rebuilt from a checkpoint's history on resume."""

from __future__ import annotations

import json
from pathlib import Path

import jax

from jaxprune.files import append_text, naming_writes, write_text_atomic


class MetricsWriter:
    """Appends each epoch record to metrics.jsonl and TensorBoard (process 0 only).

    ``phase``: None for the main training phase, ``'finetune'`` for the fine-tuning phase
    (whose records are renumbered by ``relabel``). `rebuild` rewrites this phase's lines from a
    checkpoint's history (on resume), so an epoch whose checkpoint committed but whose line was
    lost to a kill is never missing, and none is duplicated."""

    def __init__(self, workdir: Path, phase: str | None = None, relabel=None):
        self.path = workdir / "metrics.jsonl"
        self.phase, self.relabel = phase, relabel or (lambda r: r)
        self.tb = None
        if jax.process_index() != 0:
            return
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tb"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            pass

    def __call__(self, record: dict) -> None:
        if jax.process_index() != 0:
            return
        record = self.relabel(record)
        append_text(self.path, json.dumps(record) + "\n")
        if self.tb is not None:
            step = int(record.get("epoch", 0)) + 1
            with naming_writes(self.path.parent / "tb"):
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k != "epoch":
                        self.tb.add_scalar(k, v, step)
                self.tb.flush()

    def rebuild(self, history: list[dict]) -> None:
        """Rewrites metrics.jsonl: this phase's lines become ``history`` (atomically)."""
        if jax.process_index() != 0:
            return
        others = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill
                if rec.get("phase") != self.phase:
                    others.append(line)
        mine = [json.dumps(self.relabel(h)) for h in history]
        lines = mine + others if self.phase is None else others + mine
        write_text_atomic(self.path, "".join(line + "\n" for line in lines))


def as_finetune_epoch(record: dict, main_epochs: int) -> dict:
    """A fine-tuning epoch's record as logged: numbered after the main run's epochs."""
    return dict(record, epoch=record["epoch"] + main_epochs, phase="finetune")
