"""Helpers for the data tests: a local HTTP server (127.0.0.1) with Range support and a connection-dropping
mode, and tiny datasets written in each real on-disk format."""
from __future__ import annotations

import hashlib
import io
import json
import threading
from contextlib import contextmanager
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image


class _Handler(BaseHTTPRequestHandler):
    """GET /<file> serves files from `root`; honours 'Range: bytes=N-'. Paths under /drop/ send only the first
    `drop_after` bytes of the body (while announcing the full length) and close the connection, the first
    `drops` times they are requested."""

    def __init__(self, *args, state: dict, **kwargs):
        self.state = state
        super().__init__(*args, **kwargs)

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.lstrip("/")
        drop = path.startswith("drop/")
        if drop:
            path = path[len("drop/") :]
        file = self.state["root"] / path
        self.state["requests"].append({"path": self.path, "range": self.headers.get("Range")})
        if not file.is_file():
            self.send_error(404, "not found")
            return
        data = file.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and not self.state.get("ignore_range"):
            start = int(rng[len("bytes=") :].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if drop and self.state["drops"] > 0:
            self.state["drops"] -= 1
            self.wfile.write(body[: self.state["drop_after"]])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@contextmanager
def http_server(root: Path, drops: int = 1, drop_after: int = 1000) -> Iterator[tuple[str, dict]]:
    """Yield (base_url, state); state["requests"] records each request's path and Range header."""
    state = {"root": Path(root), "requests": [], "drops": drops, "drop_after": drop_after}
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, state=state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------------------------
# Images and formats
# ---------------------------------------------------------------------------------------------------------
def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth-ish random RGB image (so lossy codecs keep it recognisable)."""
    base = rng.integers(0, 256, size=(h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR))
    noise = rng.integers(0, 32, size=(h, w, 3))
    return np.clip(img.astype(np.int64) + noise, 0, 255).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_lsun_lmdb(path: Path, images: dict[str, bytes]) -> None:
    """LSUN's export format: an LMDB environment folder, key = image id (bytes), value = encoded image."""
    import lmdb

    path.parent.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 26, subdir=True)
    with env.begin(write=True) as txn:
        for key, value in images.items():
            txn.put(key.encode(), value)
    env.close()


def make_ffhq_tree(root: Path, images: dict[int, np.ndarray], url_base: Optional[str] = None) -> dict:
    """images1024x1024/<thousands>/<NNNNN>.png plus ffhq-dataset-v2.json with file_path/file_url/file_md5."""
    meta = {}
    for n, arr in images.items():
        rel = f"images1024x1024/{n // 1000 * 1000:05d}/{n:05d}.png"
        data = encode(arr, "PNG")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        meta[str(n)] = {
            "category": "training",
            "image": {
                "file_url": f"{url_base}/{rel}" if url_base else f"https://example.invalid/{rel}",
                "file_path": rel,
                "file_size": len(data),
                "file_md5": hashlib.md5(data).hexdigest(),
                "pixel_size": [arr.shape[1], arr.shape[0]],
            },
        }
    (root / "ffhq-dataset-v2.json").write_text(json.dumps(meta))
    return meta


def truncate_file(path: Path, keep_fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
