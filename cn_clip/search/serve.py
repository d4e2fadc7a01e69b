"""HTTP search service and web page (``python -m cn_clip.search serve``), on FastAPI + uvicorn.

``create_app(engine, limits)`` builds the application without binding a port (tests drive it with FastAPI's
TestClient); :func:`serve` loads the model and index once, warms them up, then opens the port.

Safety: binds 127.0.0.1 unless told otherwise; uploads over ``max_upload_mb`` get 413, images over Pillow's pixel
limit and non-images 400; images are served only by indexed id (never a path from the request; ``..``, absolute
paths and encoded separators get 404); bad parameters get 422 naming the field; at most ``max_concurrency``
requests are in flight (the rest get 503); an unexpected error is logged with its traceback and answered with a
one-line 500.
"""

# No `from __future__ import annotations`: FastAPI reads the route parameters' annotations at definition time.
import asyncio
import logging
import os
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cn_clip.errors import CnClipError, ConfigError
from cn_clip.extras import require
from cn_clip.runtime import resolve_device

_logger = logging.getLogger(__name__)

STATIC = resources.files("cn_clip.search") / "static"


@dataclass
class Limits:
    """What one request may ask for or send."""

    max_upload_mb: float = 10.0
    max_image_pixels: int | None = None  # None: Pillow's Image.MAX_IMAGE_PIXELS
    max_concurrency: int = 32
    watch_interval: float = 2.0  # seconds between meta.json checks; 0 turns watching off

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def pixel_limit(self) -> int:
        from PIL import Image

        return self.max_image_pixels or int(Image.MAX_IMAGE_PIXELS or 89_478_485)


@dataclass
class ServeConfig:
    index: str
    host: str = "127.0.0.1"
    port: int = 8000
    resume: str | None = None
    calibration: str | None = None
    device: str | None = None
    precision: str = "fp32"
    limits: Limits | None = None
    text_onnx: str | None = None  # an exported text tower (*.txt.{fp32,fp16,int8}.onnx) for the text queries
    image_onnx: str | None = None  # an exported image tower (*.img.*.onnx) for uploaded query images


class ConcurrencyLimit:
    """ASGI middleware: at most ``limit`` HTTP requests in flight; the next ones are answered 503 at once."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.active = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            from starlette.responses import JSONResponse

            response = JSONResponse({"detail": "server busy, try again"}, status_code=503, headers={"Retry-After": "1"})
            await response(scope, receive, send)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


def _error(status: int, detail: str, **extra: Any) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": detail, **extra}, status_code=status)


def image_url(item_id: Any) -> str:
    return "/api/images/" + quote(str(item_id), safe="/")


_BAD_RAW = ("%2f", "%5c", "%00", "\\")


def _is_safe_id_path(raw_path: bytes, prefix: str, image_id: str) -> bool:
    """False for ``..``/``.`` segments, absolute paths and percent-encoded separators anywhere in the id part."""
    raw = raw_path.decode("latin-1")
    tail = raw[raw.find(prefix) + len(prefix) :] if prefix in raw else raw
    if any(bad in tail.lower() for bad in _BAD_RAW) or tail.startswith("/"):
        return False
    segments = image_id.split("/")
    return image_id != "" and not image_id.startswith("/") and all(s not in ("", ".", "..") for s in segments)


MAX_K, MAX_OFFSET, MAX_QUERY_CHARS = 200, 10_000, 200


def _hits(engine: Any, gallery: Any, found: list[Any], offset: int) -> list[dict[str, Any]]:
    probabilities = engine.probabilities([hit.score for hit in found])
    out = []
    for position, hit in enumerate(found):
        item_id = gallery.ids[hit.row]
        entry = {"id": item_id, "rank": offset + position + 1, "score": round(hit.score, 6)}
        if probabilities is not None:
            entry["probability"] = round(probabilities[position], 6)
        out.append({**entry, "image_url": image_url(item_id)})
    return out


def _page(engine: Any, gallery: Any, found: list[Any], k: int, offset: int, **query: Any) -> dict[str, Any]:
    results = _hits(engine, gallery, found, offset)
    total = int(gallery.index.ntotal)
    candidates = total - (1 if "similar_to" in query else 0)
    more = len(results) == k and offset + k < candidates
    return {**query, "k": k, "offset": offset, "total": total, "has_more": more, "results": results}


def _lookup(request: Any, prefix: str, image_id: str) -> tuple[Any, int]:
    from fastapi import HTTPException

    gallery = request.app.state.engine.gallery
    if not _is_safe_id_path(request.scope.get("raw_path") or b"", prefix, image_id):
        raise HTTPException(404, "no such image")
    row = gallery.row_of.get(image_id)
    if row is None:
        raise HTTPException(404, f"no image with id {image_id!r} in the index")
    return gallery, row


async def _read_upload(request: Any, limits: Limits) -> bytes:
    """The uploaded file (multipart field ``image``, or a raw image body), read no further than the cap."""
    from fastapi import HTTPException

    cap = limits.max_upload_bytes
    slack = 64 * 1024  # multipart headers and boundaries ride on top of the file
    too_big = HTTPException(413, f"upload over the {limits.max_upload_mb:g} MB limit")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap + slack:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > cap + slack:
            raise too_big
    content_type = request.headers.get("content-type", "")
    data = await _multipart_file(content_type, bytes(body)) if content_type.startswith("multipart/") else bytes(body)
    if len(data) > cap:
        raise too_big
    if not data:
        raise HTTPException(400, "no image uploaded (send the file in the multipart field 'image')")
    return data


def _router() -> Any:
    from fastapi import APIRouter, Query, Request
    from fastapi.responses import FileResponse, Response
    from starlette.concurrency import run_in_threadpool

    from cn_clip.search.engine import UploadError, open_upload

    router = APIRouter()
    K = Query(20, ge=1, le=MAX_K, description="number of hits")
    OFFSET = Query(0, ge=0, le=MAX_OFFSET, description="hits to skip (paging)")
    SIZE = Query(None, ge=16, le=1024, description="thumbnail: longest side in pixels")

    @router.get("/api/search")
    async def search_text(
        request: Request,
        q: str = Query(..., min_length=1, max_length=MAX_QUERY_CHARS),
        k: int = K,
        offset: int = OFFSET,
    ) -> Any:
        if not q.strip():
            return _error(422, "q: the query is blank", field="q")
        engine = request.app.state.engine
        gallery = engine.gallery
        vector = await asyncio.wrap_future(engine.encode_text(q))
        found = await run_in_threadpool(engine.search, gallery, vector, k, offset)
        return _page(engine, gallery, found, k, offset, query=q)

    @router.post("/api/search")
    async def search_image(request: Request, k: int = K, offset: int = OFFSET) -> Any:
        engine, limits = request.app.state.engine, request.app.state.limits
        data = await _read_upload(request, limits)
        try:
            image = await run_in_threadpool(open_upload, data, limits.pixel_limit())
        except UploadError as exc:
            return _error(400, str(exc))
        gallery = engine.gallery
        vector = await run_in_threadpool(engine.encode_image, image)
        found = await run_in_threadpool(engine.search, gallery, vector, k, offset)
        return _page(engine, gallery, found, k, offset, query_image=True)

    @router.get("/api/similar/{image_id:path}")
    async def similar(request: Request, image_id: str, k: int = K, offset: int = OFFSET) -> Any:
        engine = request.app.state.engine
        gallery, row = _lookup(request, "/api/similar/", image_id)
        vector = await run_in_threadpool(lambda: gallery.vectors[row].astype("float32"))
        found = await run_in_threadpool(engine.search, gallery, vector, k, offset, row)
        return _page(engine, gallery, found, k, offset, similar_to=gallery.ids[row])

    @router.get("/api/images/{image_id:path}")
    async def image(request: Request, image_id: str, size: int | None = SIZE) -> Any:
        gallery, row = _lookup(request, "/api/images/", image_id)
        data, media_type = await run_in_threadpool(request.app.state.engine.image, gallery, row, size)
        return Response(data, media_type=media_type, headers={"Cache-Control": "public, max-age=3600"})

    @router.get("/api/health")
    async def health(request: Request) -> Any:
        gallery = request.app.state.engine.gallery
        return {"status": "ok", "count": int(gallery.index.ntotal), "generation": gallery.generation}

    @router.get("/api/info")
    async def info(request: Request) -> Any:
        return request.app.state.engine.info()

    @router.post("/api/reload")
    async def reload(request: Request) -> Any:
        engine = request.app.state.engine
        try:
            changed = await run_in_threadpool(engine.reload)
        except CnClipError as exc:  # a damaged or mismatched new generation: keep serving the old one, say why
            return _error(409, f"reload refused, still serving generation {engine.gallery.generation}: {exc}")
        return {"reloaded": changed, **engine.info()}

    @router.get("/", include_in_schema=False)
    async def index_page() -> Any:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html; charset=utf-8")

    return router


def create_app(engine: Any, limits: Limits | None = None) -> Any:
    """The FastAPI application over a :class:`~cn_clip.search.engine.SearchEngine` (or anything with its
    methods); nothing is bound until uvicorn runs it."""
    require("fastapi", "python -m cn_clip.search serve")
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or Limits()

    @asynccontextmanager
    async def lifespan(_: Any):
        stop = threading.Event()
        if limits.watch_interval > 0:
            engine.watch(limits.watch_interval, stop)
        yield
        stop.set()

    app = FastAPI(title="cn_clip search", lifespan=lifespan, docs_url="/api/docs", redoc_url=None)
    app.state.engine, app.state.limits = engine, limits
    app.add_middleware(ConcurrencyLimit, limit=limits.max_concurrency)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _crashed)
    app.include_router(_router())
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


async def _invalid(_: Any, exc: Any) -> Any:
    first = exc.errors()[0]
    field = str(first["loc"][-1]) if first.get("loc") else "request"
    return _error(422, f"{field}: {first.get('msg', 'invalid value')}", field=field)


async def _http_error(_: Any, exc: Any) -> Any:
    return _error(exc.status_code, str(exc.detail))


async def _crashed(request: Any, exc: Exception) -> Any:
    _logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _error(500, "internal error; the server log has the details")


async def _multipart_file(content_type: str, body: bytes) -> bytes:
    """The ``image`` field (or the first file) of a multipart body already read into memory."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "headers": [(b"content-type", content_type.encode("latin-1"))]}
    form = await Request(scope, receive).form(max_files=1, max_fields=10)
    try:
        field = form.get("image")
        if not isinstance(field, UploadFile):
            field = next((v for v in form.values() if isinstance(v, UploadFile)), None)
        return b"" if field is None else await field.read()
    finally:
        await form.close()


def load_engine(config: ServeConfig) -> Any:
    """The model (the index's checkpoint unless ``config.resume``), the index and the calibration, warmed up."""
    from cn_clip.eval import features as F
    from cn_clip.search import store
    from cn_clip.search.engine import SearchEngine

    meta = store.read_meta(config.index)
    device = resolve_device(config.device)
    checkpoint = config.resume or meta["checkpoint"]
    model, _ = F.load_eval_model(meta["architecture"], checkpoint, device, config.precision, announce=False)
    calibrator = None
    if config.calibration:
        try:
            from cn_clip.eval.calibrate import Calibrator
        except ImportError:
            raise ConfigError("--calibration needs cn_clip.eval.calibrate, which this install lacks") from None
        calibrator = Calibrator.load(config.calibration)
    encoders = {}
    if config.text_onnx:
        encoders["text_encoder"] = onnx_encoder(config.text_onnx, model, device, "txt", meta.get("context_length", 52))
    if config.image_onnx:
        encoders["image_encoder"] = onnx_encoder(config.image_onnx, model, device, "img")
    engine = SearchEngine(
        config.index, model, device=device, precision=config.precision, calibrator=calibrator, **encoders
    )
    engine.warm_up()
    return engine


def onnx_encoder(path: str, model: Any, device: str, kind: str, context_length: int = 52) -> Any:
    """The exported ONNX ``kind`` tower ("txt" or "img") at ``path``, checked against ``model``'s own on the
    deployment parity inputs (captions, a real and a random image): a graph exported from another checkpoint or of
    the other tower is refused, naming the cosine it reached."""
    import numpy as np

    from cn_clip.deploy import onnx_export as O
    from cn_clip.eval import features as F
    from cn_clip.tokenizer import get_tokenizer

    flag = "--text-onnx" if kind == "txt" else "--image-onnx"
    if not Path(path).is_file():
        raise ConfigError(f"{flag} {path}: no such file (export one with python -m cn_clip.deploy.pytorch_to_onnx)")
    encoder = F.OnnxEncoder(path, device)
    if encoder.is_text != (kind == "txt"):
        takes = "token ids" if encoder.is_text else "images"
        raise ConfigError(f"{flag} {path}: this graph takes {takes}; give the {kind} graph (*.{kind}.*.onnx)")
    if kind == "txt":
        inputs = get_tokenizer(model.cfg)(list(O.PARITY_CAPTIONS), context_length)
        expected = F.TorchEncoder(model.encode_text, device, "fp32")(inputs)
    else:
        import torch

        inputs = torch.cat(O.parity_inputs(model, "img"))
        expected = F.TorchEncoder(model.encode_image, device, "fp32")(inputs)
    actual = encoder(inputs)
    if actual.shape != expected.shape:
        raise ConfigError(f"{flag} {path}: features of shape {actual.shape[1:]}, the index's model gives "
                          f"{expected.shape[1:]}")  # fmt: skip
    cosine = np.sum(F.l2_normalize(expected) * F.l2_normalize(actual), axis=1)
    floor = min(O.MIN_COSINE.values())
    if float(cosine.min()) < floor:
        raise ConfigError(
            f"{flag} {path}: its features differ from the index's checkpoint (cosine {cosine.min():.4f} < "
            f"{floor}); export that checkpoint's {'text' if kind == 'txt' else 'image'} tower"
        )
    _logger.info("%s queries through %s (cosine to PyTorch >= %.5f)", kind, path, cosine.min())
    return encoder


def serve(config: ServeConfig) -> None:
    """Load, warm up, then serve until interrupted (the port opens only after the warm-up)."""
    uvicorn = require("uvicorn", "python -m cn_clip.search serve")

    limits = config.limits or Limits()
    engine = load_engine(config)
    app = create_app(engine, limits)
    count = engine.gallery.index.ntotal
    _logger.info("serving %d images from %s on http://%s:%d/", count, os.fspath(config.index), config.host, config.port)
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_keep_alive=5)
    finally:
        engine.close()
