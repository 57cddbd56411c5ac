"""``grmpiqa serve``: an HTTP scoring service (FastAPI + uvicorn) and a web page.

* :mod:`grmpiqa.serve.engine` - the one adapter between the service and the scoring
  engine (model load, preprocessing, batched scores, quality maps, model card).
* :mod:`grmpiqa.serve.batcher` - micro-batching of images from concurrent requests.
* :mod:`grmpiqa.serve.uploads` - request bodies -> named images or per-image errors.
* :mod:`grmpiqa.serve.app` - the FastAPI application (``/v1/score``, ``/v1/health``,
  ``/v1/models``, ``/metrics``, the page at ``/``).

FastAPI, uvicorn and python-multipart come with ``pip install 'grmpiqa[serve]'``.
"""

from __future__ import annotations

SERVE_EXTRA_HINT = "the service needs FastAPI and uvicorn: pip install 'grmpiqa[serve]'"
