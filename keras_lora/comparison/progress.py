"""Progress output for the long phases: a tqdm bar per training run."""

import sys
import time

import keras


def status(message, enabled=True):
    """Prints one progress line (flushed, so pipes and notebooks see it)."""
    if enabled:
        print(message, flush=True)


class TqdmCallback(keras.callbacks.Callback):
    """A text progress bar over all training steps of one `fit` call.

    Shows the running loss. Writes to stdout with a coarse refresh interval
    so that output relayed through a pipe (worker processes) or stored in a
    notebook stays short.
    """

    def __init__(
        self, total_steps, description, mininterval=2.0, keep_open=False
    ):
        super().__init__()
        self.total_steps = total_steps
        self.description = description
        self.mininterval = mininterval
        # keep_open: one bar across several `fit` calls; `close()` ends it.
        self.keep_open = keep_open
        self._bar = None

    def on_train_begin(self, logs=None):
        from tqdm import tqdm

        if self._bar is not None:
            return
        self._bar = tqdm(
            total=self.total_steps,
            desc=self.description,
            unit="step",
            file=sys.stdout,
            mininterval=self.mininterval,
            ascii=True,
            dynamic_ncols=False,
            ncols=90,
        )

    def on_train_batch_end(self, batch, logs=None):
        if "loss" in (logs or {}):
            loss = float(keras.ops.convert_to_numpy(logs["loss"]))
            self._bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        self._bar.update(1)

    def on_train_end(self, logs=None):
        if not self.keep_open:
            self.close()

    def write(self, message):
        """A line above the bar (or plain, when no bar is open)."""
        if self._bar is None:
            print(message, flush=True)
        else:
            self._bar.write(message, file=sys.stdout)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Clock:
    """Wall time of consecutive stages: `lap(name)` ends one."""

    def __init__(self):
        self.laps = {}
        self._last = time.perf_counter()

    def lap(self, name):
        now = time.perf_counter()
        self.laps[name] = now - self._last
        self._last = now
        return self.laps[name]
