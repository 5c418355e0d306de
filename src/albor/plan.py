"""A plan: what a stage's `apply` would do, checked and estimated without side effects.

`Plan` = checks (ok / warn / fail, each with a detail that says the fix when it fails) +
estimates (numbers, shown as a table) + actions (what apply will do, in words). A plan with any
failing check is invalid: the CLI exits 1 and `apply` refuses to start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["ok", "warn", "fail"]


@dataclass
class Check:
    name: str
    status: Status
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail}


@dataclass
class Plan:
    stage: str
    checks: list[Check] = field(default_factory=list)
    estimates: dict[str, Any] = field(default_factory=dict)
    actions: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def add(self, name: str, status: Status, detail: str) -> Check:
        check = Check(name, status, detail)
        self.checks.append(check)
        return check

    def require(self, name: str, condition: bool, ok: str, fail: str) -> bool:
        """Add an ok check when `condition` holds, else a failing one saying the fix."""
        self.add(name, "ok" if condition else "fail", ok if condition else fail)
        return condition

    def warn_if(self, name: str, condition: bool, warning: str, ok: str) -> None:
        self.add(name, "warn" if condition else "ok", warning if condition else ok)

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "ok": self.ok,
            "checks": [c.to_json() for c in self.checks],
            "estimates": self.estimates,
            "actions": list(self.actions),
        }

    def summary(self) -> str:
        """One line naming the failing checks, for error messages."""
        fails = self.failures
        if not fails:
            return f"{self.stage}: plan ok"
        return "; ".join(f"{c.name}: {c.detail}" for c in fails)
