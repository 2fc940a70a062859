"""Server settings: where to listen, who may call, and the limits that protect the engine."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback unless the user opens it with --host
    port: int = 8000
    api_key: str | None = None  # None: no auth; else required on every route but /health
    model_name: str = "hybrid"  # the id clients pass as "model" and /v1/models lists
    max_running: int = 32  # sequences decoded together (the engine's batch)
    max_queued: int = 256  # waiting requests beyond the running ones; more -> 429
    max_tokens: int = 4096  # per-request completion cap; a larger request -> 400
    context_length: int | None = None  # None: the model's own (config.max_position_embeddings)
    max_body_bytes: int = 32 * 1024 * 1024  # request bodies larger than this -> 413 (base64 images in them)
    log_requests: bool = False
    kv_blocks: int | None = None  # paged KV cache size in blocks; None: max_running whole contexts
    kv_block_size: int = 16  # tokens per KV block; 0: a whole-context slot per sequence
    shutdown_grace: float = 30.0  # seconds running requests may go on after SIGTERM; then each
    #                               ends with a final error event (hybrid.serve.server)
    # Images (a model with a vision tower): data: URIs always; local files only under this
    # directory; http(s) URLs fetched only when allowed; limits per request and per image.
    allow_local_images: str | None = None
    allow_remote_images: bool = False
    max_images: int = 8
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 64 * 1024 * 1024

    def image_policy(self):
        from pathlib import Path

        from hybrid.serve.images import ImagePolicy

        return ImagePolicy(local_dir=Path(self.allow_local_images) if self.allow_local_images else None,
                           allow_remote=self.allow_remote_images, max_images=self.max_images,
                           max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)

    def validate(self) -> None:
        def bad(field, value, why):
            raise ValueError(f"serve option {field}={value!r}: {why}")

        if not 0 <= self.port <= 65535:
            bad("port", self.port, "must be in [0, 65535]")
        for field in ("max_running", "max_tokens", "max_body_bytes", "max_image_bytes", "max_image_pixels"):
            if getattr(self, field) < 1:
                bad(field, getattr(self, field), "must be >= 1")
        if not 0 <= self.shutdown_grace <= 24 * 3600:
            bad("shutdown_grace", self.shutdown_grace, "must be between 0 and 86400 seconds")
        if self.max_images < 0:
            bad("max_images", self.max_images, "must be >= 0")
        if self.allow_local_images is not None:
            import os

            if not os.path.isdir(self.allow_local_images):
                bad("allow_local_images", self.allow_local_images, "is not a directory")
        if self.kv_blocks is not None and self.kv_blocks < 1:
            bad("kv_blocks", self.kv_blocks, "must be >= 1")
        if self.kv_block_size < 0:
            bad("kv_block_size", self.kv_block_size, "must be >= 0 (0: no paging)")
        if self.max_queued < 0:
            bad("max_queued", self.max_queued, "must be >= 0")
        if self.context_length is not None and self.context_length < 2:
            bad("context_length", self.context_length, "must be >= 2")
        if self.api_key is not None and not self.api_key.strip():
            bad("api_key", self.api_key, "must not be empty")
