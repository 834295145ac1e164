"""The README as a new user reads it (issue 19, item 15): the two commands first, the metrics' real label values."""

from __future__ import annotations

import re
from pathlib import Path

from core.metrics import FRONT_ENDS, OUTCOMES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def test_the_two_commands_come_first():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip()
    assert first_block == "pip install torch==2.13.0 -e . && python -m bot"
    assert README.index("## Quick start") < README.index("## Choose a model") < README.index("core.train")


def test_metrics_section_names_every_label_value():
    metrics = _section("Metrics and logs")
    for value in (*FRONT_ENDS, *OUTCOMES):
        assert f"`{value}`" in metrics, value


def test_kogpt2_licence_is_stated_where_the_fine_tune_is_suggested():
    for title in ("Choose a model", "Fine-tune and evaluate"):
        assert "CC-BY-NC-SA 4.0" in _section(title) and "non-commercial" in _section(title), title


def test_no_remarks_about_the_projects_own_machines():
    for remark in ("this project's own machines", "no GPU was lent", "could not\nrun it here", "here (no hub"):
        assert remark not in README
