"""The report page in a real headless browser (Debian's chromium, driven over DevTools): it
renders, every image loads, and the console has no errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from cdp_client import INSTALL_HINT, Browser, find_browser

from albor.report import collect, write_report

BROWSER = find_browser()
needs_browser = pytest.mark.skipif(BROWSER is None, reason=INSTALL_HINT)


@needs_browser
@pytest.mark.parametrize("which", ["complete_workdir", "broken_workdir"])
def test_page_renders_in_chromium(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    workdir: Path = request.getfixturevalue(which)
    report = collect(workdir, skip="report")
    drawn = write_report(report, tmp_path)
    assert BROWSER is not None
    with Browser(BROWSER) as browser:
        page = browser.visit(tmp_path / "index.html")
    assert page.errors == []
    assert page.title == "albor report: ladder-test"
    assert page.headings[0] == "albor report: ladder-test"
    assert "Summary" in page.headings and "Data funnel" in page.headings
    assert len(page.images) == sum(d.file is not None for d in drawn) == 4
    for image in page.images:
        assert image["complete"] and image["naturalWidth"] > 0, image
    if which == "broken_workdir":
        # The hostile markup is shown as text, and no script of it ran (no exception above).
        assert "<script>alert('pwned')</script>" in page.text
        assert any(h.startswith("Missing or failed stages") for h in page.headings)


@needs_browser
def test_a_broken_image_is_caught(complete_workdir: Path, tmp_path: Path) -> None:
    """The check above can fail: a page whose image is gone is reported as such."""
    write_report(collect(complete_workdir, skip="report"), tmp_path)
    (tmp_path / "ladder.png").unlink()
    assert BROWSER is not None
    with Browser(BROWSER) as browser:
        page = browser.visit(tmp_path / "index.html")
    broken = [i["src"] for i in page.images if not (i["complete"] and i["naturalWidth"] > 0)]
    assert broken == ["ladder.png"]
    assert any("ladder.png" in e for e in page.errors)
