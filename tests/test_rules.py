"""Small rules without an engine, checked exactly: the allowlist, the per-chat store and its error sentences, the
reply layout, help text, and the rerank's scores and pick (against a direct computation on a tiny random GPT-2)."""

from __future__ import annotations

import errno
import sqlite3
import threading

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from core import rerank
from core.access import Access, Verdict, discord_access, telegram_access
from core.chat_store import ChatStore, _why
from core.errors import StoreError
from core.knobs import Knobs
from core.replies import CURSOR, UNSTEERED, help_text, render_generation, render_knobs, shorten
from core.settings import load_settings
from core.types import Generation, GenRequest

KNOBS = Knobs(min_length=10, max_length=20, top_p=1.0, top_k=50, repetition_penalty=1.0, no_repeat_ngram_size=0,
              temperature=1.0)


# ---- access ---------------------------------------------------------------------------------------------------
def test_access_is_built_from_each_platforms_settings():
    settings = load_settings(store={"path": ":memory:"},
                             telegram={"allowed_chat_ids": [-100], "allowed_user_ids": [7], "refusal": "ignore"},
                             discord={"allowed_guild_ids": [1], "allowed_channel_ids": [2]})
    tg, dc = telegram_access(settings.telegram), discord_access(settings.discord)
    assert tg.check(chat=-100, user=None) is Verdict.ALLOW and tg.check(chat=5, user=7) is Verdict.ALLOW
    assert tg.check(chat=5, user=8) is Verdict.IGNORE
    assert dc.check(guild=1, channel=None) is Verdict.ALLOW and dc.check(guild=None, channel=2) is Verdict.ALLOW
    assert dc.check(guild=3, channel=4) is Verdict.REFUSE
    quiet = load_settings(store={"path": ":memory:"}, discord={"allowed_guild_ids": [1], "refusal": "ignore"})
    assert discord_access(quiet.discord).check(guild=2, channel=None) is Verdict.IGNORE


def test_access_misuse_is_named():
    with pytest.raises(ValueError, match="refusal must be 'reply' or 'ignore', not 'shout'"):
        Access({}, "shout")
    with pytest.raises(TypeError, match=r"unknown id kinds: \['guild'\]"):
        Access({"chat": [1]}).check(chat=1, guild=2)


# ---- the per-chat store ---------------------------------------------------------------------------------------
def test_the_store_keeps_values_per_chat_in_a_file_from_any_thread(tmp_path):
    path = tmp_path / "deep" / "er" / "store.sqlite3"  # parents are made
    store = ChatStore(path)
    store.update("telegram:1", {"top_p": 0.5})
    seen = []
    worker = threading.Thread(target=lambda: seen.append(store.overrides("telegram:1")))
    worker.start()
    worker.join()
    assert seen == [{"top_p": 0.5}]
    store.close()
    again = ChatStore(path)
    assert again.overrides("telegram:1") == {"top_p": 0.5} and again.overrides("telegram:2") == {}
    again.reset("telegram:1")
    assert again.overrides("telegram:1") == {}
    again.close()
    assert not (tmp_path / ":memory:").exists()


def test_a_stale_saved_value_falls_back_and_is_cleaned_up():
    store = ChatStore(":memory:")
    limits = load_settings(store={"path": ":memory:"}).limits
    store.update("c", {"top_p": 0.5, "n": 9})  # n=9 is past today's max_candidates
    assert store.knobs("c", KNOBS, limits) == KNOBS
    assert store.overrides("c") == {}


@pytest.mark.parametrize(("exc", "reason"), [
    (sqlite3.OperationalError("attempt to write a readonly database"),
     "쓸 수 없습니다: 읽기 전용이거나 uid {uid}에게 권한이 없습니다 (not writable: read-only, or no permission for uid {uid})"),
    (PermissionError(errno.EACCES, "denied"),
     "쓸 수 없습니다: 읽기 전용이거나 uid {uid}에게 권한이 없습니다 (not writable: read-only, or no permission for uid {uid})"),
    (sqlite3.OperationalError("database or disk is full"), "디스크가 가득 찼습니다 (the disk is full)"),
    (OSError(errno.ENOSPC, "No space left"), "디스크가 가득 찼습니다 (the disk is full)"),
    (sqlite3.DatabaseError("file is not a database"),
     "SQLite 데이터베이스가 아니거나 손상되었습니다 (not an SQLite database, or corrupt)"),
    (sqlite3.DatabaseError("database disk image is malformed"),
     "SQLite 데이터베이스가 아니거나 손상되었습니다 (not an SQLite database, or corrupt)"),
    (sqlite3.OperationalError("disk I/O error"), "열 수 없습니다 (cannot be used: disk I/O error)"),
    (OSError(errno.EROFS, "Read-only file system"),
     "쓸 수 없습니다: 읽기 전용이거나 uid {uid}에게 권한이 없습니다 (not writable: read-only, or no permission for uid {uid})"),
    (sqlite3.DatabaseError("database corrupt at page 3"),
     "SQLite 데이터베이스가 아니거나 손상되었습니다 (not an SQLite database, or corrupt)"),
    (sqlite3.OperationalError("unable to open database file"),
     "열 수 없습니다 (cannot be used: unable to open database file)"),  # its folder is writable: another reason
    (sqlite3.OperationalError(""), "열 수 없습니다 (cannot be used: OperationalError)"),
])
def test_each_store_failure_is_one_sentence_naming_it(tmp_path, exc, reason):
    import os

    path = str(tmp_path / "s.sqlite3")
    assert _why(path, exc) == f"저장소 {path} (store.path): " + reason.format(uid=os.getuid())
    assert _why(str(tmp_path), exc) == (f"저장소 {tmp_path} (store.path): "
                                        "파일이 아니라 디렉터리입니다 (it is a directory; store.path names a file)")


def test_a_store_that_fails_at_run_time_says_what_it_could_not_do(tmp_path, caplog):
    store = ChatStore(tmp_path / "s.sqlite3")
    store._db.execute("PRAGMA query_only = ON")  # reads work, writes fail
    closed = ChatStore(tmp_path / "s.sqlite3")
    closed._db.close()  # every statement fails
    for call, ko, en in ((lambda: closed.overrides("c"), "읽지", "read"), (lambda: store.update("c", {"n": 1}), "저장하지", "save"),
                         (lambda: store.reset("c"), "초기화하지", "reset")):
        with pytest.raises(StoreError) as info:
            call()
        assert str(info.value).startswith(f"채팅 설정을 {ko} 못했습니다. 저장소 {tmp_path / 's.sqlite3'} (store.path): ")
        assert str(info.value).endswith(f". 생성은 계속 쓸 수 있습니다. (could not {en} the chat settings: a store failure; "
                                        "/gen still works)")
        assert caplog.records[-1].getMessage().startswith(f"store {tmp_path / 's.sqlite3'}: could not {en} chat settings: ")
        assert caplog.records[-1].getMessage().endswith(("closed database.", "readonly database"))
    with pytest.raises(StoreError) as info:
        closed.overrides("c")
    assert "(cannot be used: Cannot operate on a closed database.)" in str(info.value)
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError) as info:
        ChatStore(tmp_path / "file" / "s.sqlite3")  # its folder is a file
    assert f"저장소 {tmp_path / 'file' / 's.sqlite3'} (store.path): 열 수 없습니다 (cannot be used: [Errno" in str(info.value)


def test_a_folder_the_bot_cannot_write_is_named(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.W_OK)  # exists, but not writable
    assert _why(str(tmp_path / "s.sqlite3"), sqlite3.OperationalError("unable to open database file")).endswith(
        f"(not writable: read-only, or no permission for uid {os.getuid()})")


# ---- the reply layout -----------------------------------------------------------------------------------------
def gen(continuations, seeds, done=True, confidence=None, label="긍정", prompt="아 정말"):
    return Generation(GenRequest(label, prompt, KNOBS), tuple(continuations), tuple(seeds), 5, done, confidence)


def test_one_result_its_partial_and_its_seed():
    assert render_generation(gen([" 재밌다"], [7]), 4096) == "긍정 아 정말 재밌다\n\nseed=7"
    assert render_generation(gen([" 재밌"], [7], done=False), 4096) == "긍정 아 정말 재밌" + CURSOR
    assert render_generation(gen([" 재밌다"], [7], label=None), 4096) == "아 정말 재밌다\n\nseed=7"


def test_several_results_are_numbered_with_their_seeds_and_confidence():
    text = render_generation(gen([" 좋다", " 최고"], [1, 2], confidence=(0.934, 0.5)), 4096,
                             escape=lambda s: s.replace("&", "&amp;"), emphasize=lambda s: f"<b>{s}</b>")
    assert text == "1. <b>긍정 아 정말</b> 좋다\n\n2. <b>긍정 아 정말</b> 최고\n\nseed=1, 2 · 긍정 93%, 50%"
    partial = render_generation(gen([" 좋", " 최"], [1, 2], done=False), 4096)
    assert partial == f"1. 긍정 아 정말 좋{CURSOR}\n\n2. 긍정 아 정말 최{CURSOR}"


def test_long_results_are_shortened_to_the_platforms_length_never_the_markup():
    # budget = limit - prompt×k - footer - 16×k; each continuation gets an equal share
    one = gen([" 가나다라마바사아자차"], [7], prompt="아")  # head "긍정 아" (4), footer "\n\nseed=7" (8)
    assert render_generation(one, 40) == "긍정 아 가나다라마바사아자차\n\nseed=7"  # share 12 ≥ 11
    assert render_generation(one, 35) == "긍정 아 가나다라마…\n\nseed=7"  # share 7
    two = gen([" 가나다라", " 마바사아"], [1, 2], prompt="아")  # footer "\n\nseed=1, 2" (11)
    assert render_generation(two, 60) == "1. 긍정 아 가나…\n\n2. 긍정 아 마바…\n\nseed=1, 2"  # share (60-8-11-32)//2 = 4
    assert render_generation(one, 10) == "긍정 아…\n\nse…"  # nothing left for the text: the whole is cut
    assert render_generation(gen(["가"], [7], prompt="아"), 10) == "긍정 아…\n\nse…"  # even a one-character text


def test_shorten_marks_a_cut():
    assert [shorten("abcd", n) for n in (5, 4, 3, 1, 0)] == ["abcd", "abcd", "ab…", "…", "…"]


def test_the_settings_listing():
    assert render_knobs(KNOBS, escape=str.upper) == (
        "MIN_LENGTH = 10\nMAX_LENGTH = 20\nTOP_P = 1.0\nTOP_K = 50\nREPETITION_PENALTY = 1.0\n"
        "NO_REPEAT_NGRAM_SIZE = 0\nTEMPERATURE = 1.0\nSEED = (무작위)\nN = 1\nBEST_OF = 1")


def test_help_lists_the_grammar_every_knob_and_examples():
    limits = load_settings(store={"path": ":memory:"}).limits
    text = help_text(KNOBS, limits, command="!gen")
    lines = text.split("\n")
    assert lines[:5] == ["!gen [긍정|부정] 프롬프트 [key=value …]",
                         "라벨: 긍정(pos, positive, 👍) / 부정(neg, negative, 👎) — 생략하면 프롬프트 그대로 이어 씁니다.",
                         "길이는 프롬프트를 포함한 토큰 수입니다.", "", "설정 (이름 · 별칭 · 범위 · 기본값):"]
    assert lines[5] == "• min_length (min, minlen, min_len): 1 이상 128 이하의 정수, 기본 10 — 최소 길이 (프롬프트 포함 토큰 수)"
    assert lines[7] == "• top_p (p, topp, nucleus): 0 초과 1 이하의 실수, 기본 1.0 — 누적 확률 상위 p 안에서만 샘플링"
    assert lines[12] == ("• seed (s, 시드): 0 이상 9007199254740991 이하의 정수, 기본 무작위 — "
                         "난수 시드: 같은 seed와 같은 설정이면 같은 결과 (후보 하나는 그 seed에 n=1, best_of=1)")
    assert len([line for line in lines if line.startswith("• ")]) == 10
    assert lines[15:] == ["", "예시:", "!gen 긍정 아 정말 top_p=0.9", "!gen 부정 이 영화는 temperature=0.8 max_length=40",
                          "!gen pos 배우들 연기가 n=3 seed=42", "!gen 부정 배우들 연기가 best_of=8", "",
                          "best_of=k: 후보 k개 중 모델 스스로 라벨에 가장 맞다고 읽는 것을 고르고, 그 확신도(예: 긍정 93%)를 보여 줍니다."]
    assert help_text(KNOBS, limits).startswith("/gen [긍정|부정]")
    unsteered = help_text(KNOBS, limits, steered=False, escape=lambda s: s.replace("⚠️", "!"))
    assert unsteered.split("\n")[:3] == [UNSTEERED.replace("⚠️", "!"), "", "/gen [긍정|부정] 프롬프트 [key=value …]"]
    # Then what the backend cannot do, then the chat's model when there is a choice (and how to switch it).
    full = help_text(KNOBS, limits, command="!gen", steered=False, model="other", notice="best_of 없음 (no best_of)")
    assert full.split("\n")[:7] == [UNSTEERED, "", "best_of 없음 (no best_of)", "",
                                    "모델 (model): other — 목록·바꾸기는 !model, 한 요청만 model=이름", "",
                                    "!gen [긍정|부정] 프롬프트 [key=value …]"]
    assert help_text(KNOBS, limits, model="other").split("\n")[:2] == [
        "모델 (model): other — 목록·바꾸기는 /model, 한 요청만 model=이름", ""]


# ---- the rerank ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    return GPT2LMHeadModel(config).eval()


def direct_logprob(model, context, continuation) -> float:
    ids = torch.tensor([list(context) + list(continuation)])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
    return sum(float(logp[len(context) - 1 + i, token]) for i, token in enumerate(continuation))


@pytest.mark.parametrize("per_chunk_logits", [10**9, 1])
def test_continuation_logprobs_are_each_sequences_own_in_any_chunking(tiny_gpt2, monkeypatch, per_chunk_logits):
    monkeypatch.setattr(rerank, "LOGITS_PER_CHUNK", per_chunk_logits)
    contexts = [[1, 2, 3], [4], [5, 6]]
    continuations = [[7, 8], [9, 10, 11, 12], [13]]
    got = rerank.continuation_logprobs(tiny_gpt2, contexts, continuations)
    expected = [direct_logprob(tiny_gpt2, c, k) for c, k in zip(contexts, continuations)]
    assert got == pytest.approx(expected, abs=1e-4)
    assert rerank.continuation_logprobs(tiny_gpt2, [], []) == []


def test_the_pick_is_the_best_or_the_first_sure_one_per_group():
    assert rerank.pick_best([0.1, 3.0, 2.0, 5.0, 1.0, 5.0], 2) == [1, 3]  # ties: the first
    sure = rerank.confidence(2.0)
    assert rerank.pick_best([1.0, 2.0, 3.0], 1, accept=sure) == [1]  # reaching the threshold exactly is enough
    assert rerank.pick_best([1.0, 1.5, 3.0], 1, accept=0.999) == [2]
    assert rerank.confidence(0.0) == 0.5 and rerank.confidence(1000.0) == 1.0
    assert rerank.confidence(-60.0) == rerank.confidence(-50.0) > 0.0


# ---- the rate limiter -----------------------------------------------------------------------------------------
def test_a_fraction_of_a_second_interval_still_limits_and_says_one_second():
    from core.errors import RateLimited
    from core.rate_limit import UserRateLimiter

    now = [0.0]
    limiter = UserRateLimiter(0.5, clock=lambda: now[0])
    limiter.check("u")
    now[0] = 0.1
    with pytest.raises(RateLimited, match=r"1초 후에 다시 시도해 주세요\. \(please wait 1 s\)"):
        limiter.check("u")


def test_the_limiter_says_the_wait_rounded_up_once_per_window_and_again_in_the_next():
    from core.errors import RateLimited
    from core.rate_limit import UserRateLimiter

    now = [100.0]
    limiter = UserRateLimiter(10, clock=lambda: now[0])

    def refusal(user: str) -> tuple[str, bool]:
        with pytest.raises(RateLimited) as info:
            limiter.check(user)
        return str(info.value), info.value.quiet

    limiter.check("a")
    limiter.check("b")  # each user has their own window
    now[0] = 107.7  # 2.3 s left: told 3, never a wait that is too short
    assert refusal("a") == ("조금만 천천히 해 주세요. 3초 후에 다시 시도해 주세요. (please wait 3 s)", False)
    assert refusal("a")[1] is True and refusal("b")[1] is False  # the rest of a's burst is quiet; b is told once
    now[0] = 110.0  # exactly one interval after a's generation: admitted, and the next window tells again
    limiter.check("a")
    now[0] = 119.5
    assert refusal("a") == ("조금만 천천히 해 주세요. 1초 후에 다시 시도해 주세요. (please wait 1 s)", False)


def test_the_limiter_forgets_its_oldest_users_first():
    from core.rate_limit import UserRateLimiter

    now = [0.0]
    limiter = UserRateLimiter(10, capacity=2, clock=lambda: now[0])
    limiter.check("a")
    with pytest.raises(Exception):  # noqa: B017 (told once)
        limiter.check("a")
    limiter.check("b")
    limiter.check("c")  # "a" is forgotten, and so is having told it
    assert list(limiter._last) == ["b", "c"] and limiter._told == set()
    limiter.check("a")


# ---- prompt rules: the exact sentences -----------------------------------------------------------------------
def test_prompt_length_sentences():
    from core.errors import UserError
    from core.prompt_rules import check_prompt_ids

    limits = load_settings(store={"path": ":memory:"}).limits
    request = GenRequest("긍정", "아", KNOBS)  # max_length 20
    with pytest.raises(UserError) as info:
        check_prompt_ids([], request, limits)
    assert str(info.value) == "프롬프트가 비어 있습니다. (the prompt is empty)"
    with pytest.raises(UserError) as info:
        check_prompt_ids(list(range(20)), request, limits)
    assert str(info.value) == ("프롬프트가 이미 20토큰이라 max_length(20) 안에 이어 쓸 자리가 없습니다. max_length를 21 이상 "
                               "128 이하로 지정하세요. (max_length counts the prompt's 20 tokens; use max_length between 21 "
                               "and 128)")


# ---- follow-up buttons ----------------------------------------------------------------------------------------
def test_button_data_round_trips():
    from core.followups import Press, button_data, parse_button

    assert button_data("Ab3_-xyZ") == "r:Ab3_-xyZ" and button_data("Ab3_-xyZ", 2) == "c:Ab3_-xyZ:2"
    assert parse_button(button_data("Ab3_-xyZ")) == Press("Ab3_-xyZ", None)
    assert parse_button(button_data("Ab3_-xyZ", 12)) == Press("Ab3_-xyZ", 12)


# ---- grammar and knobs: edges and exact sentences ---------------------------------------------------------------
def test_lone_surrogates_at_both_ends_of_the_range_are_refused():
    from core.errors import UserError
    from core.grammar import BROKEN_TEXT, reject_broken_text

    for ch in ("\ud800", "\udfff"):
        with pytest.raises(UserError) as info:
            reject_broken_text(f"아{ch}정말")
        assert str(info.value) == BROKEN_TEXT.format(code=ord(ch))
    reject_broken_text("아 정말 😀 \ud7ff\ue000")


def test_grammar_edges():
    from core.errors import UserError
    from core.grammar import check_prompt, normalise_label, parse_gen, parse_settings_args

    limits = load_settings(store={"path": ":memory:"}).limits
    assert normalise_label("[긍정]") == "긍정" and normalise_label("X긍정") is None
    assert check_prompt(" 아  \t 정말 ", limits) == "아 정말"
    request = parse_gen("정말 =) 좋다 top_p=0.5", KNOBS, limits)  # prose with "=" and a knob after it
    assert (request.prompt, request.knobs.top_p, request.origin) == ("정말 =) 좋다", 0.5, "")
    assert parse_gen("아 정말 best_of=1", KNOBS, limits).knobs.best_of == 1  # best_of 1 needs no label
    with pytest.raises(UserError) as info:
        parse_gen("아 정말 best_of=2", KNOBS, limits)
    assert str(info.value) == ("best_of는 라벨(긍정/부정)이 있을 때만 쓸 수 있습니다: 후보 중 라벨에 가장 맞는 것을 고르기 "
                               "때문입니다. 예: /gen 긍정 아 정말 best_of=4 (best_of needs a label: it picks the candidate "
                               "that fits the label best)")
    with pytest.raises(UserError) as info:
        parse_settings_args("", KNOBS, limits)
    assert str(info.value) == "바꿀 설정을 key=value로 적어 주세요. 예: /set top_p=0.9 (nothing to set)"
    with pytest.raises(UserError) as info:
        parse_settings_args("가" * 40 + " top_p=0.5", KNOBS, limits)
    assert str(info.value) == ("'" + "가" * 30 + "'은(는) key=value 형식이 아닙니다. 예: /set top_p=0.9 temperature=0.8 "
                               "(expected key=value pairs)")


def test_request_from_text_keeps_its_origin():
    from core.grammar import request_from_text

    limits = load_settings(store={"path": ":memory:"}).limits
    assert request_from_text("긍정 아", KNOBS, limits, origin="web").origin == "web"


def test_unknown_keys_and_shown_values_are_named_exactly():
    from core.errors import UserError
    from core.knobs import _fmt, knob_specs, parse_value, resolve_key, validate_knobs

    limits = load_settings(store={"path": ":memory:"}).limits
    specs = knob_specs(limits)
    names = "min_length, max_length, top_p, top_k, repetition_penalty, no_repeat_ngram_size, temperature, seed, n, best_of"
    with pytest.raises(UserError) as info:
        resolve_key("tmep", specs)
    assert str(info.value) == (f"알 수 없는 설정 'tmep'입니다. 혹시 'temperature'을(를) 말씀하셨나요? (did you mean "
                               f"'temperature'?) 사용할 수 있는 설정: {names}. (unknown setting 'tmep')")
    with pytest.raises(UserError) as info:
        resolve_key("zzqqxx", specs)
    assert str(info.value) == f"알 수 없는 설정 'zzqqxx'입니다. 사용할 수 있는 설정: {names}. (unknown setting 'zzqqxx')"
    for raw, shown in ((True, "True"), (float("inf"), "inf"), (1.5, "1.5"), ("1" * 40, "1" * 29 + "…"), ("\x00", "�")):
        with pytest.raises(UserError) as info:
            parse_value(specs["top_k"], raw)
        assert str(info.value).startswith(f"top_k 값 '{shown}'이(가) 올바르지 않습니다."), raw
    assert "'" + "1" * 30 + "'" in str(pytest.raises(UserError, parse_value, specs["n"], "1" * 30).value)
    assert (_fmt(0.5), _fmt(2.0), _fmt(3)) == ("0.5", "2", "3")
    stale = Knobs(**{**KNOBS.as_dict(), "n": 5})  # a saved default past today's cap
    with pytest.raises(UserError) as info:
        validate_knobs({}, stale, limits)
    assert str(info.value) == "n 값 '5'이(가) 올바르지 않습니다. n은(는) 1 이상 3 이하의 정수여야 합니다. (n must be an integer ≥ 1 and ≤ 3)"
    assert knob_specs(limits)["best_of"].high == 8 and knob_specs(limits)["n"].high == 3


# ---- sampling rules: edges transformers' comparison cannot reach ---------------------------------------------
def _knobs(**changes: object) -> Knobs:
    return Knobs(**{**KNOBS.as_dict(), "min_length": 0, **changes})


def test_rule_arguments_are_checked_with_their_reason():
    from core.sampling import History, RowTemperature, RowTopK, RowTopP, penalise

    cases = [(lambda: penalise(torch.zeros(2, 3), [History([1])] * 2, [_knobs(), _knobs(repetition_penalty=0.0)], 0),
              r"repetition penalties must be > 0, got \[1.0, 0.0\]"),
             (lambda: History([1], -1), r"n-gram sizes must be >= 0, got \[-1\]"),
             (lambda: RowTemperature([0.0]), r"temperatures must be > 0, got \[0.0\]"),
             (lambda: RowTopK([0]), r"top_k must be >= 1, got \[0\]"),
             (lambda: RowTopP([0.0]), r"top_p must be in \(0, 1\], got \[0.0\]")]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()


def test_token_zero_is_penalised_like_any_other():
    from core.sampling import History, penalise

    scores = torch.tensor([[2.0, 1.0, -1.0]])
    undo = penalise(scores, [History([0, 0])], [_knobs(repetition_penalty=2.0)], 0)
    assert scores.tolist() == [[1.0, 1.0, -1.0]]
    scores[undo[0]] = undo[1]
    assert scores.tolist() == [[2.0, 1.0, -1.0]]


def test_no_repeat_ngram_starts_once_a_row_holds_n_tokens_and_checks_every_row():
    from core.sampling import History, penalise

    out = torch.zeros(2, 6)  # row 0 too short for 5-grams; row 1 bans 4 after 4
    penalise(out, [History([3, 3], 5), History([4, 4, 4], 2)], [_knobs(no_repeat_ngram_size=5),
                                                                _knobs(no_repeat_ngram_size=2)], 0)
    assert torch.isfinite(out[0]).all() and out[1, 4] == float("-inf") and torch.isfinite(out[1, :4]).all()
    two = torch.zeros(1, 5)
    penalise(two, [History([3, 3], 2)], [_knobs(no_repeat_ngram_size=2)], 0)  # exactly n tokens: "3 3" seen once
    assert two[0, 3] == float("-inf")
    assert penalise(torch.zeros(1, 5), [History([3, 3])], [_knobs()], 0) is None  # nothing to do, nothing done


def test_a_tiny_temperature_on_huge_logits_stays_finite():
    from core.sampling import RowTemperature

    out = RowTemperature([1e-9])(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[1e30, 0.0]]))
    assert out.softmax(-1).tolist() == [[1.0, 0.0]]


def test_top_p_removes_a_token_whose_cumulative_probability_is_exactly_the_rest():
    from transformers import TopPLogitsWarper

    from core.sampling import RowTopP

    scores = torch.zeros(1, 4)  # four tokens at exactly 0.25: cumulative 0.25, 0.5, 0.75, 1.0
    out = RowTopP([0.5])(torch.zeros(1, 1, dtype=torch.long), scores)
    assert torch.isinf(out).sum() == 2
    assert torch.equal(out, TopPLogitsWarper(0.5)(torch.zeros(1, 1, dtype=torch.long), scores.clone()))


def test_every_row_at_the_same_non_default_value_is_still_applied():
    from core.sampling import History, build_warpers, penalise

    same = Knobs(**{**KNOBS.as_dict(), "repetition_penalty": 2.0, "temperature": 2.0, "min_length": 1})
    penalised = torch.tensor([[4.0, 2.0, 2.0, 0.0]])
    penalise(penalised, [History([1, 2])], [same], eos_token_id=3)
    assert penalised.tolist() == [[4.0, 1.0, 1.0, 0.0]]
    assert build_warpers([same])(None, penalised).tolist() == [[0.0, -1.5, -1.5, -2.0]]


def test_a_draw_of_zero_never_picks_a_token_of_probability_zero(monkeypatch):
    from core.sampling import sample

    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.zeros(1))
    assert sample(torch.tensor([[float("-inf"), 0.0, 0.0]]), [torch.Generator()]) == [1]
