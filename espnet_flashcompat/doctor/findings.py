"""The findings of a doctor report: their levels, the exit code they give, and how a place is written.

A finding is ``{level, topic, message, fix}``; ``report.gather`` collects them and every checker adds its own at
one of three levels. ``exit_code()`` turns them into the report's exit code: 2 broken (any ``error``), 1 degraded
(any ``degraded``: a fallback is in force), 0 healthy (``warning`` findings never change the code).
"""

from typing import List, Optional

HEALTHY, DEGRADED, BROKEN = 0, 1, 2
STATUS = {HEALTHY: "healthy", DEGRADED: "degraded", BROKEN: "broken"}
ERROR, FALLBACK, WARNING = "error", "degraded", "warning"  # finding levels


def exit_code(findings: List[dict]) -> int:
    levels = {f["level"] for f in findings}
    return BROKEN if ERROR in levels else DEGRADED if FALLBACK in levels else HEALTHY


def at(where: Optional[str]) -> str:
    """' (at file:line)', or nothing when the place is unknown."""
    return f" (at {where})" if where else ""
