"""Screenshot of the live WebRTC page in headless Chromium (the README's picture), with the stream's size.

    python bench/page_screenshot.py [--out docs/webrtc_page.png] [-- extra run_live.py arguments]

Starts `run_live.py --demo` (or `--target …` given after `--`) on a free port, opens the page in Debian's
chromium through chromedriver, waits until the video plays and has run a few seconds, and saves a picture of
the page. Prints one Markdown line: the video's size as the browser decodes it, and the page's FPS.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else ["--demo"]
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "docs" / "webrtc_page.png"))
    p.add_argument("--seconds", type=float, default=6.0, help="how long the video plays before the picture")
    p.add_argument("--window", default="900x900", help="browser window size WxH")
    args = p.parse_args(argv)
    if not (os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")):
        print("needs Debian's chromium and chromium-driver (apt install chromium chromium-driver)", file=sys.stderr)
        return 2
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    port = free_port()
    proc = subprocess.Popen([sys.executable, "run_live.py", *extra, "--sink", "webrtc", "--port", str(port),
                             "--quiet"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    driver = None
    try:
        url = None
        deadline = time.monotonic() + 180
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "http://" in line:
                url = line[line.index("http://"):].strip()
            elif proc.poll() is not None:
                print("run_live.py exited before serving the page", file=sys.stderr)
                return 1
        opts = webdriver.ChromeOptions()
        opts.binary_location = "/usr/bin/chromium"
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--autoplay-policy=no-user-gesture-required", f"--window-size={args.window.replace('x', ',')}",
                     "--force-device-scale-factor=1"):
            opts.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
        driver.get(url)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not driver.execute_script(
                "const v = document.getElementById('video'); return v.readyState >= 2 && v.currentTime > 0.5;"):
            time.sleep(0.5)
        time.sleep(args.seconds)
        size = driver.execute_script("const v = document.getElementById('video'); return [v.videoWidth, v.videoHeight];")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(args.out)
        import cv2
        import numpy as np

        shot = cv2.imread(args.out)  # trim the page's empty bottom
        rows = np.nonzero((np.abs(shot.astype(int) - shot[-1, 0].astype(int)).sum(-1) > 30).any(1))[0]
        if len(rows):
            cv2.imwrite(args.out, shot[: min(len(shot), rows[-1] + 16)], [cv2.IMWRITE_PNG_COMPRESSION, 9])
        fps = driver.execute_script("return document.getElementById('fps').textContent;")
        print(f"| video in the page | {size[0]}×{size[1]} | page FPS {fps} | {args.out} |")
    finally:
        if driver is not None:
            driver.quit()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
