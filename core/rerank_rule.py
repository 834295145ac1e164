"""The rule that picks best_of's candidate from its label scores, shared by every backend. No torch here.

A candidate's score is log p(c | its label's prompt) − log p(c | the other label's prompt): the model's own log-odds
that the text is on-label; how a backend computes it is its own (core/rerank.py in this process, the server's
log-probabilities for a remote one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# None: always the most on-label candidate. A threshold (take the first candidate read as at least this surely
# on-label) was measured against it with `python -m core.evaluate --accept max,0.9,0.75`: it kept distinct-2 at
# best_of 1's level but lost 1-3 points of control, while the arg-max cost at most 1.5 points of distinct-2
# (models/nsmc-small/MODEL_CARD.md); `core.evaluate --accept` repeats the comparison.
ACCEPT: float | None = None


def pick_best(scores: Sequence[float], groups: int, accept: float | None = None) -> list[int]:
    """Per each of `groups` equal consecutive groups: the highest score (ties: the first candidate); with `accept`,
    the first candidate whose confidence reaches it, else the highest score."""
    k = len(scores) // groups
    picks = []
    for g in range(groups):
        group = range(g * k, (g + 1) * k)
        sure = [i for i in group if accept is not None and confidence(scores[i]) >= accept]
        picks.append(sure[0] if sure else max(group, key=lambda i: (scores[i], -i)))
    return picks


def confidence(score: float) -> float:
    """P(label | text) under equal label priors."""
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, score))))
