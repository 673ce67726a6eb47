"""The batching scheduler: one worker thread owns the engine.

Every engine call (completions, adapter loads and unloads, listings) runs
on the scheduler's worker thread, so the engine never sees two threads.
Completion requests that arrive within a short window are gathered, up to
`max_batch`, into one `engine.complete` call, whatever their adapters: the
engine routes each row to its own adapter in a single pass.

Example:

```python
scheduler = Scheduler(engine, max_batch=32, max_queue=64)
scheduler.start()
future = scheduler.submit(CompletionRequest("Hello", adapter="fr"))
completion = future.result()
adapters = scheduler.call(engine.list_adapters).result()
scheduler.stop()
```
"""

import collections
import concurrent.futures
import logging
import threading
import time

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Raised by `Scheduler.submit` when `max_queue` requests are waiting."""


class SchedulerStoppedError(RuntimeError):
    """Raised when work is submitted to a scheduler that is not running."""


class _Completion:
    """A completion request waiting for the worker."""

    __slots__ = ("request", "future")

    def __init__(self, request):
        self.request = request
        self.future = concurrent.futures.Future()


class _Call:
    """Any other engine call (load, unload, list), run alone, in order."""

    __slots__ = ("fn", "args", "kwargs", "future")

    def __init__(self, fn, args, kwargs):
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.future = concurrent.futures.Future()


class Scheduler:
    """Batches completion requests onto one engine from a worker thread.

    Args:
        engine: the serving engine (`validate`, `complete`, ...).
        max_batch: the most requests in one `engine.complete` call
            (default and upper bound: `engine.max_batch`). 1 turns
            batching off.
        max_queue: the most completion requests admitted at once (queued
            or running); `submit` raises `QueueFullError` past it.
        batch_window: seconds the worker waits, after the first request
            of a batch, for more to arrive (it stops early once the batch
            is full).
    """

    def __init__(
        self, engine, max_batch=None, max_queue=64, batch_window=0.005
    ):
        engine_max = int(engine.max_batch)
        max_batch = engine_max if max_batch is None else int(max_batch)
        if not 1 <= max_batch <= engine_max:
            raise ValueError(
                f"Scheduler max_batch must be between 1 and the engine's "
                f"max_batch ({engine_max}); received {max_batch}."
            )
        if int(max_queue) < 1:
            raise ValueError(
                f"Scheduler max_queue must be at least 1; received {max_queue}."
            )
        if batch_window < 0:
            raise ValueError(
                f"Scheduler batch_window must be >= 0 seconds; received "
                f"{batch_window}."
            )
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = int(max_queue)
        self.batch_window = float(batch_window)
        self._items = collections.deque()
        self._cond = threading.Condition()
        self._admitted = 0  # completion requests queued or running
        self._running = False
        self._thread = None
        self.stats = {
            "requests": 0,
            "batches": 0,
            "largest_batch": 0,
            "failed_batches": 0,
        }

    # -- lifecycle -------------------------------------------------------

    def start(self):
        """Starts the worker thread (a no-op when it already runs)."""
        with self._cond:
            if self._running:
                return
            self._running = True
        self._thread = threading.Thread(
            target=self._work, name="keras-lora-scheduler", daemon=True
        )
        self._thread.start()

    def stop(self, timeout=None):
        """Stops the worker after the work already queued has run."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self):
        """Whether the worker thread is running."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def admitted(self):
        """Completion requests queued or running right now."""
        with self._cond:
            return self._admitted

    @property
    def queued(self):
        """Items (completions and calls) waiting for the worker."""
        with self._cond:
            return len(self._items)

    # -- submitting --------------------------------------------------------

    def submit(self, request):
        """Queues a completion request; returns a `Future` of `Completion`.

        Raises `QueueFullError` when `max_queue` requests are already
        admitted; the future raises what `engine.validate` or
        `engine.complete` raised for this request.
        """
        item = _Completion(request)
        with self._cond:
            self._check_running()
            if self._admitted >= self.max_queue:
                raise QueueFullError(
                    f"Server busy: {self._admitted} requests are queued or "
                    f"running (max_queue={self.max_queue}); retry later."
                )
            self._admitted += 1
            self._items.append(item)
            self._cond.notify_all()
        item.future.add_done_callback(self._release)
        return item.future

    def call(self, fn, *args, **kwargs):
        """Runs `fn(*args, **kwargs)` on the worker; returns a `Future`."""
        item = _Call(fn, args, kwargs)
        with self._cond:
            self._check_running()
            self._items.append(item)
            self._cond.notify_all()
        return item.future

    def _check_running(self):
        if not self._running:
            raise SchedulerStoppedError("The scheduler is not running.")

    def _release(self, _future):
        with self._cond:
            self._admitted -= 1

    # -- the worker --------------------------------------------------------

    def _work(self):
        while True:
            item = self._next_item()
            if item is None:
                return
            if isinstance(item, _Call):
                if item.future.set_running_or_notify_cancel():
                    _resolve(item.future, item.fn, *item.args, **item.kwargs)
            else:
                self._run_batch(self._gather(item))

    def _next_item(self):
        with self._cond:
            while not self._items:
                if not self._running:
                    return None
                self._cond.wait()
            return self._items.popleft()

    def _gather(self, first):
        """`first` plus completions that arrive within the batch window.

        Only completions at the head of the queue join, so a load or an
        unload queued behind them still runs after them, in order.
        """
        batch = [first]
        deadline = time.monotonic() + self.batch_window
        with self._cond:
            while len(batch) < self.max_batch:
                if self._items:
                    if not isinstance(self._items[0], _Completion):
                        break
                    batch.append(self._items.popleft())
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._running:
                    break
                self._cond.wait(remaining)
        return batch

    def _run_batch(self, batch):
        valid = []
        for item in batch:
            if not item.future.set_running_or_notify_cancel():
                continue
            try:
                self.engine.validate(item.request)
            except Exception as error:  # noqa: BLE001 - goes to the caller
                item.future.set_exception(error)
            else:
                valid.append(item)
        if not valid:
            return
        self.stats["batches"] += 1
        self.stats["requests"] += len(valid)
        self.stats["largest_batch"] = max(
            self.stats["largest_batch"], len(valid)
        )
        try:
            completions = self.engine.complete([i.request for i in valid])
            if len(completions) != len(valid):
                raise RuntimeError(
                    f"engine.complete returned {len(completions)} results "
                    f"for {len(valid)} requests."
                )
        except Exception as error:  # noqa: BLE001 - isolated below
            self.stats["failed_batches"] += 1
            if len(valid) == 1:
                valid[0].future.set_exception(error)
                return
            # One request may have broken the whole batch: run each alone
            # so only the culprit fails.
            logger.warning(
                "Batch of %d failed (%s: %s); retrying one by one.",
                len(valid),
                type(error).__name__,
                error,
            )
            for item in valid:
                _resolve(item.future, _complete_one, self.engine, item.request)
            return
        for item, completion in zip(valid, completions, strict=True):
            item.future.set_result(completion)


def _complete_one(engine, request):
    return engine.complete([request])[0]


def _resolve(future, fn, *args, **kwargs):
    """Runs `fn`; its result or exception goes into the running `future`."""
    try:
        result = fn(*args, **kwargs)
    except BaseException as error:  # noqa: BLE001 - goes to the caller
        future.set_exception(error)
        if not isinstance(error, Exception):
            raise
    else:
        future.set_result(result)
