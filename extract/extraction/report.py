"""The report of an extraction run: images extracted, found already done, skipped (and why)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Report:
    """Images extracted into ``output`` in this run, found already there, and skipped (path, reason)."""

    output: Path
    processed: int = 0
    existing: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def skip(self, path: Path, reason: str) -> None:
        self.skipped.append((str(path), reason))

    def add(self, other: Report) -> Report:
        return Report(self.output, self.processed + other.processed, self.existing + other.existing,
                      sorted(self.skipped + other.skipped))

    @classmethod
    def total(cls, reports: list[Report]) -> Report:
        """The sum of the reports of several processes (same output)."""
        total = cls(reports[0].output)
        for r in reports:
            total = total.add(r)
        return total

    def text(self) -> str:
        lines = [f"{self.output}: {self.processed} image{'' if self.processed == 1 else 's'} extracted, "
                 f"{self.existing} already there, {len(self.skipped)} skipped or without features"]
        lines += [f"  {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines) + "\n"

    def save(self) -> Path:
        """Write :meth:`text` to ``<output without suffix>.report.txt``; returns that path."""
        path = self.output.with_suffix(".report.txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.text())
        return path
