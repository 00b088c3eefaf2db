"""The GPU's SM clock and power, sampled in the background while a benchmark runs.

A GPU lowers its clock when it reaches its power or temperature limit, and a step then takes
longer for reasons that have nothing to do with the code measured (session 17: both variants'
steps rose by up to 10% late in some runs). Each timed step gets the median of the samples
taken while it ran, so a table can show whether two variants ran at the same clock.

``nvidia-smi`` in loop mode is the sampler: it is present wherever the driver is, and it costs
the training process nothing (a separate process; a thread here only reads its lines). Where it
is missing (a CPU machine) the sampler records nothing and every step's clock is NaN.
"""

from __future__ import annotations

import math
import shutil
import statistics
import subprocess
import threading
import time

# power.draw is, on current drivers, the average over the last second (measured on an H200,
# session 21: it climbed from 85 to 694 W over a second of constant load, the instant reading
# there at once): a step's median of it lags by a second. The instant reading where the driver
# has it, else the average. With them, why the clock is below its maximum: the driver's bitmask
# of clock-event reasons (named "throttle reasons" before driver 535). The first query whose
# probe gives a sample is the one sampled.
QUERIES = ("clocks.sm,power.draw.instant,clocks_event_reasons.active",
           "clocks.sm,power.draw.instant,clocks_throttle_reasons.active",
           "clocks.sm,power.draw.instant",
           "clocks.sm,power.draw")

# The reasons that mean "held down by power": the software power cap (the board's limit, 700 W
# on an H200) and the hardware power brake (an external signal). nvidia-smi's bit values.
SW_POWER_CAP, HW_POWER_BRAKE = 0x4, 0x80
POWER_CAPPED = SW_POWER_CAP | HW_POWER_BRAKE


def parse_sample(line: str) -> tuple[float, float, int | None] | None:
    """(SM MHz, power W, clock-event reasons) from one ``--format=csv,noheader,nounits`` line
    of one of :data:`QUERIES` (reasons: the bitmask, "0x…", or None where the line has none or
    it is "[N/A]"); None for anything else (a header, an error message, "[N/A]" power)."""
    fields = [f.strip() for f in line.split(",")]
    if len(fields) not in (2, 3):
        return None
    try:
        mhz, watts = float(fields[0]), float(fields[1])
    except ValueError:
        return None
    try:
        reasons = int(fields[2], 16) if len(fields) == 3 else None
    except ValueError:
        reasons = None
    return mhz, watts, reasons


class ClockSampler:
    """``with ClockSampler(gpu) as clock:`` samples every ``period_ms`` until the block ends;
    :meth:`during` gives a time span's median clock and power. ``gpu``: nvidia-smi's ``--id``
    (an index in the driver's numbering, a UUID "GPU-…" or a PCI bus id)."""

    def __init__(self, gpu: int | str = 0, period_ms: int = 20):
        self.gpu, self.period_ms = gpu, period_ms
        self.command: list[str] = []     # the loop's nvidia-smi command, once started
        self.samples: list[tuple[float, float, float]] = []   # (perf_counter, MHz, W)
        self.reasons: list[tuple[float, int]] = []   # (perf_counter, clock-event bitmask)
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def _query(self, fields: str) -> list[str]:
        return ["nvidia-smi", f"--id={self.gpu}", f"--query-gpu={fields}",
                "--format=csv,noheader,nounits"]

    def __enter__(self) -> "ClockSampler":
        if shutil.which("nvidia-smi") is None:
            return self
        fields = next((q for q in QUERIES[:-1] if self._answers(q)), QUERIES[-1])
        self.command = [*self._query(fields), f"--loop-ms={self.period_ms}"]
        self._process = subprocess.Popen(self.command, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _answers(self, fields: str) -> bool:
        """Whether nvidia-smi gives a sample for ``fields`` (an old driver refuses a field)."""
        try:
            probe = subprocess.run(self._query(fields), capture_output=True, text=True,
                                   timeout=30).stdout
        except subprocess.TimeoutExpired:
            return False
        return any(parse_sample(line) for line in probe.splitlines())

    def _read(self) -> None:
        # The line's arrival time stands for its sample's time: nvidia-smi writes each line as
        # it takes the sample, a few ms at most before this thread reads it.
        for line in self._process.stdout:
            sample = parse_sample(line)
            if sample is not None:
                now, (mhz, watts, reasons) = time.perf_counter(), sample
                self.samples.append((now, mhz, watts))
                if reasons is not None:
                    self.reasons.append((now, reasons))

    def __exit__(self, *exc) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait()
            self._reader.join(timeout=5)

    def during(self, start: float, end: float) -> tuple[float, float]:
        """Median (SM MHz, power W) of the samples taken in [start, end] (perf_counter times);
        NaN where none was (a span shorter than the period, or no sampler)."""
        inside = [(mhz, watts) for t, mhz, watts in self.samples if start <= t <= end]
        if not inside:
            return math.nan, math.nan
        return (statistics.median(m for m, _ in inside),
                statistics.median(w for _, w in inside))

    def power_capped(self, start: float, end: float) -> float:
        """The share of the samples taken in [start, end] during which the driver held the
        clock down for power (:data:`POWER_CAPPED`): near 1, the step ran at the power limit
        and its clock was what the limit allowed. NaN where no sample had the reasons."""
        inside = [mask for t, mask in self.reasons if start <= t <= end]
        if not inside:
            return math.nan
        return sum(bool(mask & POWER_CAPPED) for mask in inside) / len(inside)
