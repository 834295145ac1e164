"""Choosing between models, without an engine (fake backends): which model a name picks and the sentence for one that
is not served, /model's listing, `model=` taken out of a request, and starting, draining and stopping them all when
some fail to load."""

from __future__ import annotations

import logging

import pytest

from core.errors import UserError
from core.models import Models, start_models, take_model


class Backend:
    """What Models needs of a backend: telemetry to share, whether labels steer it, drain and stop."""

    def __init__(self, name: str, sentiment: bool = True, unfinished: int = 0):
        self.name, self.sentiment, self.unfinished = name, sentiment, unfinished
        self.telemetry = f"telemetry of {name}"
        self.drained: list[float] = []
        self.stopped = False

    async def drain(self, grace: float) -> int:
        self.drained.append(grace)
        return self.unfinished

    async def stop(self) -> None:
        self.stopped = True


def served(*names: str, failed: dict[str, str] | None = None) -> Models:
    return Models({name: Backend(name, sentiment=name != "plain") for name in names}, names[0], failed or {})


def test_a_name_picks_its_model_and_no_name_the_default():
    models = served("small", "big")
    assert models.names == ["small", "big"]
    assert models.check(None) == models.check("") == "small" and models.check("big") == "big"
    assert models.get("big").name == "big" and models.get(None).name == "small"
    one = Models.single("only", Backend("only"))
    assert one.names == ["only"] and one.default == "only" and one.failed == {} and one.get("").name == "only"


def test_a_model_not_served_is_one_sentence_with_the_choices():
    models = served("small", "big", failed={"broken": "no such file"})
    with pytest.raises(UserError) as info:
        models.get("huge")
    assert str(info.value) == ("모델 'huge'은(는) 쓸 수 없습니다. 쓸 수 있는 모델: small, big "
                               "(unknown or unavailable model; choose one of small, big)")
    with pytest.raises(UserError) as info:
        models.check("broken")
    assert str(info.value) == ("모델 'broken'은(는) 쓸 수 없습니다 — 불러오지 못했습니다 (no such file). 쓸 수 있는 모델: "
                               "small, big (unknown or unavailable model; choose one of small, big)")


def test_the_listing_marks_the_chats_model_and_says_which_labels_steer():
    models = served("small", "plain", failed={"broken": "no such file"})
    assert models.describe("plain") == (
        "• small — 라벨로 감성 조절됨 (labels steer it)\n"
        "▶ plain — 라벨로 감성이 조절되지 않음 (labels do not steer it)\n"
        "✗ broken — 불러오지 못함 (failed to load): no such file")
    bare = Models({"x": object()}, "x")  # a backend that does not say is taken as steered
    assert bare.describe("x") == "▶ x — 라벨로 감성 조절됨 (labels steer it)"


@pytest.mark.parametrize(("text", "expected"), [
    ("긍정 아 model=big top_p=0.9", ("긍정 아  top_p=0.9", "big")),
    ("model=big 긍정 아", (" 긍정 아", "big")),
    ("긍정 아 MODEL = big", ("긍정 아 ", "big")),
    ("긍정 아 모델=작은것", ("긍정 아 ", "작은것")),
    ("긍정 supermodel=big", ("긍정 supermodel=big", None)),  # part of another word: not the model
    ("긍정 아 정말", ("긍정 아 정말", None)),
])
def test_model_word_is_taken_out_of_the_request(text, expected):
    assert take_model(text) == expected


@pytest.mark.parametrize("text", ["긍정 아 model =  ", "긍정 아 model= top_p=0.9", "긍정 모델＝ top_k=3", "model=a=b 긍정"])
def test_a_model_word_without_a_name_is_explained(text):
    with pytest.raises(UserError) as info:
        take_model(text)
    assert str(info.value) == "'model=' 뒤에 모델 이름이 없습니다. /model 로 목록을 보세요. (missing model name after 'model=')"


async def test_the_models_that_load_serve_sharing_the_defaults_telemetry(caplog):
    async def start(settings: str) -> Backend:
        if settings.startswith("bad"):
            raise RuntimeError(f"{settings} failed\nsecond line " + "x" * 300)
        return Backend(settings)

    caplog.set_level(logging.INFO)
    models = await start_models({"a": "first", "b": "bad-b", "c": "third"}, start)
    assert models.names == ["a", "c"] and models.default == "a" and models.failed == {"b": "bad-b failed"}
    assert [backend.telemetry for backend in models.backends.values()] == ["telemetry of first"] * 2
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, "model 'b' could not be loaded; the others serve: bad-b failed")]
    caplog.clear()
    long = "y" * 300
    models = await start_models({"a": f"bad {long}", "c": "third", "d": "fourth"}, start)
    assert models.default == "c" and models.failed == {"a": f"bad {long}"[:200]}
    assert models.backends["d"].telemetry == "telemetry of third"
    assert caplog.records[-1].levelno == logging.WARNING
    assert caplog.records[-1].getMessage() == "the default model failed to load; 'c' is the default now"


async def test_when_no_model_loads_the_first_failure_is_the_error():
    async def start(settings: str) -> Backend:
        raise RuntimeError(settings)

    with pytest.raises(RuntimeError, match="^first$"):
        await start_models({"a": "first", "b": "second"}, start)


async def test_drain_counts_every_models_unfinished_work_and_stop_stops_them_all():
    models = Models({"a": Backend("a", unfinished=2), "b": Backend("b"), "c": Backend("c", unfinished=1)}, "a")
    assert await models.drain(5.0) == 3
    assert [backend.drained for backend in models.backends.values()] == [[5.0]] * 3
    await models.stop()
    assert all(backend.stopped for backend in models.backends.values())
