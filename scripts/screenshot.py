"""scripts/screenshot's browser half: the top of the demo's report (header, filters, the findings
list) as a PNG."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from browser import browser_missing, launched, open_page

WIDTH, HEIGHT, MOST = 1280, 900, 2400  # pixels; the picture ends below the findings list


def main(report: Path, out: Path) -> int:
    missing = browser_missing()
    if missing is not None:
        print(f"scripts/screenshot: {missing}", file=sys.stderr)
        return 2
    with launched() as browser:
        o = open_page(
            browser,
            report.resolve().as_uri(),
            viewport={"width": WIDTH, "height": HEIGHT},
            color_scheme="light",
        )
        bottom = o.page.evaluate(
            "Math.ceil(document.getElementById('list').getBoundingClientRect().bottom)"
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        o.page.screenshot(
            path=out,
            clip={"x": 0, "y": 0, "width": WIDTH, "height": min(bottom + 24, MOST)},
            full_page=True,
        )
        o.assert_clean()
        o.page.context.close()
    print(f"screenshot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
