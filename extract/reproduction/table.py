"""The reproduction's tables: published figure, this run's, the difference, and what made them.

:func:`summary_table` is the Markdown table of several setups (what reproduce.py prints);
:func:`write_reproduction` writes one setup's ``table.md`` (the table, the commands, the config
file), ``table.json`` (the same, and every score) and ``evaluation.json`` (as evaluate.py's
--output writes it) into its folder. mAP in percent; the difference is this run's less the
published one.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from extract.evaluation.evaluate_dataset import Scores, write_json
from extract.reproduction.pipeline import Reproduction
from extract.reproduction.setups import shown
from train.outputs import atomic_path

PROTOCOL_NAMES = {"easy": "Easy", "medium": "Medium", "hard": "Hard"}


def summary_table(done: Sequence[Reproduction]) -> str:
    """One Markdown row per setup and published protocol."""
    lines = ["| setup | mAP | published | this run | difference |", "|---|---|---:|---:|---:|"]
    for r in done:
        for protocol, published, ours, difference in r.rows():
            lines.append(f"| {r.setup.name} | {PROTOCOL_NAMES[protocol]} | {published:.1f} | {ours:.2f} | "
                         f"{difference:+.2f} |")
    return "\n".join(lines)


def setup_markdown(r: Reproduction) -> str:
    """``table.md`` of one setup: the table, the published source, the commands and the config."""
    p = r.setup.published
    text = [f"# {r.setup.name}", "", summary_table([r]), "",
            f"Published: {p.source}, {p.method}. This run: {r.settings['dataset']}, model "
            f"{shown(r.settings['checkpoint'])}.", ""]
    if r.setup.note:
        text += [f"Note: {r.setup.note}.", ""]
    text += ["Made by:", "", "```shell", r.command, "```", "", "which evaluates as:", "", "```shell",
             r.evaluate_command, "```", "", f"with {shown(r.setup.config)}:", "", "```toml",
             r.setup.config.read_text().rstrip(), "```", ""]
    return "\n".join(text)


def setup_json(r: Reproduction) -> dict[str, Any]:
    """``table.json`` of one setup (the scores rounded as evaluate.py's JSON)."""
    p = r.setup.published
    return {"setup": r.setup.name, "published": {"source": p.source, "method": p.method, "mAP": dict(p.mAP)},
            "this_run": {"mAP": {protocol: round(ours, 4) for protocol, _, ours, _ in r.rows()}},
            "difference": {protocol: round(difference, 4) for protocol, _, _, difference in r.rows()},
            "note": r.setup.note, "command": r.command, "evaluate_command": r.evaluate_command,
            "config": shown(r.setup.config), "settings": r.settings,
            "scores": {**rounded(r.final), "initial": rounded(r.initial)}}


def rounded(scores: Scores) -> dict[str, dict[str, float | None]]:
    """Scores as evaluate.py's JSON holds them: 4 decimals, NaN (no query with positives) as null."""
    return {p: {k: None if math.isnan(v) else round(v, 4) for k, v in row.items()} for p, row in scores.items()}


def write_reproduction(r: Reproduction, folder: Path) -> list[Path]:
    """table.md, table.json and evaluation.json of ``r`` in ``folder`` (each replaced atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    md, js, evaluation = folder / "table.md", folder / "table.json", folder / "evaluation.json"
    with atomic_path(md) as tmp:
        tmp.write_text(setup_markdown(r))
    with atomic_path(js) as tmp:
        tmp.write_text(json.dumps(setup_json(r), indent=2, default=str) + "\n")
    with atomic_path(evaluation) as tmp:
        write_json(r.final, tmp, r.initial, r.settings)
    return [md, js, evaluation]
