"""Headless Chromium for the page's real-browser checks (Debian's chromium + chromium-driver,
installed by tools/setup_system.sh), one set of flags for the tests and the screenshot tool."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# No sandbox (containers run as root), nothing fetched in the background: the page and
# 127.0.0.1 are all the browser talks to.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--no-first-run",
         "--disable-extensions")


def available() -> bool:
    return bool(CHROMIUM and CHROMEDRIVER)


def start(profile: Path, width: int, height: int, *extra: str) -> Any:
    """A Selenium driver of a fresh headless Chromium with its profile in `profile`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--window-size={width},{height}", f"--user-data-dir={profile}", *extra):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
