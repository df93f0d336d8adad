"""The Ray environment: its config section, starting or joining Ray, and Ray Data's context."""
from __future__ import annotations

import time

from pydantic import Field

from soundlake.core.config import Section


class RaySpec(Section):
    address: str | None = Field(None, description="join this Ray cluster instead of starting a local one")
    num_cpus: int | None = Field(None, ge=1, description="local Ray: CPUs to use (default: all)")
    object_store_mb: int = Field(512, ge=80, description="local Ray: object store size")
    inputs_per_task: int = Field(8, ge=1, description="inputs handled by one segment task")


def init_ray(spec: RaySpec, log_to_driver: bool = True) -> float:
    """Start local Ray (or join --address); returns the seconds it took (0 if already up)."""
    import logging

    import ray

    if ray.is_initialized():
        return 0.0
    t0 = time.perf_counter()
    kw: dict = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=log_to_driver,
                    configure_logging=True)
    if spec.address:
        ray.init(address=spec.address, **kw)
    else:
        ray.init(num_cpus=spec.num_cpus, object_store_memory=spec.object_store_mb * 2**20, **kw)
    return time.perf_counter() - t0


def data_context():
    """Ray Data's context, with its own progress bars and logging off (ours replace them)."""
    import logging

    import ray.data

    # Set after importing ray.data, which configures its loggers on import.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False          # we draw one bar for the whole job
    ctx.print_on_execution_start = False
    ctx.enable_rich_progress_bars = False
    return ctx
