"""Device pinning for a worker process, done before any engine library is imported.

CUDA and thread libraries read their environment once, at import: setting it
later has no effect, so `inferq worker` pins first and imports the engine after.
"""

from __future__ import annotations

import os

#: The environment variable through which the vacc engine learns its die ids.
VACC_DIES_ENV = "INFERQ_VACC_DIES"


def pinning_env(device_kind: str, devices: list[str]) -> dict[str, str]:
    """Environment a worker on `devices` needs for an engine of `device_kind`."""
    env: dict[str, str] = {}
    if device_kind == "cpu":
        threads = len(devices) if devices else (os.cpu_count() or 1)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[name] = str(threads)
    elif device_kind == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    elif device_kind == "vacc":
        env[VACC_DIES_ENV] = ",".join(devices)
    else:
        raise ValueError(f"unknown device kind {device_kind!r}")
    return env


def pin_cpu_affinity(devices: list[str]) -> None:
    """Bind this process (and what it execs) to the listed CPU cores, where the OS allows."""
    if not devices or not hasattr(os, "sched_setaffinity"):
        return
    cores = {int(d) for d in devices}
    available = os.sched_getaffinity(0)
    missing = cores - available
    if missing:
        raise ValueError(
            f"CPU cores {sorted(missing)} are not available here (have {sorted(available)})"
        )
    os.sched_setaffinity(0, cores)
