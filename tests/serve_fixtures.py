"""Shared by the serve tests: the demo-scene index (built once per pytest run) and an
in-process uvicorn server on 127.0.0.1."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest


def demo_index(base: Path, clip_dir: Path) -> dict:
    """Build (or reuse within this pytest run) the demo-scene index under `base`."""
    out = base / "serve-demo"
    truth = out / "truth.json"
    if not truth.exists():
        from laion_spark.serve.demo_index import build_demo_index

        build_demo_index(str(out), str(clip_dir))
    return json.loads(truth.read_text())


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@contextmanager
def running(spec):
    """The app of `spec` on a free 127.0.0.1 port in a thread; yields its base URL."""
    import uvicorn

    from laion_spark.serve.app import create_app
    from laion_spark.serve.protocol import UVICORN_HTTP

    app = create_app(spec)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           http=UVICORN_HTTP))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def clip_client_module():
    """clip-retrieval's real `clip_client` module. The package's __init__ imports its Flask
    back (heavy deps we do not install), so the module file is loaded on its own."""
    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("clip-retrieval is not installed (pip install --no-deps "
                           "clip-retrieval==2.45.0; the Makefile's setup does it)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "clip_client.py")
    mspec = importlib.util.spec_from_file_location("clip_retrieval_clip_client", path)
    module = importlib.util.module_from_spec(mspec)
    sys.modules[mspec.name] = module
    mspec.loader.exec_module(module)
    return module


def clip_front_dir() -> Path:
    """front/build as the clip-retrieval wheel installs it (site-packages/front/build)."""
    spec = importlib.util.find_spec("clip_retrieval")
    site = Path(list(spec.submodule_search_locations)[0]).parent
    return site / "front" / "build"


@pytest.fixture(scope="module")
def truth(tmp_path_factory, demo_clip_dir):
    """The demo-scene index's ground truth (rows' scenes, planted ids, paths)."""
    return demo_index(tmp_path_factory.getbasetemp(), demo_clip_dir)


@pytest.fixture(scope="module")
def url(truth):
    """The service over the demo-scene index (thumbnails from its lake), strict fetch policy."""
    from laion_spark.serve.app import ServeSpec

    spec = ServeSpec(indices=[("demo", truth["index"])], lake_root=truth["lake"])
    with running(spec) as base:
        yield base
