"""The Ray Serve application, for deploying the models onto a cluster that bot processes share.

    serve run inference.serve_app:app                  # from the repository, RAY_ADDRESS set
    serve deploy serve_config.yaml                     # import_path: inference.serve_app:app

The settings come from the environment and `.env` where this is imported (the same variables
as the bot: `DEVICE`, `MAX_BATCH_SIZE`, `MAX_BATCH_WAIT_MS`, the queue sizes, `RAY_MIN_REPLICAS`,
`RAY_MAX_REPLICAS`, `WEIGHTS_DIR`…; the Discord token is never passed to a replica).  Bots with
`INFERENCE_BACKEND=ray` and the same `RAY_ADDRESS` then use this application as it is.
"""

from __future__ import annotations

from config import Settings
from inference.service.ray_app import APP_NAME, build_app

__all__ = ["APP_NAME", "app", "build_app"]

#: What `serve run` imports (Serve's convention: a module-level application).
app = build_app(Settings.from_env())
