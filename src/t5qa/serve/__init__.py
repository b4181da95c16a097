"""`t5qa serve`: the HTTP API and web page, with server-side micro-batching.

Rooms: `batcher.py` (MicroBatcher) and `middleware.py` (API key, body limit, key redaction) < `schemas.py`
(the JSON models, pydantic) < `app.py` (create_app and the routes); `runner.py` (running_server: an app in
a background thread). fastapi and pydantic are imported only when an
app is built (`pip install 't5qa[serve]'`).
"""

from t5qa.config import ServeConfig, ServeLimits
from t5qa.serve.app import GENERATE_OPTIONS, STATIC_DIR, create_app, create_app_from_dir
from t5qa.serve.batcher import MicroBatcher
from t5qa.serve.runner import running_server

__all__ = ["ServeConfig", "ServeLimits", "create_app", "create_app_from_dir", "MicroBatcher", "STATIC_DIR",
           "GENERATE_OPTIONS", "running_server"]
