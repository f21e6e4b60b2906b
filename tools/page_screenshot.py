"""A screenshot of the `ct-edge serve` page after uploading files, as a person sees it.

    python -m tools.page_screenshot --bundle artifacts/bundle --out docs/img/serve.png \
        artifacts/data/synthetic/test/COVID-19/00000.png phantom.png

Serves the bundle on 127.0.0.1 (a fresh results store in a temporary folder), opens the page in
headless Chromium (`bash tools/setup_system.sh` installs it), uploads the files through the page's
own file picker and saves the window once every answer is shown. Files are uploaded in the order
given; the page shows the newest first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

from ct_edge.classifier import Classifier
from ct_edge.errors import CtEdgeError
from ct_edge.server import ServerConfig, Service, create_server
from ct_edge.store import Store

from . import chromium

DEFAULT_WIDTH, DEFAULT_HEIGHT = 700, 950


def screenshot(bundle: Path, files: list[Path], out: Path, width: int = DEFAULT_WIDTH,
               height: int = DEFAULT_HEIGHT, timeout: float = 60.0) -> Path:
    """Upload `files` to a fresh server of `bundle` through the page; save the window to `out`."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if not chromium.available():
        raise CtEdgeError("chromium and chromium-driver are needed: bash tools/setup_system.sh")
    with tempfile.TemporaryDirectory(prefix="ct-edge-page-") as scratch:
        store = Store(Path(scratch) / "data")
        server = create_server(ServerConfig(port=0), Service(Classifier.from_bundle(bundle), store))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        driver = chromium.start(Path(scratch) / "profile", width, height, "--hide-scrollbars")
        try:
            driver.get(server.url + "/")
            wait = WebDriverWait(driver, timeout)
            wait.until(lambda d: "classes:" in d.find_element(By.ID, "model").text)
            for count, path in enumerate(files, start=1):  # one at a time: a fixed order
                driver.find_element(By.ID, "files").send_keys(str(path.resolve()))
                wait.until(lambda d, n=count: len(d.find_elements(By.CSS_SELECTOR,
                                                                  ".card[data-status]")) >= n)
            wait.until(lambda d: all(img.get_attribute("complete") == "true"
                                     for img in d.find_elements(By.CSS_SELECTOR, ".card img")))
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
        finally:
            driver.quit()
            server.stop()
            thread.join(10)
            store.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.page_screenshot",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE",
                        help="images to upload, in this order")
    parser.add_argument("--bundle", type=Path, default=Path("artifacts/bundle"),
                        help="bundle to serve (default: artifacts/bundle)")
    parser.add_argument("--out", type=Path, default=Path("artifacts/page.png"),
                        help="PNG to write (default: artifacts/page.png)")
    parser.add_argument("--width", type=int, default=DEFAULT_WIDTH,
                        help=f"window width in px (default: {DEFAULT_WIDTH})")
    parser.add_argument("--height", type=int, default=DEFAULT_HEIGHT,
                        help=f"window height in px (default: {DEFAULT_HEIGHT})")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    try:
        print(f"wrote {screenshot(args.bundle, args.files, args.out, args.width, args.height)}")
    except CtEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
