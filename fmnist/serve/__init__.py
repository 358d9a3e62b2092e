"""`fmnist serve`: the exported model behind an HTTP server (fmnist.serve.app), on onnxruntime, without torch."""

from fmnist.serve.app import Settings, create_app, from_environment, serve

__all__ = ["Settings", "create_app", "from_environment", "serve"]
