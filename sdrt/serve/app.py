"""`sdrt serve`: one engine folder as an HTTP service. The AUTOMATIC1111 WebUI's API (`/sdapi/v1/*`), OpenAI's
Images API (`/v1/images/generations`), `/health` and `/metrics` (Prometheus), on FastAPI; one pipeline shared by
every request through `jobs.Worker`."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import secrets
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..errors import SdrtError, as_field
from ..image_io import png_bytes, webui_parameters
from ..manifest import model_hash
from ..pipeline import GenerateRequest, StableDiffusion
from . import openai_images, webui
from .jobs import ClientGone, QueueFull, Worker

RETRY_AFTER_S = 5
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away: nobody reads it


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    api_key: str | None = None  # every route but /health needs it: Authorization: Bearer KEY, or HTTP Basic with KEY as password
    max_queue: int = 16  # requests waiting beyond the one running; more get 429
    max_images: int = 4  # images per request
    max_steps: int = 150
    max_pixels: int = 1024 * 1024  # width x height of one image
    max_body_bytes: int = 50 * 1024 * 1024  # request bodies (base64 images) above this get 413
    timeout_s: float | None = None  # a generation running longer is stopped at its next step (504)


class _Limit(SdrtError):
    pass


def _check_limits(req: GenerateRequest, cfg: ServeConfig, pipe: StableDiffusion) -> None:
    s = pipe.settings(req)
    if req.num_images > cfg.max_images:
        raise _Limit(f"{req.num_images} images per request: this server's limit is {cfg.max_images}")
    if s.steps > cfg.max_steps:
        raise _Limit(f"steps {s.steps}: this server's limit is {cfg.max_steps}")
    if s.height * s.width > cfg.max_pixels:
        raise _Limit(f"size {s.width}x{s.height}: this server's limit is {cfg.max_pixels} pixels per image")


def create_app(pipe: StableDiffusion, cfg: ServeConfig) -> FastAPI:
    worker = Worker(pipe, cfg.max_queue, cfg.timeout_s)
    manifest = pipe.manifest or {}
    name = Path(manifest.get("model", {}).get("source", "sdrt")).stem
    hash_ = model_hash(manifest) if manifest else ""
    registry = CollectorRegistry()
    served = Counter("sdrt_images", "images generated", registry=registry)
    rejected = Counter("sdrt_requests_rejected", "requests refused because the queue was full", registry=registry)
    depth = Gauge("sdrt_queue_depth", "requests waiting for the pipeline", registry=registry)
    depth.set_function(lambda: worker.waiting)
    step_latency = Histogram("sdrt_step_seconds", "seconds per denoising step", registry=registry,
                             buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30))
    worker.on_step_seconds = step_latency.observe

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.close()

    app = FastAPI(title="sdrt", version=manifest.get("sdrt_version", ""), docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.worker = worker

    def authorized(request: Request) -> None:
        if cfg.api_key is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        key = value
        if scheme.lower() == "basic":
            try:
                key = base64.b64decode(value).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                key = ""
        if not secrets.compare_digest(key.encode(), cfg.api_key.encode()):
            if request.url.path.startswith("/v1/"):
                raise openai_images.ApiError(401, "Incorrect API key provided", code="invalid_api_key")
            raise HTTPException(401, "a valid API key is required (Authorization: Bearer KEY, or HTTP Basic with KEY as the password)",
                                headers={"WWW-Authenticate": 'Bearer realm="sdrt"'})  # not Basic: browsers would pop up a login box over the page

    @app.middleware("http")
    async def body_limit(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_body_bytes:
            message = f"request body of {int(length)} bytes: this server's limit is {cfg.max_body_bytes}"
            if request.url.path.startswith("/v1/"):
                return JSONResponse(openai_images.ApiError(413, message).body(), status_code=413)
            return JSONResponse({"detail": message}, status_code=413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        if request.url.path.startswith("/v1/"):
            first = exc.errors()[0]["loc"][1:] if exc.errors() else ()
            return JSONResponse(openai_images.ApiError(400, problems, ".".join(map(str, first)) or None).body(), status_code=400)
        return JSONResponse({"detail": problems, "error": "ValidationError"}, status_code=422)

    @app.exception_handler(openai_images.ApiError)
    async def openai_error(request: Request, exc: openai_images.ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers={"Retry-After": str(RETRY_AFTER_S)} if exc.status == 429 else None)

    async def run(req: GenerateRequest, request: Request):
        try:
            _check_limits(req, cfg, pipe)
            result = await worker.run(req, request.is_disconnected)
        except QueueFull:
            rejected.inc()
            raise
        served.inc(len(result.images))
        if result.stopped_by == "timeout":
            raise TimeoutError(f"the generation ran past this server's timeout of {cfg.timeout_s:g} s")
        return result

    def encoded(result) -> list[str]:
        return [base64.b64encode(png_bytes(image, meta)).decode() for image, meta in zip(result.images, result.metadata)]

    async def webui_call(req_model: webui.Txt2ImgRequest, request: Request, images=None):
        try:
            req = webui.generate_request(req_model, images)
            result = await run(req, request)
        except QueueFull:
            return JSONResponse({"detail": f"the queue is full ({cfg.max_queue} waiting); retry later"}, status_code=429,
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        except TimeoutError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=504)
        except SdrtError as exc:
            return JSONResponse({"detail": as_field(exc), "error": "ValueError"}, status_code=422)
        infotexts = [webui_parameters(meta) for meta in result.metadata]
        return {"images": encoded(result), "parameters": req_model.model_dump(), "info": webui.info_json(req, result.metadata, infotexts, name)}

    page = (Path(__file__).parent / "page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page  # plain HTML and JS: the API calls from it carry the key, the page itself is public

    @app.get("/health")
    async def health():
        return {"status": "ok", "waiting": worker.waiting, "busy": worker.current is not None}

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/sdapi/v1/txt2img", dependencies=[Depends(authorized)])
    async def txt2img(body: webui.Txt2ImgRequest, request: Request):
        return await webui_call(body, request)

    @app.post("/sdapi/v1/img2img", dependencies=[Depends(authorized)])
    async def img2img(body: webui.Img2ImgRequest, request: Request):
        try:
            images = webui.img2img_inputs(body)
        except SdrtError as exc:
            return JSONResponse({"detail": as_field(exc), "error": "ValueError"}, status_code=422)
        return await webui_call(body, request, images)

    @app.get("/sdapi/v1/progress", dependencies=[Depends(authorized)])
    async def progress(skip_current_image: bool = False):
        job = worker.current
        preview = None
        if job is not None and not skip_current_image:
            job.preview_wanted = time.monotonic()
            preview = job.preview
        fraction, eta = 0.0, 0.0
        if job is not None and job.steps:
            fraction = job.step / job.steps
            elapsed = time.monotonic() - (job.started or time.monotonic())
            eta = elapsed / job.step * (job.steps - job.step) if job.step else 0.0
        state = {"skipped": False, "interrupted": bool(job and job.stopped_by == "interrupt"), "job": "", "job_count": worker.waiting +
                 (job is not None), "job_timestamp": "0", "job_no": 0, "sampling_step": job.step if job else 0,
                 "sampling_steps": job.steps if job else 0}
        return {"progress": fraction, "eta_relative": eta, "state": state, "current_image": preview,
                "textinfo": f"preview of step {job.preview_step}" if preview else None}

    @app.post("/sdapi/v1/interrupt", dependencies=[Depends(authorized)])
    async def interrupt():
        worker.interrupt()
        return {}

    @app.get("/sdapi/v1/sd-models", dependencies=[Depends(authorized)])
    async def sd_models():
        return webui.sd_models(name, manifest.get("model", {}).get("source", ""), hash_)

    @app.get("/sdapi/v1/samplers", dependencies=[Depends(authorized)])
    async def samplers():
        return webui.samplers()

    @app.get("/sdapi/v1/schedulers", dependencies=[Depends(authorized)])
    async def schedulers():
        return [{"name": n, "label": n.title()} for n in webui.SCHEDULE_TYPES]

    @app.get("/sdapi/v1/options", dependencies=[Depends(authorized)])
    async def options():
        return {"sd_model_checkpoint": f"{name} [{hash_}]", "sd_checkpoint_hash": hash_}

    @app.get("/sdapi/v1/scripts", dependencies=[Depends(authorized)])
    async def scripts():
        return {"txt2img": [], "img2img": []}  # no WebUI scripts or extensions

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "sdrt"}]}

    async def openai_call(body: openai_images.ImagesRequest, request: Request, images: dict | None = None):
        try:
            req = openai_images.generate_request(body, images)
            result = await run(req, request)
        except QueueFull:
            raise openai_images.ApiError(429, f"the queue is full ({cfg.max_queue} waiting); retry later", code="rate_limit_exceeded",
                                         kind="requests") from None
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        except TimeoutError as exc:
            raise openai_images.ApiError(504, str(exc), kind="server_error") from None
        except SdrtError as exc:
            raise openai_images.ApiError(400, as_field(exc)) from None
        return openai_images.response(encoded(result))

    @app.post("/v1/images/generations", dependencies=[Depends(authorized)])
    async def images(body: openai_images.ImagesRequest, request: Request):
        return await openai_call(body, request)

    @app.post("/v1/images/edits", dependencies=[Depends(authorized)])
    async def edits(request: Request, image: UploadFile, prompt: str = Form(...), mask: UploadFile | None = None, n: int = Form(1),
                    size: str | None = Form(None), response_format: str | None = Form(None), seed: int | None = Form(None),
                    negative_prompt: str = Form(""), steps: int | None = Form(None), guidance: float | None = Form(None),
                    strength: float | None = Form(None)):
        body = openai_images.ImagesRequest(prompt=prompt, n=n, size=size, response_format=response_format, seed=seed,
                                           negative_prompt=negative_prompt, steps=steps, guidance=guidance)
        try:
            inputs = openai_images.edit_inputs(await image.read(), None if mask is None else await mask.read(), strength)
        except SdrtError as exc:
            raise openai_images.ApiError(400, as_field(exc), "image") from None
        return await openai_call(body, request, inputs)

    return app
