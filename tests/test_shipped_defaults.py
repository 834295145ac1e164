"""settings.toml as shipped, end to end over a real engine: tests/conftest.py's settings force best_of 1, so this is
where the shipped best_of = 4 meets every door."""

from __future__ import annotations

from conftest import running_core
from fake_backend import Collecting

from core.conversation import Conversation, Who
from core.settings import load_settings


async def test_the_shipped_defaults_end_to_end(tiny_dir, tmp_path):
    """settings.toml as shipped (best_of 4, every limit), only the model and the store swapped: an unlabelled /gen is
    answered with one plain sample, a labelled one is the best of four with its confidence."""
    settings = load_settings(model={"pretrained": str(tiny_dir)}, store={"path": str(tmp_path / "s.sqlite3")})
    assert settings.generation.best_of == 4
    async with running_core(settings) as core:
        talk = Conversation(core)
        plain = await talk.reply(Collecting(), talk.from_text("아 정말", Who("telegram:1", "telegram:1")))
        labelled = await talk.reply(Collecting(), talk.from_text("긍정 아 정말", Who("telegram:1", "telegram:2")))
        api = talk.from_fields({"prompt": "긍정 아 정말"}, Who("web", None), base="tutorial")
    assert plain is not None and len(plain.continuations) == 1 and plain.confidence is None
    assert labelled is not None and len(labelled.continuations) == 1 and labelled.confidence is not None
    assert plain.request.knobs.best_of == 4 and labelled.request.rows == 4 and api.request.rows == 1
