"""What admins do at run time, without platform code: the allowlist commands' arguments and answers, the daily
quota's day and reset time, and /stats from the store's request log."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from core.errors import UserError

NOT_ADMIN = "관리자만 쓸 수 있는 명령입니다. (admins only)"
STATS_DAYS = 7


def today(now: datetime | None = None) -> str:
    """The quota's day: the UTC date."""
    return (now or datetime.now(UTC)).strftime("%Y-%m-%d")


def quota_text(limit: int, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    hours, rest = divmod(int((midnight - now).total_seconds()), 3600)
    wait = f"{hours}시간 {rest // 60}분" if hours else f"{max(1, rest // 60)}분"
    return (f"오늘 쓸 수 있는 생성 {limit}회를 모두 썼습니다. {wait} 뒤(UTC 자정, 한국 시각 오전 9시)에 다시 쓸 수 "
            f"있습니다. (daily quota of {limit} used up; it resets at 00:00 UTC, in {hours} h {rest // 60} min)")


def parse_target(args: str, kinds: tuple[str, ...], here: Mapping[str, int | None]) -> tuple[str, int]:
    """`/allow` → here (the first id `here` has, in its order: the chat, the channel); `/allow user 123` →
    ("user", 123)."""
    words = args.split()
    if not words:
        for kind, id_ in here.items():
            if kind in kinds and id_ is not None:
                return kind, int(id_)
    elif len(words) == 2 and words[0].lower() in kinds:
        try:
            return words[0].lower(), int(words[1])
        except ValueError:
            pass
    usage = " | ".join(f"{kind} <id>" for kind in kinds)
    raise UserError(f"사용법: 인자 없이(지금 이 {kinds[0]}) 또는 {usage}. 예: {kinds[-1]} 123456789 "
                    f"(usage: no argument for this {kinds[0]}, or {usage})")


def render_access(entries: Mapping[tuple[str, int], bool], kinds: tuple[str, ...]) -> str:
    allowed = sorted(pair for pair, ok in entries.items() if ok)
    denied = sorted(pair for pair, ok in entries.items() if not ok)
    lines = ["허용 목록 (allowed):"]
    lines += [f"• {kind} {id_}" for kind, id_ in allowed] or ["• (없음 — 모두 쓸 수 있습니다 / empty: everyone)"]
    lines.append("차단 목록 (denied):")
    lines += [f"• {kind} {id_}" for kind, id_ in denied] or ["• (없음 / none)"]
    return "\n".join(lines)


def render_stats(rows: list[tuple[str, str, str | None, str, float | None]]) -> str:
    """Requests per day, refusals by reason, median latency and the busiest users, from the request log's rows
    (day, platform, user, outcome, seconds) of the last STATS_DAYS days."""
    admitted = [row for row in rows if row[3] == "admitted"]
    per_day = Counter(row[0] for row in admitted)
    refusals = Counter(row[3] for row in rows if row[3] not in ("admitted", "ok"))
    latencies = [row[4] for row in rows if row[3] == "ok" and row[4] is not None]
    busiest = Counter(row[2] for row in admitted if row[2]).most_common(5)
    lines = [f"최근 {STATS_DAYS}일 통계, UTC (stats, last {STATS_DAYS} days):", "날짜별 생성 요청 (requests per day):"]
    lines += [f"• {day}: {count}" for day, count in sorted(per_day.items())] or ["• 없음 (none)"]
    lines.append("거절 사유별 (refusals by reason): " + (", ".join(f"{k} {v}" for k, v in refusals.most_common())
                                                    or "없음 (none)"))
    median = f"{statistics.median(latencies):.2f}초 ({len(latencies)}건)" if latencies else "기록 없음 (none yet)"
    lines.append(f"응답 시간 중앙값 (median latency): {median}")
    lines.append("가장 많이 쓴 사용자 (busiest users): " + (", ".join(f"{u} {n}" for u, n in busiest) or "없음 (none)"))
    return "\n".join(lines)


def since(days: int = STATS_DAYS, now: datetime | None = None) -> str:
    return today((now or datetime.now(UTC)) - timedelta(days=days - 1))
