"""`hybrid serve [MODEL]`: OpenAI- and Anthropic-compatible HTTP server over the engine."""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_PORT = 8000


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="OpenAI/Anthropic-compatible HTTP server",
        description="Serve a model over HTTP: OpenAI /v1/chat/completions, /v1/completions, "
                    "/v1/models; Anthropic /v1/messages; /health and Prometheus /metrics. "
                    "Binds 127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory or .gguf file (default: the embedded demo model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--api-key", default=None,
                   help="require this key on every route but /health (default: $HYBRID_API_KEY)")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: the directory or GGUF file name)")
    p.add_argument("--max-running", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--max-queued", type=int, default=256,
                   help="requests allowed to wait for a slot; more get 429 (default 256)")
    p.add_argument("--max-tokens", type=int, default=4096,
                   help="largest completion a request may ask for (default 4096)")
    p.add_argument("--context-length", type=int, default=None,
                   help="prompt + completion limit per sequence (default: the model's, at most 4096 "
                        "here since the KV cache is sized from it)")
    p.add_argument("--max-body-mb", type=float, default=32.0,
                   help="largest request body in MB, base64 images included (default 32)")
    p.add_argument("--allow-local-images", default=None, metavar="DIR",
                   help="let image parts name local files under DIR (default: off; data: URIs only)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs on a client's behalf (default: off, refused with 400)")
    p.add_argument("--max-images", type=int, default=8, help="images per request (default 8)")
    p.add_argument("--max-image-mb", type=float, default=20.0, help="encoded size per image in MB (default 20)")
    p.add_argument("--max-image-megapixels", type=float, default=64.0,
                   help="decoded width x height per image, in millions (default 64); larger images are "
                        "refused, smaller ones are resized as the model's preprocessing says")
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="size of the paged KV cache in blocks (default: --max-running whole contexts); "
                        "requests sharing a prompt prefix share its blocks, so with shared prompts "
                        "--max-running can be raised at the same memory")
    p.add_argument("--kv-block-size", type=int, default=16,
                   help="tokens per KV block (default 16; 0: one whole-context slot per sequence)")
    p.add_argument("--log-requests", action="store_true", help="log one line per request")
    p.add_argument("--shutdown-grace", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, stop accepting requests and let running ones go on "
                        "this long, then end each with a final error event (default 30)")
    from hybrid.chat.loading import add_load_arguments

    add_load_arguments(p)
    p.set_defaults(func=main)


def _model_name(path: str) -> str:
    """The directory's name, or a GGUF file's without .gguf and a split set's -00001-of-0000N."""
    import re

    name = os.path.basename(os.path.normpath(path))
    return re.sub(r"(-\d{5}-of-\d{5})?\.gguf$", "", name)


def build_config(args):
    from hybrid.serve.config import ServeConfig

    name = args.model_name
    if name is None:
        name = _model_name(args.model) if args.model else "hybrid-demo"
    cfg = ServeConfig(host=args.host, port=args.port,
                      api_key=args.api_key if args.api_key is not None else os.environ.get("HYBRID_API_KEY") or None,
                      model_name=name, max_running=args.max_running, max_queued=args.max_queued,
                      max_tokens=args.max_tokens, context_length=args.context_length,
                      max_body_bytes=int(args.max_body_mb * 1024 * 1024), log_requests=args.log_requests,
                      shutdown_grace=args.shutdown_grace, allow_local_images=args.allow_local_images,
                      allow_remote_images=args.allow_remote_images, max_images=args.max_images,
                      max_image_bytes=int(args.max_image_mb * 1024 * 1024),
                      max_image_pixels=int(args.max_image_megapixels * 1024 * 1024),
                      kv_blocks=args.kv_blocks, kv_block_size=args.kv_block_size)
    cfg.validate()
    return cfg


def port_problem(host: str, port: int) -> str | None:
    """Why (host, port) cannot be bound, or None. Checked before loading a model that may take
    minutes, so a busy port is reported at once."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"cannot resolve --host {host!r}: {e}"
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            return f"cannot listen on {host}:{port}: {e.strerror or e}"
    return None


def build_backend(model, cfg):
    """An Engine over a loaded model, and the server's Backend over that engine."""
    from hybrid.engine.engine import Engine
    from hybrid.serve.backend import Backend
    from hybrid.serve.metrics import Metrics

    engine = Engine(model, tokenizer=model.tokenizer, max_seqs=cfg.max_running, max_context=cfg.context_length,
                    decode_runner=model.decode_runner, block_size=cfg.kv_block_size or None,
                    kv_blocks=cfg.kv_blocks)
    return Backend(engine, model.tokenizer, cfg.max_tokens, cfg.max_queued, Metrics(), model=model,
                   images=cfg.image_policy())


def main(args: argparse.Namespace) -> int:
    try:
        cfg = build_config(args)
    except ValueError as e:
        print(f"hybrid serve: {e}", file=sys.stderr)
        return 2
    problem = port_problem(cfg.host, cfg.port)
    if problem:
        print(f"hybrid serve: {problem}", file=sys.stderr)
        return 2
    from hybrid.chat.loading import load_model_or_explain, load_options

    model = load_model_or_explain(args.model, "hybrid serve", **load_options(args, cfg.context_length))
    if model is None:
        return 1
    import uvicorn

    from hybrid.serve.app import create_app

    try:
        backend = build_backend(model, cfg)
    except (ValueError, MemoryError) as e:  # e.g. a KV cache for --max-running x context that does not fit
        print(f"hybrid serve: {e}", file=sys.stderr)
        return 2
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and cfg.api_key is None:
        print(f"hybrid serve: warning: listening on {cfg.host} with no API key; anyone who can reach "
              "this port can use the model (set --api-key or HYBRID_API_KEY)", file=sys.stderr)
    stats = backend.engine.stats()
    kv = (f", KV cache {stats['kv_blocks_total']} blocks of {stats['kv_block_size']} tokens shared by prefix"
          if "kv_blocks_total" in stats else "")
    print(f"hybrid serve: serving '{cfg.model_name}' at http://{cfg.host}:{cfg.port}/v1 "
          f"(context {backend.context_length}, {cfg.max_running} concurrent sequences{kv}"
          f"{', API key required' if cfg.api_key else ''}; answers in "
          f"{'thinking' if model.tokenizer.default_thinking else 'instant'} mode unless a request "
          "switches it)", file=sys.stderr)
    from hybrid.serve.server import GracefulServer

    server = GracefulServer(uvicorn.Config(create_app(backend, cfg), host=cfg.host, port=cfg.port,
                                           log_level="warning"), backend, cfg.shutdown_grace)
    try:
        server.run()
    finally:
        backend.engine.close()
    return 0
