"""Write a collected report into a directory: the plots, index.html, model-card.md, report.json."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from albor.artifact import atomic_write_json, atomic_write_text
from albor.report.card import card_data, render_card
from albor.report.collect import Report
from albor.report.page import render_page
from albor.report.plots import Drawn, draw_all

PAGE = "index.html"
CARD = "model-card.md"
DATA = "report.json"


def write_report(report: Report, out: Path) -> list[Drawn]:
    """Every file of the report into `out` (created); returns the plots and why any was not
    drawn."""
    out.mkdir(parents=True, exist_ok=True)
    drawn = draw_all(report, out)
    atomic_write_text(out / PAGE, render_page(report, drawn))
    atomic_write_text(out / CARD, render_card(report, drawn))
    data = report.to_json()
    data["plots"] = [asdict(d) for d in drawn]
    data["card"] = card_data(report)
    atomic_write_json(out / DATA, data)
    return drawn
