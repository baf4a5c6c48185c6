"""A screenshot of the demo page (docs/demo.png): start ``python -m oneref.demo``'s app, pick its
first example in headless Chromium, ground it, and save the page.

    python scripts/demo_screenshot.py                          # the checkpoint `make demo` trains
    python scripts/demo_screenshot.py --out shot.png ckpt_path=CKPT task=res

Needs the demo extra, Playwright (dev extra) and a Chromium (``--chromium``, default /usr/bin/chromium;
no browser is downloaded). Trailing arguments are Hydra overrides of conf/demo.yaml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from playwright.sync_api import sync_playwright

from oneref.app import launch
from oneref.config import config_dir
from oneref.demo import build
from oneref.errors import report_user_errors


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/demo.png", help="PNG to write")
    p.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    p.add_argument("--example", type=int, default=0, help="which example to show (0: the first)")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of conf/demo.yaml")
    args = p.parse_args(argv)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("demo", args.overrides)
    blocks = build(cfg)
    _, url, _ = launch(blocks, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            page.goto(url)
            examples = page.locator("button.gallery-item", has_text="(IoU ")
            page.locator("#run").wait_for()  # the page is built
            if examples.count() <= args.example:
                raise SystemExit(f"the page shows {examples.count()} examples; no example {args.example}")
            examples.nth(args.example).click()  # fills the image and the expression
            page.wait_for_function("document.querySelector('#expressions textarea').value.length > 0")
            page.locator("#run").click()
            page.locator("#summary table td").first.wait_for(timeout=120_000)
            page.wait_for_timeout(500)  # the galleries' images finish loading
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        blocks.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
