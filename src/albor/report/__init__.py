"""The ladder's report: read a pipeline workdir (`collect`), draw its plots (`plots`), write one
HTML page (`page`) and a Markdown model card (`card`).

    report = collect(Path("albor-run"))
    write_report(report, Path("albor-run/report"))   # index.html, model-card.md, *.png, report.json

Run from the command line as `albor report WORKDIR`, or as the pipeline's `report` stage. Nothing
here imports torch: a report reads manifests and metrics files only.
"""

from __future__ import annotations

from albor.report.collect import Report, collect
from albor.report.write import write_report

__all__ = ["Report", "collect", "write_report"]
