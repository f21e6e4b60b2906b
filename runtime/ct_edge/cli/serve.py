"""`ct-edge serve`: answer over HTTP (Open Inference Protocol v2, /v1, a web page, /metrics)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .common import (
    BUNDLE_HELP,
    EXIT_OK,
    EXIT_USAGE,
    RAW,
    error,
    native_info_silenced,
    port,
    positive_float,
    warn,
)

ENV_TOKEN = "CT_EDGE_TOKEN"
DEFAULT_PORT = 8080
EXAMPLES = f"""\
examples:
  ct-edge serve                                   (http://127.0.0.1:{DEFAULT_PORT}/, this machine only)
  ct-edge serve --host 0.0.0.0 --token-file /etc/ct-edge/token   (on the network, with a token)
  ct-edge serve --port 0 --data-dir /var/lib/ct-edge            (any free port; the store there)
  curl --data-binary @scan.png http://127.0.0.1:{DEFAULT_PORT}/v1/classify
  curl -H "Authorization: Bearer $TOKEN" "http://device:{DEFAULT_PORT}/v1/results?status=uncertain"

Endpoints: the page at /; POST /v1/classify (the file as the body; ?explain=1 adds a heatmap);
GET /v1/results[/ID[/heatmap.png]]; Open Inference Protocol v2 under /v2 (model 'ct-edge');
/metrics. A host other than loopback needs a token (--token, --token-file or ${ENV_TOKEN}); every
endpoint but /v2/health/* and the page's own files then needs 'Authorization: Bearer TOKEN'.
Each answer is committed to the results store (--data-dir) before it is sent. SIGINT/SIGTERM stop
it cleanly: requests in flight finish, the store is closed. docs/serve.md has the details.
"""


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"must be 0-4096, got {value}")
    return value


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "serve", help="answer over HTTP: a web page, /v1 endpoints, Open Inference Protocol v2",
        formatter_class=RAW, epilog=EXAMPLES,
        description="Serve the bundle over HTTP with a results store. Not a diagnostic device.")
    parser.add_argument("--bundle", metavar="DIR", help=BUNDLE_HELP)
    parser.add_argument("--artifact", metavar="NAME",
                        help="artifact to run (default: the bundle's default)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=port, default=DEFAULT_PORT,
                        help=f"TCP port (default: {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="results store and heatmaps (default: $CT_EDGE_DATA, else "
                             "$XDG_DATA_HOME/ct-edge, else ~/.local/share/ct-edge)")
    secret = parser.add_mutually_exclusive_group()
    secret.add_argument("--token", help=f"bearer token clients must send (default: ${ENV_TOKEN}; "
                                        "prefer --token-file: a command line is visible to "
                                        "other users)")
    secret.add_argument("--token-file", metavar="FILE",
                        help="read the bearer token from FILE (first line; default: none)")
    parser.add_argument("--insecure-no-token", action="store_true",
                        help="allow a non-loopback --host without a token (anyone who reaches "
                             "the port can classify and read every stored result; default: refused)")
    parser.add_argument("--max-body-mb", type=positive_float, default=32.0, metavar="MB",
                        help="largest request body; larger ones get 413 (default: 32)")
    parser.add_argument("--cors-origin", metavar="ORIGIN",
                        help="let pages from ORIGIN (e.g. https://viewer.example) call the API "
                             "(default: same origin only)")
    parser.add_argument("--workers", type=_count, default=2,
                        help="worker threads decoding and classifying (default: 2)")
    parser.add_argument("--queue", type=_count, default=16,
                        help="requests that may wait for a worker; past that, 503 with "
                             "Retry-After (default: 16)")
    parser.add_argument("--timeout", type=positive_float, default=30.0, metavar="S",
                        help="answer 504 when a request's inference takes longer (default: 30)")
    parser.add_argument("--access-log", action="store_true",
                        help="log every request on stderr (default: errors only)")
    parser.set_defaults(handler=run)


def read_token(args: argparse.Namespace) -> str | None:
    """--token, else --token-file's first line, else $CT_EDGE_TOKEN; ValueError when unusable."""
    if args.token_file:
        try:
            lines = Path(args.token_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read --token-file {args.token_file}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        token = lines[0].strip() if lines else ""
    else:
        token = args.token if args.token is not None else (os.environ.get(ENV_TOKEN) or None)
        token = token.strip() if token is not None else None
    if token is not None and (len(token) < 8 or not token.isascii() or not token.isprintable()
                              or " " in token):
        raise ValueError("the token must be at least 8 printable ASCII characters without spaces")
    return token


def run(args: argparse.Namespace) -> int:
    from ..server import ServerConfig, is_loopback

    if args.workers < 1:
        error("--workers must be 1 or more")
        return EXIT_USAGE
    try:
        token = read_token(args)
    except ValueError as exc:
        error(str(exc))
        return EXIT_USAGE
    if not token and not args.insecure_no_token and not is_loopback(args.host):
        error(f"refusing to listen on {args.host} without a token: anyone on the network could "
              "classify and read every stored result; pass --token-file FILE (or --token, "
              f"${ENV_TOKEN}), or --insecure-no-token to accept that")
        return EXIT_USAGE
    config = ServerConfig(host=args.host, port=args.port, token=token or None,
                          max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                          cors_origin=args.cors_origin, workers=args.workers,
                          queue_size=args.queue, timeout_s=args.timeout,
                          access_log=args.access_log)
    return serve(args, config)


def serve(args: argparse.Namespace, config: Any) -> int:
    import signal
    import threading

    from .. import DISCLAIMER
    from ..classifier import Classifier
    from ..limits import return_large_frees_to_the_system
    from ..server import Service, create_server
    from ..store import Store, default_data_dir

    return_large_frees_to_the_system()  # a long-running process: keep inside the memory bound

    data_dir = default_data_dir() if args.data_dir is None else Path(args.data_dir)
    with native_info_silenced():
        classifier = Classifier.from_bundle(args.bundle, artifact=args.artifact)
    warn(classifier.artifact.parity_warning)
    store = Store(data_dir)
    store.remove_orphan_heatmaps()  # what a kill between a heatmap and its row left
    service = Service(classifier, store, workers=config.workers, queue_size=config.queue_size,
                      timeout_s=config.timeout_s)
    try:
        server = create_server(config, service)
    except OSError as exc:
        error(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}")
        service.close()
        store.close()
        return EXIT_USAGE
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, name="ct-edge-http", daemon=True)
    thread.start()
    try:  # from here on, whatever ends the command (stdout unwritable too) stops the server
        print(f"ct-edge serve: listening on {server.url}/", flush=True)
        print(f"bundle {classifier.bundle.root} (artifact {classifier.artifact.name}); results "
              f"in {data_dir}; {'bearer token required' if config.token else 'no token'}; "
              f"body limit {config.max_body_bytes // (1024 * 1024)} MB", file=sys.stderr)
        print(DISCLAIMER, file=sys.stderr, flush=True)
        while not stop.wait(0.5) and thread.is_alive():
            pass
    finally:
        print("ct-edge serve: stopping (finishing requests in flight)", file=sys.stderr, flush=True)
        server.stop()
        store.close()
    return EXIT_OK
