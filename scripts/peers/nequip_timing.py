"""A Lightning callback for the nequip peer runs: wall time per training batch and
per epoch, printed to stdout (the run's log), so s/epoch can be read while training.

Used from nequip_cu_emt.yaml / allegro_cu_emt.yaml with PYTHONPATH=scripts/peers:

    trainer:
      callbacks:
        - _target_: nequip_timing.WallTimer
          every_n_batches: 10
"""

import time

from lightning.pytorch.callbacks import Callback


class WallTimer(Callback):
    def __init__(self, every_n_batches: int = 10):
        self.every = int(every_n_batches)
        self.start = time.perf_counter()

    def on_train_epoch_start(self, trainer, module):
        self.epoch_start = self.last = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.every and (batch_idx + 1) % self.every == 0:
            now = time.perf_counter()
            print(
                f"[timer] epoch {trainer.current_epoch} batch {batch_idx + 1}: "
                f"{(now - self.last) / self.every:.2f} s/batch over the last "
                f"{self.every}",
                flush=True,
            )
            self.last = now

    def on_train_epoch_end(self, trainer, module):
        now = time.perf_counter()
        print(
            f"[timer] epoch {trainer.current_epoch} trained in "
            f"{now - self.epoch_start:.1f} s (run {now - self.start:.0f} s)",
            flush=True,
        )

    def on_validation_epoch_end(self, trainer, module):
        elapsed = time.perf_counter() - self.start
        print(f"[timer] validation done at run time {elapsed:.0f} s", flush=True)
