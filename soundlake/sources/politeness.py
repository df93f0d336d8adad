"""Politeness towards remote hosts: a shared rate limiter, backoff, and a bot-wall breaker.

One :class:`RateLimiter` state is shared by every download worker on every node: a named
Ray actor (``soundlake-politeness-<run_id>`` in namespace ``soundlake``) created by
the driver when the download stage is built. Workers ask it for a *reservation*
(``reserve(host)`` returns how long to sleep before the request may go out) so the
actor itself never blocks; the per-host spacing is ``60 / rate_per_minute`` (a token
bucket of depth one, i.e. GCRA). Without Ray (unit tests, a plain script) the same
:class:`RateLimiter` runs in-process behind a lock.

The bot-wall circuit breaker lives in the same state: ``trip(seconds, reason)``
closes the gate for every worker until the pause ends; ``reserve`` then answers with
the wait until it reopens, so no worker sends a request during the pause.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from urllib.parse import urlparse

log = logging.getLogger("soundlake.download")
NAMESPACE = "soundlake"


def host_of(url: str) -> str:
    return (urlparse(url).hostname or "").lower()


class RateLimiter:
    """Per-host request spacing plus a global pause (the circuit breaker)."""

    def __init__(self, rate_per_minute: dict[str, float]):
        self.rates = dict(rate_per_minute)
        self.next_free: dict[str, float] = {}
        self.paused_until = 0.0
        self.pause_reason = ""
        self.trips = 0

    def _interval(self, host: str) -> float:
        rpm = self.rates.get(host, self.rates.get("*", 0.0))
        return 60.0 / rpm if rpm and rpm > 0 else 0.0

    def reserve(self, host: str) -> float:
        """Seconds the caller must wait before its request to ``host`` may start."""
        now = time.time()
        start = max(now, self.paused_until, self.next_free.get(host, 0.0))
        self.next_free[host] = start + self._interval(host)
        return start - now

    def hold(self, host: str, seconds: float) -> None:
        """A server asked us to wait (Retry-After): no worker calls ``host`` before then."""
        self.next_free[host] = max(self.next_free.get(host, 0.0), time.time() + seconds)

    def trip(self, seconds: float, reason: str) -> float:
        """Pause every download for ``seconds`` (extends, never shortens, a pause)."""
        until = time.time() + seconds
        if until > self.paused_until:
            self.paused_until = until
            self.pause_reason = reason
            self.trips += 1
        return self.paused_until

    def state(self) -> dict:
        return {"paused_until": self.paused_until, "pause_reason": self.pause_reason, "trips": self.trips}


class LocalRateLimiter:
    """The in-process gate (thread-safe)."""

    def __init__(self, rate_per_minute: dict[str, float]):
        self._limiter = RateLimiter(rate_per_minute)
        self._lock = threading.Lock()

    def reserve(self, host: str) -> float:
        with self._lock:
            return self._limiter.reserve(host)

    def hold(self, host: str, seconds: float) -> None:
        with self._lock:
            self._limiter.hold(host, seconds)

    def trip(self, seconds: float, reason: str) -> float:
        with self._lock:
            return self._limiter.trip(seconds, reason)

    def state(self) -> dict:
        with self._lock:
            return self._limiter.state()


class RayRateLimiter:
    """A handle on the shared actor; picklable (it finds the actor by name, and
    re-creates it if its owner died, so a lost actor costs only the spacing state)."""

    def __init__(self, name: str, rate_per_minute: dict[str, float]):
        self.name = name
        self.rates = dict(rate_per_minute)
        self._actor = None

    def _ensure(self):
        import ray

        if self._actor is None:
            cls = ray.remote(num_cpus=0)(RateLimiter)
            self._actor = cls.options(name=self.name, namespace=NAMESPACE, get_if_exists=True).remote(self.rates)
        return self._actor

    def _call(self, method: str, *args):
        import ray
        from ray.exceptions import RayActorError

        for attempt in range(3):
            try:
                return ray.get(getattr(self._ensure(), method).remote(*args), timeout=60)
            except RayActorError:
                self._actor = None
                if attempt == 2:
                    raise

    def reserve(self, host: str) -> float:
        return self._call("reserve", host)

    def hold(self, host: str, seconds: float) -> None:
        self._call("hold", host, seconds)

    def trip(self, seconds: float, reason: str) -> float:
        return self._call("trip", seconds, reason)

    def state(self) -> dict:
        return self._call("state")

    def __getstate__(self):
        return {"name": self.name, "rates": self.rates, "_actor": None}


def make_rate_limiter(name: str, rate_per_minute: dict[str, float], need_ray: bool = False):
    """The shared gate: a named Ray actor when Ray is up (best created on the driver,
    which then owns it for the run's lifetime), else an in-process one (or None when
    ``need_ray`` and Ray is not up yet: the caller retries in the worker)."""
    import ray

    if not ray.is_initialized():
        return None if need_ray else LocalRateLimiter(rate_per_minute)
    gate = RayRateLimiter(name, rate_per_minute)
    gate._ensure()
    return gate


def wait_turn(gate, url: str) -> None:
    """Sleep until the gate lets a request to ``url``'s host go out; log pauses once."""
    delay = gate.reserve(host_of(url))
    if delay > 5.0:
        st = gate.state()
        if st["paused_until"] > time.time():
            log.warning("downloads paused for %.0f s more (%s); resuming at %s", st["paused_until"] - time.time(),
                        st["pause_reason"], time.strftime("%H:%M:%S", time.localtime(st["paused_until"])))
    if delay > 0:
        time.sleep(delay)


def backoff(attempt: int, base: float, cap: float, retry_after: float | None = None,
            rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter; a server's Retry-After is a floor."""
    rng = rng or random
    delay = min(cap, base * (2 ** attempt)) * (0.5 + rng.random() / 2)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
