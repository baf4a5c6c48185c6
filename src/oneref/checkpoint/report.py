"""What a conversion or load did to every key: mapped, renamed, resized, dropped, missing."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class ConversionReport:
    source: str = ""
    source_format: str = ""
    mapped: list[str] = field(default_factory=list)  # our keys that received a checkpoint tensor
    renamed: dict[str, str] = field(default_factory=dict)  # source key -> our key, only where they differ
    resized: list[dict[str, Any]] = field(default_factory=list)  # {key, from, to, method}
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> why it was not loaded
    missing: dict[str, str] = field(default_factory=dict)  # our key -> why it has no checkpoint tensor
    unexpected: list[str] = field(default_factory=list)  # source keys no name-map entry covers
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["counts"] = {
            "mapped": len(self.mapped),
            "renamed": len(self.renamed),
            "resized": len(self.resized),
            "dropped": len(self.dropped),
            "missing": len(self.missing),
            "unexpected": len(self.unexpected),
        }
        return out

    def summary(self) -> str:
        """A few lines for logs and the CLI; groups repeated reasons instead of listing every key."""
        lines = [
            f"{self.source_format or 'checkpoint'} {self.source}".rstrip()
            + f": {len(self.mapped)} tensors mapped"
        ]
        if self.renamed:
            lines.append(f"  renamed: {len(self.renamed)} keys (e.g. {next(iter(self.renamed.items()))})")
        for r in self.resized:
            lines.append(f"  resized: {r['key']} {r['from']} -> {r['to']} ({r['method']})")
        for title, table in (("dropped", self.dropped), ("missing (left at initialisation)", self.missing)):
            by_reason: dict[str, list[str]] = {}
            for key, why in table.items():
                by_reason.setdefault(why, []).append(key)
            for why, keys in by_reason.items():
                shown = ", ".join(keys[:4]) + (f", ... ({len(keys)} keys)" if len(keys) > 4 else "")
                lines.append(f"  {title}: {shown}: {why}")
        if self.unexpected:
            lines.append(
                f"  unexpected: {', '.join(self.unexpected[:8])}{' ...' if len(self.unexpected) > 8 else ''}"
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = summary

    def log(self, level: int = logging.INFO) -> None:
        log.log(level, "%s", self.summary())
