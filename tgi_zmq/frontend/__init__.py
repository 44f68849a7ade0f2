"""The HTTP frontend process: TGI- and OpenAI-compatible routes over the ZeroMQ pipeline."""

from .app import create_app, main

__all__ = ["create_app", "main"]
