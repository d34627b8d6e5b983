"""Screenshots of the Dagster UI as a user sees it after a run.

    python scripts/ui_screenshots.py OUT_DIR [--port 3333]

Starts ``dagster dev`` on the current REFINERY_HOME / DAGSTER_HOME (after ``make demo``, or any
run), opens the UI in headless Chromium (Debian's package: a browser download fails offline) and
saves PNGs of the asset graph and of benchmark_report's metadata. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("REFINERY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def start_dagster_dev(port: int, log_path: Path) -> subprocess.Popen:
    dagster = Path(sys.executable).with_name("dagster")
    log = open(log_path, "wb")
    # A fresh session with default signal handlers: SIGTERM to the group stops webserver + daemon.
    return subprocess.Popen([str(dagster), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: (signal.signal(signal.SIGINT, signal.SIG_DFL),
                                                signal.signal(signal.SIGTERM, signal.SIG_DFL)))


def wait_until_up(port: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dagster dev exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"dagster dev did not answer on port {port} within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def take_screenshots(port: int, out_dir: Path) -> dict[str, str]:
    from playwright.sync_api import sync_playwright

    base = f"http://127.0.0.1:{port}"
    shots = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                    ignore_default_args=["--headless=old"])
        page = browser.new_page(viewport={"width": 1800, "height": 1100})
        # Mark the community sign-up dialog as seen, as a returning user would have.
        page.add_init_script("window.localStorage.setItem('communityNux', '\"1\"')")

        page.goto(f"{base}/asset-groups", wait_until="networkidle", timeout=120_000)
        page.wait_for_timeout(3000)
        page.mouse.click(1000, 1000, button="right")  # the graph's background menu
        page.get_by_role("menuitem").filter(has_text="Expand all groups").first.click()
        page.wait_for_timeout(4000)  # the graph lays itself out again
        shots["asset_graph"] = _shot(page, out_dir / "asset_graph.png")

        page.set_viewport_size({"width": 1800, "height": 2000})
        for asset in ("benchmark_report", "deduped_corpus", "qlora_model"):
            page.goto(f"{base}/assets/{asset}", wait_until="networkidle", timeout=120_000)
            page.wait_for_timeout(3000)
            shots[asset] = _shot(page, out_dir / f"{asset}.png")
        # Plots are Markdown images, which the UI opens in a dialog.
        for asset, key in (("benchmark_report", "quality_vs_size"), ("benchmark_report", "task_scores"),
                           ("qlora_model", "loss_curve")):
            page.goto(f"{base}/assets/{asset}", wait_until="networkidle", timeout=120_000)
            page.wait_for_timeout(2000)
            link = page.locator("tr", has_text=key).get_by_text("Show Markdown")
            if link.count():
                link.first.click()
                page.wait_for_timeout(1500)
                shots[f"{asset}.{key}"] = _shot(page, out_dir / f"{asset}.{key}.png")
                page.keyboard.press("Escape")
        browser.close()
    return shots


def _shot(page, path: Path) -> str:
    page.screenshot(path=str(path))
    return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--port", type=int, default=3333)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    proc = start_dagster_dev(args.port, args.out_dir / "dagster-dev.log")
    try:
        wait_until_up(args.port, proc)
        shots = take_screenshots(args.port, args.out_dir)
    finally:
        stop(proc)
    print(json.dumps({"screenshots": shots}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
