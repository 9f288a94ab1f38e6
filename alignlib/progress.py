"""Rows done, rate and time left for the Ray Data stages (generate, score, eval), in alignlib's own words.

Ray Data's own progress counts blocks (`0/1` every 10 s on a small job); a user wants rows. `counted(ds,
progress)` adds a zero-CPU step that reports each batch's row count to a small Ray actor, and a thread in the
driver prints from it: a bar redrawn in place on a terminal, a line every `every` seconds in a log.

    with Progress("generate", total=1440) as progress:
        counted(dataset, progress).write_parquet(path)
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.actor import ActorHandle

_T = TypeVar("_T")


class _Counter:
    """The Ray actor batches report to (one per Progress); holds a running row count."""

    def __init__(self):
        self.rows = 0

    def add(self, n: int) -> None:
        self.rows += n

    def value(self) -> int:
        return self.rows


class _RemoteMethod(Protocol[_T]):
    def remote(self, *args: Any) -> ObjectRef[_T]: ...


class _CounterHandle(Protocol):
    """A `_Counter` actor's handle as this module calls it. Ray's stubs type a handle's methods (`.remote`) only
    when they are decorated with `ray.method`, which would import ray with this module (it is imported when used)."""

    @property
    def add(self) -> _RemoteMethod[None]: ...

    @property
    def value(self) -> _RemoteMethod[int]: ...


def _report(batch, counter):
    import ray

    ray.get(counter.add.remote(batch.num_rows))
    return batch


def counted(dataset, progress: Progress):
    """`dataset` with every batch's rows counted into `progress` as it passes (0 CPU, rows unchanged)."""
    return dataset.map_batches(
        _report, fn_args=(progress.counter,), batch_format="pyarrow", batch_size=None, num_cpus=0
    )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def describe(label: str, done: int, total: int, elapsed: float) -> str:
    """`generate: 1,024/1,440 rows (71%), 35.2 rows/s, about 12 s left`."""
    rate = done / elapsed if elapsed > 0 else 0.0
    text = f"{label}: {done:,}/{total:,} rows ({100 * done / max(total, 1):.0f}%), {rate:.1f} rows/s"
    if 0 < done < total and rate > 0:
        text += f", about {_duration((total - done) / rate)} left"
    return text


class Progress:
    def __init__(self, label: str, total: int, every: float = 5.0, stream=None):
        import ray

        self.label, self.total, self.every = label, total, every
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.counter = cast(_CounterHandle, ray.remote(num_cpus=0)(_Counter).remote())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.started = time.time()

    def rows(self) -> int:
        import ray

        return ray.get(self.counter.value.remote())

    def _print(self, done: int, final: bool = False) -> None:
        from alignlib.redaction import redact

        line = redact(f"[alignlib] {describe(self.label, done, self.total, time.time() - self.started)}")
        if self.tty:
            width = 30
            filled = int(width * done / max(self.total, 1))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {line}" + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _loop(self) -> None:
        interval = 0.5 if self.tty else self.every
        last = -1
        while not self._stop.wait(interval):
            done = self.rows()
            if done != last:
                self._print(done)
                last = done

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        import ray

        self._stop.set()
        self._thread.join()
        if exc_type is None:
            self._print(self.rows(), final=True)
        ray.kill(cast("ActorHandle[_Counter]", self.counter))  # the handle `_CounterHandle` describes
