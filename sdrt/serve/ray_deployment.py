"""`sdrt serve --ray`: the app of `app.create_app` as a Ray Serve deployment. Each replica is a Ray actor
that loads its own pipeline and serves the same routes; Ray's proxy spreads requests over the replicas;
each replica answers 429 when its own queue is full, and the proxy does (with Retry-After) when its queue is."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

from .app import RETRY_AFTER_S, ServeConfig


class Replica:
    """One Ray Serve replica: a pipeline and the app over it."""

    def __init__(self, engines: str, cfg: ServeConfig, threads: int, verify: str, device: str | None):
        from ..pipeline import StableDiffusion

        self.pipe = StableDiffusion.from_engine_folder(Path(engines), device=device, threads=threads, verify=verify)
        self.cfg = cfg

    def __serve_build_asgi_app__(self):  # Ray Serve calls it after __init__, in the replica
        from .app import create_app

        return create_app(self.pipe, self.cfg)


def deployment_options(cfg: ServeConfig, replicas: int, autoscaling: dict[str, Any] | None, threads: int) -> dict[str, Any]:
    from ray.serve.config import BackpressureConfig

    return {
        **({"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}),
        "ray_actor_options": {"num_cpus": threads},
        # a replica takes its running request, --max-queue waiting ones, and room for /progress, /health polls
        "max_ongoing_requests": cfg.max_queue + 4,
        # requests pass through the proxy's queue while it picks a replica: bounded, but not so tightly that a
        # burst the replicas would take is refused on its way to them
        "max_queued_requests": 16 + 4 * cfg.max_queue,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=RETRY_AFTER_S),
    }


def run(engines: Path, cfg: ServeConfig, *, host: str, port: int, replicas: int, autoscaling: dict[str, Any] | None,
        threads: int, verify: str, device: str | None, address: str | None) -> None:
    """Deploy and serve until Ctrl-C / SIGTERM, then remove the deployment (and the local Ray instance, if this started one)."""
    from ..raycluster import connect

    ray = connect(address)
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    replica = serve.deployment(name="sdrt", **deployment_options(cfg, replicas, autoscaling, threads))(serve.ingress()(Replica))
    serve.run(replica.bind(str(engines), cfg, threads, verify, device), name="sdrt", route_prefix="/")
    print(f"serving {engines} on http://{host}:{port}/ with Ray Serve "
          f"({'autoscaling ' + str(autoscaling) if autoscaling else str(replicas) + ' replicas'})", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1):
        pass
    serve.delete("sdrt")  # what this command deployed goes with it, on a cluster too
    if address is None:
        serve.shutdown()
    ray.shutdown()
