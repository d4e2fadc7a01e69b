"""The search engine behind the HTTP service: model and index loaded once, text queries encoded in micro-batches,
uploads decoded safely, images and thumbnails read from the index's sources, new index generations picked up.

Micro-batching: text queries that arrive while the model is busy are encoded together in the next forward pass
(no waiting window, so a lone query pays nothing). Under concurrent load this turns many small forward passes into
fewer larger ones.
"""

from __future__ import annotations

import concurrent.futures
import io
import logging
import os
import queue
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cn_clip.errors import CnClipError, DataError
from cn_clip.eval import features as F
from cn_clip.search import store

_logger = logging.getLogger(__name__)


class UploadError(CnClipError):
    """An uploaded file the service refuses (answered with 400 and this message)."""


class MicroBatcher:
    """Run ``fn(list_of_items) -> list_of_results`` on one worker thread; items queued while it runs are taken
    together (up to ``max_batch``) in its next call."""

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], max_batch: int = 32) -> None:
        self.fn = fn
        self.max_batch = max_batch
        self.batch_sizes: list[int] = []  # recent batch sizes, for /api/info
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="cn_clip-text-batcher", daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((item, future))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    entry = self._queue.get_nowait()
                except queue.Empty:
                    break
                if entry is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(entry)
            self.batch_sizes = [*self.batch_sizes[-99:], len(batch)]
            try:
                results = self.fn([item for item, _ in batch])
            except Exception as exc:  # handed to every waiting request, which reports it
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)


def open_upload(data: bytes, max_pixels: int) -> Any:
    """Decode an uploaded image; :class:`UploadError` for non-images and for images over ``max_pixels`` (checked on
    the header, before any pixel is decoded: a decompression bomb is refused without being expanded)."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise UploadError(
                    f"image is {image.width}×{image.height} pixels, over the limit of {max_pixels} "
                    "(a decompression bomb?)"
                )
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise UploadError(f"image refused: {exc}") from None
        except UnidentifiedImageError:
            raise UploadError("not an image (expected JPEG, PNG, WebP, GIF, BMP or TIFF)") from None
        except OSError as exc:
            raise UploadError(f"cannot decode the image ({exc})") from None
    return image


@dataclass
class Scored:
    row: int
    score: float


class SearchEngine:
    """A model and the current generation of an index directory. Methods are safe to call from many threads;
    :meth:`reload` swaps the gallery in one assignment, so a request works on the generation it started with."""

    def __init__(
        self,
        index_dir: str | os.PathLike,
        model: Any,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        calibrator: Callable[[np.ndarray], np.ndarray] | None = None,
        max_batch: int = 32,
        thumbnail_cache: int = 2048,
        text_encoder: F.Encoder | None = None,
        image_encoder: F.Encoder | None = None,
    ) -> None:
        from cn_clip.transforms import image_transform

        self.index_dir = Path(index_dir)
        self.gallery = store.load(self.index_dir)
        self._stamp = self._meta_stamp()
        self.model = model
        self.device = device
        self.precision = precision
        self.calibrator = calibrator
        self.transform = image_transform(self.gallery.meta["resolution"])
        # Queries come one at a time: exported ONNX towers (--text-onnx, --image-onnx) are 3-7x faster on a CPU.
        self.text_encoder = text_encoder or F.TorchEncoder(model.encode_text, device, precision)
        self.image_encoder = image_encoder or F.TorchEncoder(model.encode_image, device, precision)
        self.batcher = MicroBatcher(self._encode_texts, max_batch)
        self._reload_lock = threading.Lock()
        self._thumbs: OrderedDict[tuple, tuple[bytes, str]] = OrderedDict()
        self._thumbs_max = thumbnail_cache
        self._thumbs_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------- encoding
    def _encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        from cn_clip.tokenizer import normalize_text, tokenize

        context_length = self.gallery.meta.get("context_length", 52)
        tokens = tokenize([normalize_text(t) for t in texts], context_length=context_length)
        return list(F.l2_normalize(self.text_encoder(tokens)))

    def encode_text(self, text: str) -> concurrent.futures.Future:
        """A future of the L2-normalised ``[D]`` feature of ``text`` (encoded with other queued texts)."""
        return self.batcher.submit(text)

    def encode_image(self, image: Any) -> np.ndarray:
        return F.l2_normalize(self.image_encoder(self.transform(image.convert("RGB"))[None]))[0]

    def warm_up(self) -> None:
        """One text and one image forward pass, so the first request does not pay for lazy initialisation."""
        from PIL import Image

        started = time.perf_counter()
        self.encode_text("热身").result()
        self.encode_image(Image.new("RGB", (64, 64), (128, 128, 128)))
        self.search(self.gallery, np.zeros(self.gallery.index.d, np.float32) + 1.0, 1, 0)
        _logger.info("warmed up in %.2f s", time.perf_counter() - started)

    # --------------------------------------------------------------------------------------------- search
    def search(self, gallery: store.Gallery, vector: np.ndarray, k: int, offset: int, skip: int = -1) -> list[Scored]:
        """Hits ``offset .. offset + k`` of ``vector`` in ``gallery`` (row ``skip`` left out)."""
        want = min(k + offset + (skip >= 0), gallery.index.ntotal)
        if want == 0:
            return []
        query = np.ascontiguousarray(vector, dtype=np.float32)[None]
        sims, rows = gallery.index.search(query, want)
        found = [Scored(int(r), float(s)) for r, s in zip(rows[0], sims[0], strict=True) if r >= 0 and r != skip]
        return found[offset : offset + k]

    def probabilities(self, scores: Sequence[float]) -> list[float] | None:
        if self.calibrator is None:
            return None
        return [float(p) for p in np.asarray(self.calibrator(np.asarray(scores, np.float64)))]

    # --------------------------------------------------------------------------------------------- images
    def image_bytes(self, gallery: store.Gallery, row: int) -> bytes:
        source, key = gallery.source_of(row)
        if source["kind"] == "folder":
            return (Path(source["path"]) / key).read_bytes()
        if source["kind"] == "files":
            from cn_clip.data.filelist import read_bytes

            return read_bytes(key)
        if source["kind"] == "shards":
            from cn_clip.data.sources import read_shard_bytes

            number, offset, size = (int(part) for part in key.split(":"))
            return read_shard_bytes(source["shards"][number], offset, size)
        if source["kind"] == "list":  # indexes built before shard and file-list rows kept their location
            raise DataError(f"image {key}: this index predates served shard/file-list images; rebuild it to see them")
        from cn_clip.data.formats import b64decode_image
        from cn_clip.data.lmdb_dataset import _open_env  # one handle per process and path, shared with the readers

        with _open_env(Path(source["path"])).begin() as txn:
            value = txn.get(key.encode("utf-8"))
        if value is None:
            raise DataError(f"image key {key} is no longer in {source['path']}")
        return b64decode_image(bytes(value))

    def image(self, gallery: store.Gallery, row: int, size: int | None) -> tuple[bytes, str]:
        """``(bytes, media type)``: the stored image, or a JPEG thumbnail no larger than ``size`` on a side."""
        from PIL import Image

        raw = self.image_bytes(gallery, row)
        if size is None:
            with Image.open(io.BytesIO(raw)) as image:
                return raw, Image.MIME.get(image.format or "", "application/octet-stream")
        key = (gallery.source_of(row)[0]["path"], gallery.source_of(row)[1], size)
        with self._thumbs_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        with Image.open(io.BytesIO(raw)) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=85)
        entry = (out.getvalue(), "image/jpeg")
        with self._thumbs_lock:
            self._thumbs[key] = entry
            while len(self._thumbs) > self._thumbs_max:
                self._thumbs.popitem(last=False)
        return entry

    # ------------------------------------------------------------------------------------ index versions
    def _meta_stamp(self) -> tuple[int, int]:
        stat = (self.index_dir / store.META_FILE).stat()
        return stat.st_ino, stat.st_mtime_ns

    def reload(self, force: bool = False) -> bool:
        """Load the directory's current generation if ``meta.json`` changed; True when a new one was swapped in.
        A failed load keeps serving the old generation and raises."""
        with self._reload_lock:
            stamp = self._meta_stamp()
            if stamp == self._stamp and not force:
                return False
            gallery = store.load(self.index_dir)
            if gallery.index.d != self.gallery.index.d:
                raise DataError(
                    f"{self.index_dir}: new generation is {gallery.index.d}-d, the model gives {self.gallery.index.d}-d"
                )
            self.gallery, self._stamp = gallery, stamp
            _logger.info("index generation %d loaded: %d images", gallery.generation, gallery.index.ntotal)
            return True

    def watch(self, interval: float, stop: threading.Event) -> threading.Thread:
        """Poll ``meta.json`` every ``interval`` seconds and reload on change, until ``stop`` is set."""

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    self.reload()
                except (CnClipError, OSError, RuntimeError) as exc:
                    _logger.error("index reload failed, still serving generation %d: %s", self.gallery.generation, exc)

        thread = threading.Thread(target=loop, name="cn_clip-index-watch", daemon=True)
        thread.start()
        return thread

    def info(self) -> dict[str, Any]:
        meta = self.gallery.meta
        keys = ("architecture", "index_type", "factory", "recall_at_10", "build_seconds", "created", "updated")
        return {
            **{key: meta.get(key) for key in keys},
            "count": int(self.gallery.index.ntotal),
            "dim": int(self.gallery.index.d),
            "generation": self.gallery.generation,
            "calibrated": self.calibrator is not None,
            "device": self.device,
            "precision": self.precision,
        }

    def close(self) -> None:
        self.batcher.close()
