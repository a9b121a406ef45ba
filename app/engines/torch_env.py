"""The process environment torch-based engines need, set before torch is imported."""

from __future__ import annotations

import os


def prepare_torch_env() -> None:
    """No hub: a model is a local directory. And OpenMP threads that wait passively.

    libgomp's worker threads spin for milliseconds after each parallel region unless
    told otherwise; between the small batches of a served model that spinning took
    94% of one of this machine's two cores at 75 requests/s (bench/overhead.py),
    CPU that the API, Redis and the next request's tokenising need. A passive wait
    costs a futex wake per region instead, and the engine's batches ran no slower.
    libgomp reads the variable when torch loads it, so this runs before `import
    torch`; an operator's own OMP_WAIT_POLICY wins.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
