"""The learning-rate schedule of §3.1: divide by 10 when validation accuracy stops improving, three times, then stop.

The paper: "The learning rate was initially set to 10⁻², and then decreased by a factor of 10 when the validation
set accuracy stopped improving. In total, the learning rate was decreased 3 times, and the learning was stopped
after 370K iterations (74 epochs)." It does not say how a plateau is detected; our rule, applied once per epoch
to the validation top-1 error:

1. An epoch improves if its top-1 error is strictly below the best seen so far in the run (the best is kept
   across decays, as torch's ReduceLROnPlateau does). Otherwise it is a bad epoch (NaN is always bad).
2. After `patience` consecutive bad epochs (0 acts as 1: an improving epoch is never a plateau) the lr is divided
   by 10 (`lr_decay`) and the count restarts — while fewer than `max_decays` decays have happened.
3. Once `max_decays` decays have happened, the next plateau (again `patience` consecutive bad epochs at the
   final lr) stops training instead of decaying a fourth time. Training also stops after `max_epochs` epochs.

`train.decay_at` replaces the rule by fixed decays (a departure the small profile makes; docs/protocol.md says
why): after epoch ceil(f · max_epochs) for each fraction f, the lr is divided by `lr_decay`, and the run ends at
`max_epochs`; (0.6, 0.9) over 10 epochs is 6 epochs at lr, 3 at lr/10 and 1 at lr/100. A run capped long before
it converges otherwise ends at whatever lr noise on the validation set left it with, so its error says more about
when the rule fired than about the architecture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from vgg.config import TrainConfig

StopReason = Literal["plateau", "max_epochs"]


class PlateauSchedule:
    """Epoch-level plateau schedule; `state_dict()` holds only primitives so resume is exact."""

    def __init__(
        self, *, lr: float, decay: float, patience: int, max_decays: int, max_epochs: int,
        decay_at: Sequence[float] = (),
    ) -> None:
        self.initial_lr = lr
        self.decay = decay
        self.patience = max(patience, 1)
        self.max_decays = max_decays
        self.max_epochs = max_epochs
        self.decay_at = tuple(decay_at)
        self.epochs = 0  # validation results seen (= epochs trained)
        self.decays = 0
        self.best = math.inf  # best validation top-1 error so far, %
        self.bad_epochs = 0
        self.plateau_stop = False

    @classmethod
    def from_config(cls, config: TrainConfig, *, lr: float) -> PlateauSchedule:
        return cls(
            lr=lr,
            decay=config.lr_decay,
            patience=config.patience,
            max_decays=config.max_decays,
            max_epochs=config.max_epochs,
            decay_at=config.decay_at,
        )

    @property
    def lr(self) -> float:
        # From the initial lr each time, so 1e-2 after three decays is 1e-5 without drift from repeated products.
        # Fixed decays count from the epochs done and the live cap, so a cap raised on resume moves the steps at once.
        decays = self._fixed_decays() if self.decay_at else self.decays
        return self.initial_lr * self.decay**decays

    @property
    def stop_reason(self) -> StopReason | None:
        """Why training is over, or None while it goes on. `max_epochs` is read live, so raising it resumes a run."""
        if self.plateau_stop:
            return "plateau"
        if self.epochs >= self.max_epochs:
            return "max_epochs"
        return None

    def step(self, top1_err: float) -> None:
        """Record one epoch's validation top-1 error (%) and decay or stop per the rule above."""
        self.epochs += 1
        if self.decay_at:  # fixed decays: the curve is only recorded
            self.best = min(self.best, top1_err) if not math.isnan(top1_err) else self.best
            self.decays = self._fixed_decays()
            return
        if top1_err < self.best:
            self.best = top1_err
            self.bad_epochs = 0
            return
        self.bad_epochs += 1
        if self.bad_epochs < self.patience:
            return
        if self.decays < self.max_decays:
            self.decays += 1
            self.bad_epochs = 0
        else:
            self.plateau_stop = True

    def _fixed_decays(self) -> int:
        return sum(self.epochs >= math.ceil(fraction * self.max_epochs) for fraction in self.decay_at)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "decays": self.decays,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "plateau_stop": self.plateau_stop,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs = int(state["epochs"])
        self.decays = int(state["decays"])
        self.best = float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])
        self.plateau_stop = bool(state["plateau_stop"])
