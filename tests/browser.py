"""Debian's headless chromium for the page tests (the chat page, the rating page), driven by its
own chromedriver, so Selenium Manager never runs and nothing is downloaded."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def ensure_chromium() -> None:
    """Debian's chromium and chromedriver, installed with apt-get when missing (as root);
    otherwise the test is skipped, saying why."""
    if CHROMIUM.is_file() and CHROMEDRIVER.is_file():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(
            f"{CHROMIUM} or {CHROMEDRIVER} is missing and cannot be installed here (needs root and apt-get): "
            "run `apt-get install -y chromium chromium-driver`"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium", "chromium-driver"]):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"`{' '.join(command)}` failed: {e}")
        if done.returncode != 0:
            pytest.skip(
                f"`{' '.join(command)}` failed (exit {done.returncode}): {done.stderr.strip()[-500:]}"
            )
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"apt-get installed chromium, but {CHROMIUM} or {CHROMEDRIVER} is still missing")


def open_chromium(width: int = 1280, height: int = 900) -> Any:
    """A headless chromium under WebDriver, keeping the page's console log; quit() it after."""
    ensure_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    return driver


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """`condition()`'s first true value, polled; an AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)
