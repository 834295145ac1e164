"""What the Telegram bot says besides results and errors: its command menu and its fixed texts."""

COMMANDS = (
    ("gen", "문장 생성 — 예: /gen 긍정 아 정말 top_p=0.9"),
    ("help", "사용법, 모든 설정의 범위와 기본값"),
    ("set", "이 채팅의 기본 설정 바꾸기 — 예: /set top_p=0.9"),
    ("settings", "이 채팅의 현재 설정 보기"),
    ("reset", "이 채팅의 설정을 기본값으로 되돌리기"),
    ("model", "모델 목록, 이 채팅의 모델 바꾸기 — 예: /model nsmc-small"),
    ("start", "봇 소개"),
    ("allow", "(관리자) 허용: 이 채팅, 또는 chat <id> / user <id>"),
    ("deny", "(관리자) 차단: 이 채팅, 또는 chat <id> / user <id>"),
    ("allowed", "(관리자) 허용·차단 목록 보기"),
    ("stats", "(관리자) 최근 7일 사용 통계"),
)

START_TEXT = (
    "안녕하세요! 한국어 문장을 원하는 감성(긍정/부정)으로 이어 쓰는 봇입니다.\n"
    "예: /gen 긍정 아 정말 top_p=0.9\n"
    "모든 설정과 예시는 /help 에 있습니다.\n\n"
    "(I continue Korean text in the sentiment you ask for. Try /gen 긍정 아 정말)"
)
ADMIN_HELP = (
    "\n\n관리자(admin_user_ids) 명령: /allow · /deny — 인자 없이 이 채팅, 또는 chat <id> / user <id>; /allowed 목록; "
    "/stats 최근 7일 통계 (admins: allowlists at run time, stats)"
)
HELP_EXTRA = (
    "\n\n이 채팅의 기본값 바꾸기: /set top_p=0.9 temperature=0.8\n"
    "현재 설정 보기: /settings · 기본값으로 되돌리기: /reset\n"
    "결과 아래 버튼: 🔄 다시 생성(새 시드) · ➡️ 이어 쓰기 · 쓰는 중에는 ⏹ 멈추기(요청한 사람만)\n"
    "결과에 답장하면 그 글을 이어 씁니다: 답장에 덧붙일 말과 key=value를 적으세요 (그룹에서는 /gen 으로 답장하거나 "
    "@봇이름을 넣어 주세요). 봇이 다시 시작한 뒤에도 됩니다. (reply to a result to continue it)\n"
    "다른 채팅에서도: @봇이름 긍정 아 정말 top_p=0.9 라고 입력하면 후보 3개 중 골라 보낼 수 있습니다 (inline mode)"
)
HINT_TEXT = (
    "명령으로 보내 주세요. 예: /gen 긍정 아 정말 — 도움말은 /help "
    "(send a command, e.g. /gen 긍정 아 정말)"
)
EDITED_TEXT = (
    "수정한 메시지로는 다시 실행하지 않습니다. 명령을 새 메시지로 보내 주세요. "
    "(edited commands are not re-run; send the command again)"
)
GENERATING = "생성 중… (generating)"
STOP_LABEL = "⏹ 멈추기"
STOPPING = "멈추는 중… 지금까지의 글을 남깁니다. (stopping)"
