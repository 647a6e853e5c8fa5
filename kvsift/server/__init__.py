"""kvsift's OpenAI-compatible server (FastAPI): ``kvsift serve`` or ``python -m kvsift.server``.

Imports are lazy so that ``kvsift --help`` (which adds the ``serve`` parser) stays fast."""

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name):
    if name == "create_app":
        from kvsift.server.app import create_app

        return create_app
    if name == "ServerConfig":
        from kvsift.server.config import ServerConfig

        return ServerConfig
    raise AttributeError(name)
