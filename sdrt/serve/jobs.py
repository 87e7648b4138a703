"""The server's one pipeline and the requests waiting for it: one generation at a time on one worker thread
(the engines already use every core), at most `max_queue` waiting; a request whose client went away
before its turn never runs, one that goes away during its run is stopped at the next step."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import CancelledError, ThreadPoolExecutor

import numpy as np

from ..errors import first_line
from ..image_io import png_bytes
from ..pipeline import GenerateRequest, StableDiffusion

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often a waiting request checks that its client is still there
PREVIEW_WANTED_S = 3.0  # a preview is made while someone asked for one this recently (GET /progress)
PREVIEW_SHARE = 0.1  # previews take at most this share of the generation's time


class QueueFull(Exception):
    """More requests wait than --max-queue allows."""


class ClientGone(Exception):
    """The client disconnected while its request waited or ran."""


@dataclasses.dataclass
class Job:
    req: GenerateRequest
    step: int = 0
    steps: int = 0
    started: float | None = None
    stopped_by: str | None = None  # "interrupt", "timeout" or "disconnect": the loop ends at its next step
    preview: str | None = None  # base64 PNG: the latents of step `preview_step`, decoded small (encoded once, here)
    preview_step: int = 0
    preview_wanted: float = float("-inf")  # time.monotonic() of the last request for a preview
    _preview_due: float = 0.0  # the next preview waits until then (keeps previews to PREVIEW_SHARE of the time)

    def on_step(self, done: int, total: int) -> bool:
        self.step, self.steps = done, total
        return self.stopped_by is None

    def maybe_preview(self, pipe: StableDiffusion, latents: np.ndarray) -> None:
        """Decode a preview of `latents` if one was asked for lately and the last one's cost has been paid off."""
        now = time.monotonic()
        if now - self.preview_wanted > PREVIEW_WANTED_S or now < self._preview_due:
            return
        try:
            image = pipe.preview(latents)  # (h, w, 3) uint8, or None
            self.preview = None if image is None else base64.b64encode(png_bytes(image, {})).decode()
            self.preview_step = self.step
        except Exception as exc:  # a preview never costs the image  # noqa: BLE001
            log.warning("no previews for this request: %s", first_line(exc))
            self._preview_due = float("inf")
            return
        self._preview_due = now + (time.monotonic() - now) / PREVIEW_SHARE


@dataclasses.dataclass
class Result:
    images: list[np.ndarray]  # (H, W, 3) uint8 each
    metadata: list[dict]
    stopped_by: str | None  # None: every step ran


class Worker:
    def __init__(self, pipe: StableDiffusion, max_queue: int, timeout_s: float | None = None):
        self.pipe, self.max_queue, self.timeout_s = pipe, max_queue, timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdrt-generate")
        self._lock = threading.Lock()
        self.waiting = 0
        self.current: Job | None = None
        self.on_step_seconds: Callable[[float], None] | None = None  # each step's duration, for the metrics

    async def run(self, req: GenerateRequest, client_gone: Callable[[], Awaitable[bool]]) -> Result:
        with self._lock:
            if self.waiting >= self.max_queue:
                raise QueueFull
            self.waiting += 1
        job = Job(req)
        future = self._executor.submit(self._generate, job)
        waiting = asyncio.wrap_future(future)
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(waiting), POLL_S)
            except (TimeoutError, asyncio.TimeoutError):
                if await client_gone():
                    job.stopped_by = "disconnect"
                    if future.cancel():  # it had not started: its place is free now
                        with self._lock:
                            self.waiting -= 1
                    raise ClientGone from None
                if self.timeout_s is not None and job.started is not None and time.monotonic() - job.started > self.timeout_s:
                    job.stopped_by = job.stopped_by or "timeout"
            except CancelledError:
                raise ClientGone from None

    def _generate(self, job: Job) -> Result:
        with self._lock:
            self.waiting -= 1
            self.current = job
        job.started = last = time.monotonic()

        def on_step(done: int, total: int, latents: np.ndarray) -> bool:
            nonlocal last
            now = time.monotonic()
            if self.on_step_seconds is not None:
                self.on_step_seconds(now - last)
            go_on = job.on_step(done, total)
            if go_on and done < total:
                job.maybe_preview(self.pipe, latents)
            last = time.monotonic()  # a preview's time is not the next step's
            return go_on

        try:
            images = self.pipe.generate(job.req, progress=False, on_step=on_step)
            return Result(images, [self.pipe.metadata(job.req, i) for i in range(len(images))], job.stopped_by)
        finally:
            with self._lock:
                self.current = None

    def interrupt(self) -> bool:
        """Stop the running generation at its next step; -> whether one was running."""
        job = self.current
        if job is not None:
            job.stopped_by = job.stopped_by or "interrupt"
        return job is not None

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.pipe.close()
