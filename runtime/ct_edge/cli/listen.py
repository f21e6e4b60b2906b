"""`ct-edge listen`: a DICOM node (Storage SCP) that classifies the slices and series it receives."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from .common import (
    BUNDLE_HELP,
    EXIT_OK,
    EXIT_USAGE,
    RAW,
    error,
    native_info_silenced,
    number_up_to,
    port,
    warn,
)

EXAMPLES = """\
examples:
  ct-edge listen                                   (AE title CTEDGE on port 11112, every address)
  ct-edge listen --ae-title CTEDGE --port 11112 --allow-ae SCANNER1,PACS --allow-ip 10.1.0.0/16
  ct-edge listen --stable-seconds 10 --aggregate max --forward PACS@10.1.0.5:104
  ct-edge listen --tls-cert node.pem --tls-key node.key --tls-ca hospital-ca.pem   (mutual TLS)
  echoscu -aec CTEDGE 127.0.0.1 11112              (DCMTK: check the node answers)
  storescu -aec CTEDGE 127.0.0.1 11112 series/*.dcm
  ct-edge results --series                         (what came in, per series)

Accepts C-ECHO and C-STORE of CT, Enhanced CT, CR, DX and Secondary Capture images (the SOP
classes the bundle's modality allows) in the transfer syntaxes an installed decoder reads. Each
instance is spooled to the data folder and recorded before it is acknowledged; classification
runs from a queue. A series is complete after --stable-seconds without a new instance; its result
aggregates the slice results (topk-mean: per class the mean of the top ceil(10%) slice
probabilities). Results go to the results store (--data-dir) and, per series, to a Basic Text SR
in <data-dir>/reports/ (UNVERIFIED; not for diagnostic use). SIGINT/SIGTERM stop it cleanly; a
restart classifies what was received but not classified yet.
"""
DEFAULT_PORT = 11112


def _ae_title(text: str) -> str:
    value = text.strip()
    if not 1 <= len(value) <= 16 or not value.isascii() or "\\" in value or \
            any(not ch.isprintable() for ch in value):
        raise argparse.ArgumentTypeError(f"an AE title is 1-16 printable ASCII characters without "
                                         f"a backslash (got {text!r})")
    return value


def _ae_list(text: str) -> tuple[str, ...]:
    return tuple(_ae_title(part) for part in text.split(",") if part.strip())


def _cidr_list(text: str) -> tuple[str, ...]:
    import ipaddress

    parts = tuple(part.strip() for part in text.split(",") if part.strip())
    for part in parts:
        try:
            ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an address or CIDR range: {part!r}") from None
    return parts


def _megabytes(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected megabytes, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return int(value * 1024 * 1024)


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "listen", help="receive DICOM from a scanner or PACS and classify it", formatter_class=RAW,
        description="A DICOM Storage SCP: classifies received slices and complete series.",
        epilog=EXAMPLES)
    parser.add_argument("--bundle", metavar="DIR", help=BUNDLE_HELP)
    parser.add_argument("--host", default="0.0.0.0",
                        help="address to listen on (default: 0.0.0.0, every interface)")
    parser.add_argument("--port", type=port, default=DEFAULT_PORT,
                        help=f"TCP port (default: {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--ae-title", type=_ae_title, default="CTEDGE",
                        help="this node's AE title; associations calling another are rejected "
                             "(default: CTEDGE)")
    parser.add_argument("--allow-ae", type=_ae_list, default=(), metavar="AE[,AE...]",
                        help="calling AE titles allowed (default: any)")
    parser.add_argument("--allow-ip", type=_cidr_list, default=(), metavar="CIDR[,CIDR...]",
                        help="sender addresses allowed, e.g. 10.1.0.0/16,127.0.0.1 (default: any)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="results store, spool and reports (default: $CT_EDGE_DATA, else "
                             "$XDG_DATA_HOME/ct-edge, else ~/.local/share/ct-edge)")
    parser.add_argument("--stable-seconds", type=number_up_to(86400), default=30.0, metavar="S",
                        help="a series is complete after S seconds with no new instance "
                             "(default: 30)")
    parser.add_argument("--aggregate", choices=("topk-mean", "max", "mean"), default="topk-mean",
                        help="series result from slice results (default: topk-mean, k = "
                             "ceil(10%% of the answered slices))")
    parser.add_argument("--forward", metavar="AE@HOST:PORT",
                        help="send each series report (Basic Text SR) there by C-STORE (default: not sent)")
    parser.add_argument("--no-reports", action="store_true",
                        help="do not write a Basic Text SR per series (default: write one)")
    parser.add_argument("--spool-max-mb", type=_megabytes, metavar="MB",
                        help="keep at most MB of received files; the oldest classified ones are "
                             "removed, their results stay (default: keep all)")
    parser.add_argument("--min-free-mb", type=_megabytes, default=256 * 1024 * 1024, metavar="MB",
                        help="refuse instances (status 0xA700) when the disk has less free "
                             "(default: 256)")
    parser.add_argument("--tls-cert", metavar="FILE",
                        help="PEM certificate: listen with TLS (default: plain TCP)")
    parser.add_argument("--tls-key", metavar="FILE",
                        help="PEM private key of --tls-cert (default: none)")
    parser.add_argument("--tls-ca", metavar="FILE",
                        help="PEM CA: senders must present a certificate it signed (mutual TLS; "
                             "default: no client certificate asked)")
    parser.add_argument("--artifact", metavar="NAME",
                        help="artifact to run (default: the bundle's default)")
    parser.add_argument("--quiet", action="store_true",
                        help="log warnings and errors only (default: informational lines too)")
    parser.set_defaults(handler=run)


def _config(args: argparse.Namespace, data_dir: Any) -> Any:
    from ..dicom_node import Forward, NodeConfig, server_tls_context

    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_ca and not args.tls_cert):
        raise ValueError("TLS needs both --tls-cert and --tls-key (and --tls-ca only with them)")
    context = server_tls_context(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None
    return NodeConfig(data_dir=data_dir, host=args.host, port=args.port, ae_title=args.ae_title,
                      allow_ae=args.allow_ae, allow_ip=args.allow_ip,
                      stable_seconds=args.stable_seconds, aggregate=args.aggregate,
                      forward=Forward.parse(args.forward) if args.forward else None,
                      ssl_context=context, reports=not args.no_reports,
                      spool_max_bytes=args.spool_max_mb, min_free_bytes=args.min_free_mb)


def run(args: argparse.Namespace) -> int:
    import logging

    try:
        import pydicom  # noqa: F401
        import pynetdicom  # noqa: F401
    except ImportError:
        error("ct-edge listen needs pydicom and pynetdicom: pip install 'ct-edge[listen]'")
        return EXIT_USAGE
    from .. import DISCLAIMER
    from ..classifier import Classifier
    from ..dicom_node import Node
    from ..limits import return_large_frees_to_the_system
    from ..store import Store, default_data_dir

    return_large_frees_to_the_system()  # a long-running process: keep inside the memory bound

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # the node logs what matters
    data_dir = default_data_dir() if args.data_dir is None else Path(args.data_dir)
    try:
        config = _config(args, data_dir)
    except (ValueError, OSError) as exc:
        error(f"{exc}")
        return EXIT_USAGE
    with native_info_silenced():
        classifier = Classifier.from_bundle(args.bundle, artifact=args.artifact)
    warn(classifier.artifact.parity_warning)  # also with --quiet: it logs warnings
    store = Store(data_dir)
    node = Node(config, classifier, store)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        node.start()
    except OSError as exc:
        where = f"cannot use {exc.filename}" if exc.filename else \
            f"cannot listen on {args.host}:{args.port}"
        error(f"{where}: {exc.strerror or exc}")
        store.close()
        return EXIT_USAGE
    host, port = node.address
    print(f"ct-edge listen: AE title {config.ae_title} on {host}:{port}"
          f"{' (TLS' + (', mutual' if args.tls_ca else '') + ')' if config.ssl_context else ''}; "
          f"data in {data_dir}", file=sys.stderr)
    print(f"accepts: Verification; {', '.join(node.sop_classes.values())}; "
          f"modalities {', '.join(node.modalities)}", file=sys.stderr)
    print(f"transfer syntaxes: {', '.join(_syntax_names(node.transfer_syntaxes))}", file=sys.stderr)
    print(f"calling AE: {', '.join(config.allow_ae) or 'any'}; addresses: "
          f"{', '.join(config.allow_ip) or 'any'}; series complete after "
          f"{config.stable_seconds:g} s ({config.aggregate})", file=sys.stderr)
    print(DISCLAIMER, file=sys.stderr, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        print("ct-edge listen: stopping", file=sys.stderr, flush=True)
        node.stop()
        store.close()
    return EXIT_OK


def _syntax_names(uids: list[str]) -> list[str]:
    from pydicom.uid import UID

    return [UID(uid).name for uid in uids]
