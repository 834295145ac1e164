"""The Telegram front end's translation: PTB updates → core.conversation, and its replies → Bot API calls.

The application around these handlers (building, polling or webhook, stopping) is in bot/telegram_app.py."""

from __future__ import annotations

import contextlib
import html
import logging
import re
from dataclasses import dataclass, field

from telegram import (
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InlineQueryResultsButton,
    LinkPreviewOptions,
    ReplyParameters,
    Update,
)
from telegram.constants import ChatAction, ChatType, MessageLimit, ParseMode
from telegram.error import BadRequest
from telegram.ext import (
    Application,
    ApplicationHandlerStop,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    TypeHandler,
    filters,
)

from bot.telegram_delivery import PerChatRateLimiter
from bot.telegram_texts import (
    ADMIN_HELP,
    COMMANDS,
    EDITED_TEXT,
    GENERATING,
    HELP_EXTRA,
    HINT_TEXT,
    START_TEXT,
    STOP_LABEL,
    STOPPING,
)
from core.conversation import Buttons, Conversation, Reply, Style, Who, error_text
from core.errors import NotAllowed, UserError
from core.followups import EXPIRED, button_data, stop_data
from core.grammar import split_command
from core.replies import help_text, parse_result, render_knobs, shorten
from core.types import Generation, PreparedRequest

log = logging.getLogger(__name__)

CONVERSATION_KEY = "conversation"  # where the Conversation lives in application.bot_data
NO_PREVIEW = LinkPreviewOptions(is_disabled=True)
MESSAGE_LIMIT = MessageLimit.MAX_TEXT_LENGTH  # 4096 characters after entity parsing
CALLBACK_ANSWER_LIMIT = 200  # answerCallbackQuery text limit
EDIT_INTERVAL_S = 1.0  # Telegram tolerates about one edit per second per message
INLINE_BUTTON_LIMIT = 64  # an inline answer's button is one short line


# ---- translation -----------------------------------------------------------------------------------------------
def _conversation(context: ContextTypes.DEFAULT_TYPE) -> Conversation:
    return context.bot_data[CONVERSATION_KEY]


def _who(update: Update) -> Who:
    chat, user = update.effective_chat, update.effective_user
    return Who(chat=f"telegram:{chat.id if chat else '-'}",
               user=f"telegram:{user.id}" if user else f"telegram:chat{chat.id if chat else '-'}",
               ids={"chat": chat.id if chat else None, "user": user.id if user else None})


def _plain(text: str) -> str:
    """Plain text for HTML parse mode: clipped first, so the visible length stays within Telegram's limit."""
    return html.escape(shorten(text, MESSAGE_LIMIT), quote=False)


STYLE = Style(MESSAGE_LIMIT, escape=lambda s: html.escape(s, quote=False), emphasize=lambda s: f"<b>{s}</b>",
              notice=_plain)


def render(gen: Generation, stopped: bool = False) -> str:
    """The result as Telegram HTML: prompt in bold, continuation plain, every user character escaped."""
    text = Conversation.render(gen, STYLE, stopped)
    if len(text) < MESSAGE_LIMIT:
        return text
    # Escaping lengthened the text past the limit, and clipping it could cut a tag or entity: escape afterwards.
    return _plain(Conversation.render(gen, Style(MESSAGE_LIMIT), stopped))


def keyboard(buttons: Buttons) -> InlineKeyboardMarkup:
    """Callback data holds only a short server-side key (Telegram allows 64 bytes)."""
    rows = [[InlineKeyboardButton("🔄 다시 생성", callback_data=button_data(buttons.key))]]
    many = buttons.candidates > 1
    rows.append([InlineKeyboardButton(f"➡️ {i + 1} 이어 쓰기" if many else "➡️ 이어 쓰기", callback_data=button_data(buttons.key, i))
                 for i in range(buttons.candidates)])
    return InlineKeyboardMarkup(rows)


def markup(reply: Reply) -> InlineKeyboardMarkup | None:
    """The final result's follow-up buttons, or the stop button while it streams."""
    if reply.buttons is not None:
        return keyboard(reply.buttons)
    if reply.stop is not None:
        return InlineKeyboardMarkup([[InlineKeyboardButton(STOP_LABEL, callback_data=stop_data(reply.stop))]])
    return None


def _addressed_to_us(text: str, username: str | None) -> bool:
    """`/cmd@us` always; `/cmd` with no target is ambiguous in groups (another bot's, a human's)."""
    _, target, _ = split_command(text)
    return target is not None and username is not None and target.lower() == username.lower()


async def send(context: ContextTypes.DEFAULT_TYPE, chat_id: int, text: str, reply_to: int | None, markup=None):  # noqa: ANN001, ANN201
    """Send HTML `text` as a reply (still sent if the replied-to message was deleted)."""
    reply = ReplyParameters(reply_to, allow_sending_without_reply=True) if reply_to else None
    return await context.bot.send_message(chat_id, text, parse_mode=ParseMode.HTML, reply_parameters=reply,
                                          reply_markup=markup, link_preview_options=NO_PREVIEW)


async def inline_hint(update: Update, text: str) -> None:
    """An inline query's answer without results: one line at the top of the list (it opens a private chat with
    the bot, whose /start explains)."""
    button = InlineQueryResultsButton(shorten(text, INLINE_BUTTON_LIMIT), start_parameter="help")
    await update.inline_query.answer([], cache_time=0, is_personal=True, button=button)


async def _answer(update: Update, context: ContextTypes.DEFAULT_TYPE, text: str) -> None:
    message = update.effective_message
    await send(context, message.chat_id, _plain(text), message.message_id)


@dataclass
class ChatTarget:
    """One reply message in a chat (core.conversation.ReplyTarget): sent once, edited afterwards."""

    context: ContextTypes.DEFAULT_TYPE
    chat_id: int
    reply_to: int | None
    style: Style = STYLE
    edit_interval: float = field(default_factory=lambda: EDIT_INTERVAL_S)
    message_id: int | None = None

    async def send(self, reply: Reply) -> None:
        text = reply.text if reply.error else render(reply.generation, reply.stopped)
        self.message_id = (await send(self.context, self.chat_id, text, self.reply_to, markup(reply))).message_id

    async def edit(self, reply: Reply) -> None:
        text = reply.text if reply.error else render(reply.generation, reply.stopped)
        try:
            await self.context.bot.edit_message_text(
                text, chat_id=self.chat_id, message_id=self.message_id, parse_mode=ParseMode.HTML,
                reply_markup=markup(reply), link_preview_options=NO_PREVIEW)
        except BadRequest as exc:
            if "not modified" not in str(exc).lower():
                raise

    async def typing(self) -> None:
        await self.context.bot.send_chat_action(self.chat_id, ChatAction.TYPING)

    def spare(self) -> bool:
        limiter = self.context.bot.rate_limiter
        return not isinstance(limiter, PerChatRateLimiter) or limiter.spare(self.chat_id)


async def _reply(update: Update, context: ContextTypes.DEFAULT_TYPE, target: ChatTarget, prepared: PreparedRequest,
                 what: str) -> None:
    limiter = context.bot.rate_limiter
    with limiter.final_owed(target.chat_id) if isinstance(limiter, PerChatRateLimiter) else contextlib.nullcontext():
        await _conversation(context).reply(target, prepared, f"telegram {what} in chat {target.chat_id}",
                                           asker=_who(update).user)


# ---- handlers --------------------------------------------------------------------------------------------------
async def start_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    await _answer(update, context, START_TEXT)


async def help_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    conversation = _conversation(context)
    core = conversation.core
    extra = HELP_EXTRA + (ADMIN_HELP if conversation.admins else "")
    chat = _who(update).chat
    steered, model = core.help_model(chat)
    await _answer(update, context, help_text(core.chat_knobs(chat), core.settings.limits, "/gen", steered=steered,
                                             model=model, notice=core.help_notice(chat)) + extra)


def _replied_to_us(message, bot_id: int) -> str | None:  # noqa: ANN001 (telegram.Message)
    """The text of the bot's own message that `message` replies to (None: not a reply to us)."""
    replied = message.reply_to_message
    if replied is None or replied.from_user is None or replied.from_user.id != bot_id:
        return None
    return replied.text or ""


async def gen_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """`/gen …`; as a reply to one of the bot's results it continues that result."""
    message = update.effective_message
    _, _, args = split_command(message.text or "")
    shown = _replied_to_us(message, context.bot.id)
    conversation = _conversation(context)
    if shown is not None and parse_result(shown) is not None:
        prepared = conversation.from_reply(shown, args, _who(update))  # a refusal goes to on_error
    else:
        prepared = conversation.from_text(args, _who(update))
    await _reply(update, context, ChatTarget(context, message.chat_id, message.message_id), prepared, "/gen")


async def set_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    _, _, args = split_command(update.effective_message.text or "")
    knobs = _conversation(context).core.set_chat_knobs(args, _who(update).chat)
    await _answer(update, context, "이 채팅의 설정을 저장했습니다 (saved):\n" + render_knobs(knobs))


async def reset_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    knobs = _conversation(context).core.reset_chat_knobs(_who(update).chat)
    await _answer(update, context, "기본 설정으로 되돌렸습니다 (reset):\n" + render_knobs(knobs))


async def settings_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    knobs = _conversation(context).core.chat_knobs(_who(update).chat)
    await _answer(update, context, "이 채팅의 설정 (settings):\n" + render_knobs(knobs) + "\n\n바꾸기: /set top_p=0.9 · 되돌리기: /reset")


async def allow_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Admins: `/allow` (this chat), `/allow chat <id>`, `/allow user <id>`; `/deny` the same; `/allowed` lists."""
    command, _, args = split_command(update.effective_message.text or "")
    allowed = {"allow": True, "deny": False}.get(command)
    await _answer(update, context, _conversation(context).manage_access(_who(update), args, allowed))


async def model_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    _, _, args = split_command(update.effective_message.text or "")
    await _answer(update, context, _conversation(context).choose_model(_who(update), args))


async def stats_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    await _answer(update, context, _conversation(context).stats(_who(update)))


async def unknown_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    message = update.effective_message
    if message.chat.type != ChatType.PRIVATE and not _addressed_to_us(message.text or "", context.bot.username):
        return  # in groups, `/x` or `/x@OtherBot` belongs to someone else
    command, _, _ = split_command(message.text or "")
    await _answer(update, context, f"알 수 없는 명령입니다: /{command} — /help 를 보세요. (unknown command)")


async def edited_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """An edit must not start a second generation, but the user learns why nothing happened."""
    message = update.effective_message
    command, target, _ = split_command(message.text or "")
    if message.chat.type != ChatType.PRIVATE and not (
        _addressed_to_us(message.text or "", context.bot.username) or (target is None and command in dict(COMMANDS))
    ):
        return
    await _answer(update, context, EDITED_TEXT)


async def plain_text(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Text without a command: a reply to one of the bot's results continues it (in groups only when it mentions
    the bot); anything else in private gets the hint, and in groups is someone else's conversation."""
    message = update.effective_message
    text = message.text or ""
    shown = _replied_to_us(message, context.bot.id)
    if message.chat.type != ChatType.PRIVATE:
        mention = re.compile(rf"@{re.escape(context.bot.username or '')}\b", re.IGNORECASE)
        if shown is None or not context.bot.username or not mention.search(text):
            return
        text = mention.sub(" ", text)
    elif shown is None:
        await _answer(update, context, HINT_TEXT)
        return
    prepared = _conversation(context).from_reply(shown, text, _who(update))  # a refusal goes to on_error
    await _reply(update, context, ChatTarget(context, message.chat_id, message.message_id), prepared, "reply")


async def button_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    query = update.callback_query
    if query.message is None:  # an inline-mode message; this bot has no inline mode
        raise UserError(EXPIRED)
    prepared = _conversation(context).from_button(query.data or "", _who(update))  # a refusal goes to on_error
    if prepared is None:  # the stop button: the reply's own loop shows the text so far, marked stopped
        await query.answer(STOPPING)
        return
    await query.answer(GENERATING)
    what = "continue" if prepared.continuing else "regenerate"
    await _reply(update, context, ChatTarget(context, query.message.chat.id, query.message.message_id), prepared, what)


def _for_us(message, username: str | None) -> bool:  # noqa: ANN001 (telegram.Message)
    """A message the bot would answer: anything in private, a command for us or for no one in particular in groups."""
    if message.chat.type == ChatType.PRIVATE:
        return True
    text = message.text or ""
    if not text.startswith("/"):
        return False
    _, target, _ = split_command(text)
    return target is None or _addressed_to_us(text, username)


async def access_gate(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Runs first (group -1): updates from outside the allowlists get the refusal (or nothing) and go no further."""
    if not isinstance(update, Update):
        return
    try:
        _conversation(context).check_access(_who(update))
    except NotAllowed as exc:
        if (update.callback_query is not None or update.inline_query is not None
                or (update.message is not None and _for_us(update.message, context.bot.username))):
            await on_error(update, context, exc)
        log.info("telegram: refused an update from %s (allowlist)", _who(update).chat)
        raise ApplicationHandlerStop from None


async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE, error: BaseException | None = None) -> None:
    """The one error → reply mapping: a UserError's sentence, silence when the user was already told, or an apology
    with a request id that is also in the log line. A button press is always answered."""
    error = error or context.error
    where = f"telegram update in chat {update.effective_chat.id if isinstance(update, Update) and update.effective_chat else '-'}"
    text = error_text(error, where)
    if not isinstance(update, Update):
        return
    try:
        if update.inline_query is not None:
            if text is not None:
                await inline_hint(update, text)
        elif update.callback_query is not None:
            await update.callback_query.answer(shorten(text or "", CALLBACK_ANSWER_LIMIT) or None, show_alert=bool(text))
        elif text is not None and update.effective_message is not None:
            await _answer(update, context, text)
    except Exception as exc:  # noqa: BLE001 (reporting must not raise over the error being reported)
        log.warning("could not send an error reply: %s", exc)


def add_handlers(application: Application) -> None:
    application.add_handler(TypeHandler(Update, access_gate), group=-1)
    new = filters.UpdateType.MESSAGE  # PTB's default also fires on edits: an edit must not generate again
    for name, handler in (
        ("start", start_command),
        ("help", help_command),
        ("gen", gen_command),
        ("set", set_command),
        ("reset", reset_command),
        ("settings", settings_command),
        ("model", model_command),
        ("allow", allow_command),
        ("deny", allow_command),
        ("allowed", allow_command),
        ("stats", stats_command),
    ):
        application.add_handler(CommandHandler(name, handler, filters=new))
    application.add_handler(MessageHandler(new & filters.COMMAND, unknown_command))
    application.add_handler(MessageHandler(filters.UpdateType.EDITED_MESSAGE & filters.COMMAND, edited_command))
    prose = new & ~filters.COMMAND
    application.add_handler(MessageHandler(prose & (filters.ChatType.PRIVATE | (filters.TEXT & filters.REPLY)), plain_text))
    application.add_handler(CallbackQueryHandler(button_pressed))
    application.add_error_handler(on_error)
