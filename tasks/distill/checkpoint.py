"""Mid-stage checkpoints and the held-out plateau monitor (early stop, best model kept).

Why checkpoints inside a stage: the run folder resumes *between* stages, but one KD stage can
run for hours on a CPU; a kill at step 900 of 1000 should cost minutes, not the stage. Every
`checkpoint_every` steps the student, the trainable KD extras (projections), AdamW and scheduler
state, the loop position and the RNG states go to `<stage>/checkpoint/state.pt` (written to a
temp file, then renamed). A checkpoint is used only when its fingerprint (config + student +
teacher + seed) matches, so a changed recipe never resumes from a stale one. Resuming replays
nothing: the data cursor is stored, so the resumed run sees the same batches in the same order
and ends with the same weights as an uninterrupted one.

Why a monitor: KD on a small budget can start overfitting the training slice; held-out KL says
when. The monitor keeps the best held-out weights on disk and asks the loop to stop after
`patience` evaluations without an improvement of at least `min_delta`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import torch

from tasks.core.common import write_json_atomic


def _base(model):
    return getattr(model, "module", model)


def _save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def run_fingerprint(config: dict, *parts: str) -> str:
    """What must match for a checkpoint to be resumed: the stage config and its inputs."""
    text = json.dumps({"config": config, "parts": list(parts)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class PlateauMonitor:
    """Track held-out KL; keep the best weights; say when it has stopped improving."""

    def __init__(self, patience: int = 0, min_delta: float = 0.0, best_path: Path | None = None
                 ) -> None:
        self.patience, self.min_delta, self.best_path = patience, min_delta, best_path
        self.best_kl = float("inf")
        self.best_step = -1
        self.bad = 0
        self.stopped_at: int | None = None

    def update(self, step: int, kl: float, model) -> bool:
        """Record one evaluation; True when the loop should stop early."""
        if kl < self.best_kl - self.min_delta:
            self.best_kl, self.best_step, self.bad = kl, step, 0
            if self.best_path is not None:
                _save({k: v.detach().cpu().clone() for k, v in _base(model).state_dict().items()},
                      self.best_path)
        else:
            self.bad += 1
        stop = self.patience > 0 and self.bad >= self.patience
        if stop:
            self.stopped_at = step
        return stop

    def restore_best(self, model, final_step: int) -> bool:
        """Load the best weights into `model` if they are not the final ones; True if loaded."""
        if self.best_path is None or self.best_step in (-1, final_step) \
                or not self.best_path.is_file():
            return False
        _base(model).load_state_dict(torch.load(self.best_path, weights_only=True))
        return True

    def summary(self) -> dict[str, Any]:
        return {"early_stopped": self.stopped_at is not None, "stopped_at_step": self.stopped_at,
                "best_step": self.best_step, "best_heldout_kl": self.best_kl}

    def state_dict(self) -> dict[str, Any]:
        return {"best_kl": self.best_kl, "best_step": self.best_step, "bad": self.bad,
                "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_kl, self.best_step = state["best_kl"], state["best_step"]
        self.bad, self.stopped_at = state["bad"], state["stopped_at"]


class Checkpointer:
    """Save/restore everything the training loop needs to continue exactly where it stopped."""

    def __init__(self, folder: Path, every: int, fingerprint: str, extra: dict | None = None
                 ) -> None:
        self.folder, self.every, self.fingerprint = Path(folder), every, fingerprint
        self.extra = extra if extra is not None else {}  # objects with state_dict(), e.g. monitor
        self.resumed_from: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / "state.pt"

    def due(self, step: int, steps: int) -> bool:
        return self.every > 0 and step % self.every == 0 and step < steps

    def save(self, step: int, loop: dict[str, Any], student, engine, opt, sched) -> None:
        state = {
            "fingerprint": self.fingerprint,
            "step": step,
            "loop": loop,
            "model": _base(student).state_dict(),
            "engine": engine.state_dict() if engine is not None else {},
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "extra": {name: obj.state_dict() for name, obj in self.extra.items()},
        }
        _save(state, self.path)
        # atomic too: a kill mid-write must not leave a sidecar that `matches` cannot parse
        write_json_atomic(self.folder / "state.json", {"fingerprint": self.fingerprint,
                                                       "step": step})

    def matches(self) -> bool:
        """A resumable checkpoint for this exact run exists (read from a small sidecar)."""
        sidecar = self.folder / "state.json"
        if not (sidecar.is_file() and self.path.is_file()):
            return False
        return json.loads(sidecar.read_text()).get("fingerprint") == self.fingerprint

    def load(self, student, engine, opt, sched) -> dict[str, Any] | None:
        """Restore a matching checkpoint; returns its loop state (step, cursor, ...) or None."""
        if not self.path.is_file():
            return None
        state = torch.load(self.path, weights_only=False)  # our own file: RNG tuples, dicts
        if state.get("fingerprint") != self.fingerprint:
            return None
        _base(student).load_state_dict(state["model"])
        if engine is not None:
            engine.load_state_dict(state["engine"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        for name, obj in self.extra.items():
            if name in state["extra"]:
                obj.load_state_dict(state["extra"][name])
        self.resumed_from = state["step"]
        return {"step": state["step"], **state["loop"]}

    def clear(self) -> None:
        """Remove the checkpoint once the stage has finished (the saved model supersedes it)."""
        for name in ("state.pt", "state.json", "best.pt"):
            (self.folder / name).unlink(missing_ok=True)


class ListState:
    """A list saved in a checkpoint in place (the held-out rows the stage has collected)."""

    def __init__(self, items: list) -> None:
        self.items = items

    def state_dict(self) -> dict[str, Any]:
        return {"items": list(self.items)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.items[:] = state["items"]
