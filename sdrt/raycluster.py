"""Joining Ray for `--ray`: a local instance (address None) or an existing cluster, with sdrt's errors."""

from __future__ import annotations

from types import ModuleType

from .errors import SdrtError, first_line


def connect(address: str | None) -> ModuleType:
    """-> the ray module, initialised; a missing extra or an unreachable cluster is an SdrtError naming --ray-address."""
    try:
        import ray
    except ImportError:
        raise SdrtError("--ray needs the ray extra: run `pip install 'sdrt[ray]'`") from None
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError) as exc:
        raise SdrtError(f"--ray-address {address}: could not join the Ray cluster ({first_line(exc)}); give `auto` for the "
                        "cluster `ray start` made on this machine, or leave it out for a local instance") from None
    return ray
