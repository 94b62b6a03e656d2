"""CPU thread count for CPU runs: one thread unless the user chose.

With torch's default (one intra-op thread per core), a CPU run on a machine where anything else is busy slows down
10-40×: OpenMP's worker threads spin-wait for a core that another process holds. One thread loses little on an
idle machine for the small models that run on CPU (benchmarks/bench_threads.py measures both), so luffy-trl's
commands (`luffy-trl train`, `luffy-trl eval`, the examples) use one thread on a machine without a GPU unless the
user set a count: `OMP_NUM_THREADS` or `LUFFY_TRL_NUM_THREADS` in the environment (the latter wins). A count set
with `torch.set_num_threads` before calling `configure_cpu_threads` is not seen (it is reset to one); call
`torch.set_num_threads` afterwards instead. A GPU run is left alone.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)
ENV_VARIABLE = "LUFFY_TRL_NUM_THREADS"
DEFAULT_CPU_THREADS = 1


def chosen_thread_count(environ=os.environ) -> int | None:
    """The thread count the user set in the environment, or None."""
    for name in (ENV_VARIABLE, "OMP_NUM_THREADS"):
        value = environ.get(name, "").strip()
        if value:
            try:
                count = int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a whole number of threads.") from None
            if count < 1:
                raise ValueError(f"{name}={value!r}: the thread count must be at least 1.")
            return count
    return None


def configure_cpu_threads(environ=os.environ) -> int:
    """Set torch's intra-op threads for a CPU run (see the module docstring); returns the count in use."""
    import torch

    chosen = chosen_thread_count(environ)
    if chosen is not None:
        torch.set_num_threads(chosen)
    elif not torch.cuda.is_available() and torch.get_num_threads() > DEFAULT_CPU_THREADS:
        torch.set_num_threads(DEFAULT_CPU_THREADS)
        logger.info("CPU run: %d torch thread (set %s or OMP_NUM_THREADS to choose; docs/faq.md)",
                    DEFAULT_CPU_THREADS, ENV_VARIABLE)
    return torch.get_num_threads()
