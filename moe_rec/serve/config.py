"""``ServeConfig``: how a bundle is served, every default in one place.

The Python API (:class:`~moe_rec.serve.recommender.Recommender`) reads the device, the batching
and the beam width; the HTTP service (:func:`~moe_rec.serve.http.run_server`) the rest;
``moe-rec serve`` and ``moe-rec recommend`` take their flags' defaults from here. Values are
checked when the config is made, so a bad one fails before a bundle loads (a
:class:`~moe_rec.config.ConfigError`, which ``moe-rec`` reports in one line).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from moe_rec.config import ConfigError

LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)
DEFAULT_K = 10  # items a request gets when it does not say


@dataclass(frozen=True)
class ServeConfig:
    device: str | None = None  # torch device (cpu, cuda, cuda:1); None: cuda when available, else cpu
    max_batch_size: int = 32  # most requests decoded in one batch
    max_wait_ms: float = 2.0  # how long the first request of a batch waits for more to arrive
    max_k: int = 50  # largest k a request may ask for, and the beam width of every decode
    host: str = "127.0.0.1"  # HTTP: the address to listen on; 0.0.0.0 for all
    port: int = 8000  # HTTP: 1..65535; 0 picks a free one
    max_body_bytes: int = 1 << 20  # HTTP: larger bodies get 413 unparsed (a 50-event history is ~3 KB)
    torch_threads: int | None = None  # HTTP: the model's CPU threads; None: torch's (one per core)
    access_log: bool = False  # HTTP: log every request (/metrics counts them anyway)
    log_level: LogLevel = "info"  # HTTP: server log verbosity

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_k < 1 or self.max_wait_ms < 0:
            raise ConfigError("max_batch_size and max_k must be >= 1, max_wait_ms >= 0")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is invalid: use 1..65535, or 0 for any free port")
        if self.max_body_bytes < 1:
            raise ConfigError(f"max_body_bytes={self.max_body_bytes} must be >= 1")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"torch_threads={self.torch_threads} must be >= 1")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level {self.log_level!r} not in {LOG_LEVELS}")
