"""Headless Debian chromium under Selenium, for tests of the web page (and its screenshots).

Selenium Manager is kept from the network: SE_AVOID_STATS stops its usage statistics and
Debian's own chromedriver is named, so nothing is downloaded. The browser gets an
environment without the test run's tag: its renderer processes come and go with the
pages, and the leak checks must not count them as processes a test left behind.

    python -m tests.serve.browser URL [KEY]   # the screenshots of docs/img from a running swarm serve
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WIDE, NARROW = (1280, 800), (375, 812)
WAIT_S = 60.0


def available() -> bool:
    return all(shutil.which(p) for p in (CHROMIUM, CHROMEDRIVER))


@contextlib.contextmanager
def chromium(size: tuple[int, int] = WIDE):
    os.environ["SE_AVOID_STATS"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--no-first-run", "--hide-scrollbars", f"--window-size={size[0]},{size[1]}"):
        options.add_argument(arg)
    env = {k: v for k, v in os.environ.items() if k != "SWARM_TEST_RUN"}
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, env=env), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, timeout_s: float = WAIT_S):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # A live view re-renders its parts as the swarm changes: an element found a moment ago
    # may be gone by the time its text is read, which only means "look again".
    return WebDriverWait(driver, timeout_s, poll_frequency=0.05,
                         ignored_exceptions=(StaleElementReferenceException,)).until(condition)


def text_of(driver, element_id: str) -> str:
    """The element's rendered text, read in one script call (no handle that can go stale)."""
    return driver.execute_script("return document.getElementById(arguments[0]).innerText;", element_id)


def set_viewport(driver, size: tuple[int, int]) -> None:
    """The page's viewport (not the window's outer size) at exactly ``size``."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": size[0] < 600})


def open_page(driver, url: str, key: str | None) -> None:
    """The page with its storage cleared and ``key`` entered when it asks for one."""
    from selenium.webdriver.common.by import By

    driver.get(url + "/")
    driver.execute_script("localStorage.clear()")
    driver.get(url + "/")
    if key is not None:
        wait(driver, lambda d: d.find_element(By.ID, "key-dialog").get_attribute("open") is not None)
        driver.find_element(By.ID, "key-input").send_keys(key + "\n")
    wait(driver, lambda d: d.find_element(By.ID, "model-name").text not in ("connecting…", "not connected"))


def ask(driver, question: str) -> str:
    """Types ``question`` and waits for the answer's statistics: the answer's text as received."""
    from selenium.webdriver.common.by import By

    before = len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant"))
    driver.find_element(By.ID, "prompt").send_keys(question + "\n")

    def answered(d):
        answers = d.find_elements(By.CSS_SELECTOR, ".message.assistant")
        return len(answers) > before and answers[-1].find_elements(By.CSS_SELECTOR, ".stats, .error")
    wait(driver, answered)
    return driver.execute_script(
        "const c = JSON.parse(localStorage.getItem('swarm.conversations'))[0];"
        "return c.messages[c.messages.length - 1].content;")


def screenshots(driver, out_dir: Path, question: str) -> list[Path]:
    """Both views at 1280x800 and 375x812: chat-wide.png, swarm-wide.png, chat-narrow.png, swarm-narrow.png."""
    from selenium.webdriver.common.by import By

    out_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    if not driver.find_elements(By.CSS_SELECTOR, ".message.assistant"):
        ask(driver, question)
    for name, size in (("wide", WIDE), ("narrow", NARROW)):
        set_viewport(driver, size)
        for view in ("chat", "swarm"):
            driver.find_element(By.ID, f"tab-{view}").click()
            time.sleep(0.3)  # one layout pass, and a swarm event
            path = out_dir / f"{view}-{name}.png"
            driver.save_screenshot(str(path))
            saved.append(path)
    return saved


def main(argv: list[str]) -> int:
    url, key = argv[0].rstrip("/"), (argv[1] if len(argv) > 1 else None)
    with chromium() as driver:
        open_page(driver, url, key)
        for path in screenshots(driver, Path("docs/img"), "Give three short tips for running a language model on old laptops, as a list."):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
