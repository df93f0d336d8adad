"""The Ray environment: its config section, starting or joining Ray, Ray Data's context, and
where Ray's own output goes.

Ray prints its own warnings (token authentication, actor constructor arguments...), its C++
core's log lines and the workers' output on the driver's terminal. The command line keeps
them off the terminal unless ``--verbose`` (:func:`set_verbose`): they go to
``soundlake-<pid>.log`` in the Ray session's log folder (:func:`ray_log_file`), beside Ray's
own logs (the workers' output stays in their ``worker-*.out/err`` files there).
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time

from pydantic import Field

from soundlake.core.config import Section
from soundlake.core.errors import UserError

_LOG_HANDLER = "soundlake-ray-log"
_verbose: bool | None = None  # None: a library caller, who sees what Ray prints (the command line sets it)
_terminal_detached = False  # sys.stderr writes to a copy of descriptor 2, which can then go to the log
_log_file: str | None = None


class RaySpec(Section):
    address: str | None = Field(None, description="join this Ray cluster instead of starting a local one")
    num_cpus: int | None = Field(None, ge=1, description="local Ray: CPUs to use (default: all)")
    object_store_mb: int = Field(512, ge=80, description="local Ray: object store size")
    inputs_per_task: int = Field(8, ge=1, description="inputs handled by one segment task")


def set_verbose(on: bool) -> None:
    """``--verbose``: Ray's own output on the terminal, as Ray prints it (on), or in the run's
    log (off, the command line's default).

    Off, Python's ``sys.stderr`` (progress, summaries, errors, tracebacks) moves to a copy of
    file descriptor 2 now, before any progress display starts, so that :func:`init_ray` can
    point descriptor 2, where Ray's C++ core writes, at the log."""
    global _verbose, _terminal_detached
    _verbose = on
    if on or _terminal_detached:
        return
    try:
        if sys.stderr.fileno() != 2:
            return
    except (AttributeError, OSError, ValueError):  # not a real file (e.g. a test runner's capture)
        return
    sys.stderr.flush()
    sys.stderr = os.fdopen(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding, errors=sys.stderr.errors)
    _terminal_detached = True


def ray_log_file() -> str | None:
    """The log that holds Ray's output in this process (None: Ray printed to the terminal)."""
    return _log_file


def cluster_address(spec: RaySpec) -> str | None:
    """The cluster to join: ``--address`` (``ray.address``), else RAY_ADDRESS; None starts a local Ray."""
    return spec.address or os.environ.get("RAY_ADDRESS") or None


def joins_cluster(spec: RaySpec) -> bool:
    return cluster_address(spec) is not None


def init_ray(spec: RaySpec, log_to_driver: bool = True) -> float:
    """Start local Ray (or join --address, or RAY_ADDRESS); returns the seconds it took (0 if already up).

    Unless verbose, Ray's log lines (from ray.init on) and its C++ core's output go to
    :func:`ray_log_file`, and the workers' output stays in Ray's log folder."""
    import ray

    if ray.is_initialized():
        return 0.0
    t0 = time.perf_counter()
    quiet = _verbose is False
    kw: dict = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=log_to_driver and not quiet,
                    configure_logging=True)
    held = _hold_ray_logs() if quiet else None
    # RAY_ADDRESS names a cluster to join, as it does for every Ray program (and a joined
    # cluster refuses local-only settings such as the object store size).
    address = cluster_address(spec)
    try:
        if address:
            check_can_join(address)
            env = forwarded_env()
            if env:
                # Not as runtime_env "env_vars": Ray's runtime-env agent logs those, secrets
                # included, in every node's runtime_env_agent.log. A setup hook is kept in
                # Ray's memory (its key, not its content, is what gets logged).
                kw["runtime_env"] = {"worker_process_setup_hook": _env_setter(env)}
            try:
                ray.init(address=address, **kw)
            except ConnectionError as e:
                raise UserError(f"cannot join the Ray cluster at {address} ({e}); check the address "
                                "(`ray status` on the head prints it) and that the head is running") from None
        else:
            ray.init(num_cpus=spec.num_cpus, object_store_memory=spec.object_store_mb * 2**20, **kw)
    finally:
        if held is not None:
            _release_ray_logs(held)
    return time.perf_counter() - t0


# Object-store settings a worker needs to open the lake as the driver does. The nodes of a
# cluster were started with their own environment: the driver's values reach the workers
# through the job's runtime environment (kept in Ray's memory; written to no file).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_EC2_METADATA_DISABLED")


def _env_setter(env: dict[str, str]):
    """A function that sets ``env`` in the worker process that runs it (Ray runs it in each
    of the job's workers as they start)."""
    def soundlake_object_store_settings() -> None:
        os.environ.update(env)
    return soundlake_object_store_settings


def forwarded_env() -> dict[str, str]:
    """The driver's object-store settings (:data:`FORWARDED_ENV`) that are set."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def check_can_join(address: str) -> None:
    """Refuse at once, in one line, a cluster that wants an authentication token this process
    does not have (ray.init would retry for tens of seconds and end in a traceback).

    Asks the cluster's GCS for its id, as ray.init's first step does; only for a host:port
    address (``auto`` and ``ray://`` are resolved by ray.init itself). Any other problem is
    left to ray.init."""
    import ray._raylet
    from ray.exceptions import AuthenticationError

    if "://" in address or ":" not in address:
        return
    saved = os.dup(2)   # Ray's C++ client prints its own warning on descriptor 2: keep it off the terminal
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        ray._raylet.GcsClient(address=address)
    except AuthenticationError:
        if os.environ.get("RAY_AUTH_MODE") != "token":
            fix = "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token"
        else:
            fix = "the token given (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) is not the cluster's"
        raise UserError(f"the Ray cluster at {address} requires token authentication: {fix} "
                        "(~/.ray/auth_token on its head node)") from None
    except Exception:   # not reachable, not a GCS...: ray.init retries and says so
        pass
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _route_ray_logs(handler: logging.Handler) -> None:
    """Ray's driver loggers write to ``handler`` instead of the terminal (their file handlers,
    such as Ray Data's ray-data.log, stay)."""
    for name in ("ray", "ray.data"):
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if h.name == _LOG_HANDLER or (isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)):
                logger.removeHandler(h)
        logger.addHandler(handler)


def _hold_ray_logs() -> logging.Handler:
    """Keep Ray's log lines in memory while ray.init runs: the log's folder is known after it."""
    import logging.handlers

    import ray.data  # noqa: F401  (configures its loggers on import: route them after that)

    held = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    held.name = _LOG_HANDLER
    _route_ray_logs(held)
    return held


def _release_ray_logs(held) -> None:
    """Open the log in the Ray session's log folder, write the held lines to it, send Ray's
    later lines there, and point descriptor 2 (Ray's C++ core) at it. Without a log (Ray did
    not start, or its folder is not writable), Ray's lines go back to the terminal."""
    global _log_file
    import ray

    try:
        if not ray.is_initialized():   # (the runtime context would try to join a cluster)
            raise RuntimeError("Ray did not start")
        ctx = ray.get_runtime_context()
        folder = os.path.join(ctx.get_temp_dir(), ctx.get_session_name(), "logs")
    except Exception:  # Ray did not start, or a Ray Client connection: no local session folder
        folder = tempfile.gettempdir()
    path = os.path.join(folder, f"soundlake-{os.getpid()}.log")
    try:
        log = open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
    except OSError:
        log, path = sys.stderr, None
    handler = logging.StreamHandler(log)
    handler.name = _LOG_HANDLER
    handler.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"))
    held.setTarget(handler)
    held.flush()
    _route_ray_logs(handler)
    if path is not None and _terminal_detached:
        sys.__stderr__.flush()
        os.dup2(log.fileno(), 2)
    _log_file = path


def data_context():
    """Ray Data's context, with its own progress bars off (ours replace them) and its logging
    at errors, or at warnings for the command line (in the run's log; on the terminal with
    --verbose)."""
    import ray.data

    # Set after importing ray.data, which configures its loggers on import.
    logging.getLogger("ray.data").setLevel(logging.ERROR if _verbose is None else logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False          # we draw one bar for the whole job
    ctx.print_on_execution_start = False
    ctx.enable_rich_progress_bars = False
    return ctx
