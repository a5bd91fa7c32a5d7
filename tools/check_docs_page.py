"""Check that ``/docs`` of ``moe-rec serve`` renders in a real browser with no internet.

Starts ``moe-rec serve BUNDLE --port 0`` on 127.0.0.1 (or uses ``--url``), loads ``/docs`` in
headless Chromium with every host name except 127.0.0.1 made unresolvable (so a CDN asset
would fail to load, as it does offline), lets the page's JavaScript run, and checks that the
rendered DOM has one Swagger UI operation block per operation of ``/openapi.json`` (method and
path), the independent list of what should be there. ``--screenshot`` also saves a PNG of the
page.

    python tools/check_docs_page.py runs/demo/bundle --screenshot docs.png
    python tools/check_docs_page.py --url http://127.0.0.1:8000

Exit code 0 when every operation rendered, 1 when not, 2 when Chromium is not installed
(Debian: ``apt-get install chromium``). Prints what it found.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
OFFLINE = "MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"  # every other host name fails to resolve
JS_BUDGET_MS = 15_000  # virtual time the page's scripts get before the DOM is dumped


def find_chromium() -> str | None:
    """Path of a Chromium-family browser on PATH, or None."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


@contextmanager
def serving(bundle: Path) -> Iterator[str]:
    """``moe-rec serve BUNDLE --port 0`` on 127.0.0.1 in a subprocess; yields its base URL."""
    cmd = [sys.executable, "-m", "moe_rec.cli", "serve", str(bundle), "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if found := re.search(r"moe-rec serving at (http://127\.0\.0\.1:\d+)", line):
                break
        else:
            raise RuntimeError("the server did not start:\n" + "".join(lines))
        yield found.group(1)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def operations(url: str) -> set[tuple[str, str]]:
    """``(method, path)`` of every operation the server's OpenAPI document lists."""
    with urllib.request.urlopen(f"{url}/openapi.json", timeout=30) as r:
        spec = json.load(r)
    return {(method, path) for path, ops in spec["paths"].items() for method in ops}


def _chromium(browser: str, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", f"--host-resolver-rules={OFFLINE}",
             f"--virtual-time-budget={JS_BUDGET_MS}"]  # fmt: skip
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=180)


def rendered_operations(browser: str, url: str) -> set[tuple[str, str]]:
    """``(method, path)`` of every operation block Swagger UI rendered into ``url``'s DOM."""
    dom = _chromium(browser, "--dump-dom", url).stdout
    blocks = re.findall(r'class="opblock opblock-(\w+)[^"]*"[\s\S]*?data-path="([^"]+)"', dom)
    return set(blocks)


def check(browser: str, url: str, screenshot: Path | None = None) -> bool:
    """Print what ``/docs`` rendered against what ``/openapi.json`` lists; True when they agree."""
    want = operations(url)
    got = rendered_operations(browser, f"{url}/docs")
    print(f"/openapi.json lists {len(want)} operations; /docs rendered {len(got)} (browser: {browser})")
    for method, path in sorted(want | got, key=lambda op: (op[1], op[0])):
        state = "ok" if (method, path) in got and (method, path) in want else (
            "MISSING from the page" if (method, path) in want else "not in /openapi.json"
        )  # fmt: skip
        print(f"  {method.upper():6} {path}: {state}")
    if screenshot is not None:
        _chromium(browser, "--hide-scrollbars", "--window-size=1280,1400", f"--screenshot={screenshot}",
                  f"{url}/docs")  # fmt: skip
        print(f"screenshot: {screenshot} ({screenshot.stat().st_size:,} bytes)")
    return got == want and bool(want)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", nargs="?", type=Path, help="bundle to serve (or give --url)")
    parser.add_argument("--url", help="a running server's base URL instead of starting one")
    parser.add_argument("--screenshot", type=Path, help="also save a PNG of the rendered page here")
    args = parser.parse_args(argv)
    if (args.bundle is None) == (args.url is None):
        parser.error("give a BUNDLE or --url")
    browser = find_chromium()
    if browser is None:
        print(f"no browser found (tried {', '.join(BROWSERS)}); Debian: apt-get install chromium")
        return 2
    if args.url:
        return 0 if check(browser, args.url.rstrip("/"), args.screenshot) else 1
    with serving(args.bundle) as url:
        ok = check(browser, url, args.screenshot)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
