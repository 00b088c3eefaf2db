"""The GPU's cumulative energy counter, read through NVML, for the joules a span of work used.

Where a step is power-capped (an H200 at its 700 W limit lowers the SM clock, session 22: 1762
against 1860 MHz), the figure that compares two variants is the energy a step takes, not a
median of instant power readings. NVML keeps a counter of the energy the GPU has used since
the driver loaded (``nvmlDeviceGetTotalEnergyConsumption``, millijoules, Volta and later): the
difference of two readings is the energy between them, every joule counted, however short the
work between the samples of ``power.draw`` (gpu_clock.py).

The library is ``libnvidia-ml.so.1``, loaded with ctypes (it comes with the driver; no Python
package needed). Where it is missing (a CPU machine), NVML does not start, the GPU is not found,
or the GPU has no counter (``NVML_ERROR_NOT_SUPPORTED``), :func:`open_energy_counter` returns
None, and a reading that fails later is None: nothing here raises.

The driver advances the counter in steps, not continuously (how often is not documented; on an
H200, session 23: about every 100 ms, ~65–70 J at a time under a 700 W load, so a 60 ms training
step read either 0 or one increment), so one reading can trail the true total by up to one
update: a single short span's energy is meaningless, and a sum over consecutive spans is off by
at least one update (``workload.energy_figures`` gives that as the figure's ±, a floor: two
12-step runs of one variant differed by 2.5 times it), so a comparison wants ~100 timed steps
or more.
"""

from __future__ import annotations

import ctypes

NVML_SUCCESS = 0
LIBRARY = "libnvidia-ml.so.1"


class EnergyCounter:
    """One GPU's counter: :meth:`joules` reads it."""

    def __init__(self, lib, handle):
        self._lib, self._handle = lib, handle

    def joules(self) -> float | None:
        """The GPU's energy since the driver loaded, in J; None where the reading failed."""
        millijoules = ctypes.c_ulonglong(0)
        try:
            status = self._lib.nvmlDeviceGetTotalEnergyConsumption(self._handle,
                                                                   ctypes.byref(millijoules))
        except Exception:  # noqa: BLE001 (a reading must not stop a benchmark)
            return None
        return millijoules.value / 1000 if status == NVML_SUCCESS else None


def open_energy_counter(gpu: int | str = 0, library: str = LIBRARY) -> EnergyCounter | None:
    """The energy counter of ``gpu``, named as :class:`~chronicals_fx.gpu_clock.ClockSampler`'s
    (the driver's index, not CUDA's; a UUID "GPU-…"/"MIG-…"; or a PCI bus id
    "domain:bus:device.function" in hex); None where it cannot be read (see the module)."""
    try:
        lib = ctypes.CDLL(library)
        if lib.nvmlInit_v2() != NVML_SUCCESS:
            return None
        handle = ctypes.c_void_p()
        if isinstance(gpu, int):
            status = lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(gpu), ctypes.byref(handle))
        elif gpu.startswith(("GPU-", "MIG-")):
            status = lib.nvmlDeviceGetHandleByUUID(gpu.encode(), ctypes.byref(handle))
        else:
            status = lib.nvmlDeviceGetHandleByPciBusId_v2(gpu.encode(), ctypes.byref(handle))
        if status != NVML_SUCCESS:
            return None
        counter = EnergyCounter(lib, handle)
        # a GPU without the counter (before Volta) fails its first reading: no counter at all
        return counter if counter.joules() is not None else None
    except Exception:  # noqa: BLE001 (no library, a missing symbol: no counter, no error)
        return None
