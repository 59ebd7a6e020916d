"""Progress of a long step as log lines at a steady pace: with or without a terminal (DVC, SLURM, a pipe), every
long loop logs where it is (step, its own fields such as the loss, rate, ETA) to the `replication` logger, whose
stage file handler writes the stage's log.txt and whose console handler (Hydra's, or the stage's own) prints it.

    with ProgressLog("train LDM", total=steps, initial=step, bar=progress) as p:
        for ...:
            ...
            p.update(1, loss=0.1234)

A line is logged on the first update, then whenever `interval_s` seconds have passed since the last line or `every`
updates were made since it (either condition; 0 turns one off), and once at the end (`close`). With `bar=True`
a tqdm bar runs beside the lines (the lines still go to the log). The default interval is 30 s, or the value of
the environment variable REPLICATION_PROGRESS_INTERVAL_S (seconds).
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Optional

ENV_INTERVAL = "REPLICATION_PROGRESS_INTERVAL_S"
DEFAULT_INTERVAL_S = 30.0


def default_interval_s() -> float:
    """REPLICATION_PROGRESS_INTERVAL_S when set (a number >= 0), else 30 s."""
    raw = os.environ.get(ENV_INTERVAL)
    if raw is None or raw.strip() == "":
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_INTERVAL}={raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{ENV_INTERVAL}={raw!r} must be a number of seconds >= 0")
    return value


def format_duration(seconds: float) -> str:
    """12 s, 4m05s, 3h02m; '?' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _format_rate(rate: float, unit: str) -> str:
    if rate <= 0 or not math.isfinite(rate):
        return f"- {unit}/s"
    if rate >= 1:
        return f"{rate:.3g} {unit}/s"
    return f"{1 / rate:.3g} s/{unit}"


class ProgressLog:
    """Log lines '<what>: <unit> N/T (P%), <fields>, <rate>, ETA <eta>' at a steady pace; see the module doc.

    what:       what runs ("train LDM", "sample", "encode latents").
    total:      the count at which the work is done (None: unknown; no percentage or ETA).
    initial:    where the count starts (a resumed run); the rate counts only this run's updates.
    unit:       what is counted ("step", "img", "batch").
    interval_s: seconds between lines (None: default_interval_s(); 0: no time-based lines).
    every:      updates between lines (0: no count-based lines).
    bar:        also show a tqdm bar (progress=true); the lines go to the log either way.
    logger:     where the lines go (default: the `replication` logger).
    clock:      seconds as a float (time.monotonic), replaceable for tests of the pacing.
    """

    def __init__(self, what: str, total: Optional[int] = None, *, initial: int = 0, unit: str = "step",
                 interval_s: Optional[float] = None, every: int = 0, bar: bool = False,
                 logger: Optional[logging.Logger] = None, clock: Callable[[], float] = time.monotonic,
                 level: int = logging.INFO) -> None:
        if interval_s is None:
            interval_s = default_interval_s()
        if interval_s < 0 or every < 0:
            raise ValueError(f"ProgressLog({what!r}): interval_s and every must be >= 0, got {interval_s}, {every}")
        self.what, self.total, self.unit = what, total, unit
        self.interval_s, self.every, self.level = float(interval_s), int(every), level
        self.log = logger or logging.getLogger("replication")
        self.clock = clock
        self.n = self.start_n = initial
        self.fields: dict[str, Any] = {}
        self.started = self.clock()
        self._last_t, self._last_n = self.started, initial  # the last logged line
        self._lines = 0
        self._closed = False
        self._bar = None
        if bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=what, unit=unit, dynamic_ncols=True)

    # -------------------------------------------------------------------------------------------- use
    def __enter__(self) -> "ProgressLog":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(done=exc_type is None)

    def set(self, **fields: Any) -> None:
        """Fields shown on the next line (e.g. loss=...), without advancing."""
        self.fields.update(fields)
        if self._bar is not None and fields:
            self._bar.set_postfix({k: _format_value(v) for k, v in self.fields.items()}, refresh=False)

    def update(self, n: int = 1, **fields: Any) -> bool:
        """Advance by `n` (and set `fields`); log a line when one is due. True when a line was logged."""
        self.n += n
        if fields:
            self.set(**fields)
        if self._bar is not None:
            self._bar.update(n)
        now = self.clock()
        due = self._lines == 0  # the first update: the work is seen to move
        due = due or (self.interval_s > 0 and now - self._last_t >= self.interval_s)
        due = due or (self.every > 0 and self.n - self._last_n >= self.every)
        if due:
            self._emit(now)
        return due

    def close(self, done: bool = True) -> None:
        """Log the last line (total time and mean rate when `done`); close the bar. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if not done:
            return
        elapsed = self.clock() - self.started
        count = self.n - self.start_n
        rate = count / elapsed if elapsed > 0 else 0.0
        where = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        extra = "".join(f", {k} {_format_value(v)}" for k, v in self.fields.items())
        self.log.log(self.level, "%s: finished at %s %s%s, %d %s(s) in %s (%s)", self.what, self.unit, where, extra,
                     count, self.unit, format_duration(elapsed), _format_rate(rate, self.unit))

    # -------------------------------------------------------------------------------------------- lines
    def rate(self, now: Optional[float] = None) -> float:
        """Updates per second since the last line (since the start for the first line)."""
        now = self.clock() if now is None else now
        dt, dn = now - self._last_t, self.n - self._last_n
        return dn / dt if dt > 0 else 0.0

    def line(self, now: Optional[float] = None) -> str:
        now = self.clock() if now is None else now
        rate = self.rate(now)
        parts = [f"{self.what}: {self.unit} {self.n}"]
        if self.total is not None:
            parts[0] += f"/{self.total}"
            if self.total > 0:
                parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        parts += [f"{k} {_format_value(v)}" for k, v in self.fields.items()]
        parts.append(_format_rate(rate, self.unit))
        if self.total is not None:
            left = max(self.total - self.n, 0)
            parts.append(f"ETA {format_duration(left / rate) if rate > 0 else ('0 s' if left == 0 else '?')}")
        parts.append(f"elapsed {format_duration(now - self.started)}")
        return ", ".join(parts)

    def _emit(self, now: float) -> None:
        text = self.line(now)
        self._last_t, self._last_n = now, self.n
        self._lines += 1
        if self._bar is not None:
            # the bar owns the terminal line: tqdm.write keeps it intact; the file handlers still get the line
            self._log_beside_bar(text)
        else:
            self.log.log(self.level, "%s", text)

    def _log_beside_bar(self, text: str) -> None:
        from tqdm.auto import tqdm

        with tqdm.external_write_mode():
            self.log.log(self.level, "%s", text)
