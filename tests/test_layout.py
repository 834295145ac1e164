"""The rooms stay apart: the grammar, the reply layout, the conversation, the shared state and every module in bot/
import no torch (the backend is chosen at start-up, and only the local one loads it), and core has no import cycle
(imports inside functions and under TYPE_CHECKING count too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_grammar_replies_and_conversation_import_no_torch():
    code = ("import sys, core.grammar, core.replies, core.conversation, core.types; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_no_adapter_or_the_shared_state_imports_torch():
    code = ("import sys, importlib, pkgutil, bot, core.service, core.backend, core.backends\n"
            "for m in pkgutil.iter_modules(bot.__path__): importlib.import_module('bot.' + m.name)\n"
            "assert {'bot.web', 'bot.discord_cog', 'bot.telegram_bot', 'bot.openai_api'} <= set(sys.modules)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _core_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("core."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("core."))
    return found


def test_core_has_no_import_cycle():
    graph = {f"core.{p.stem}": _core_imports(p) for p in (ROOT / "core").glob("*.py")}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target in path:
                cycles.append(path[path.index(target):] + [target])
            elif len(path) < 20:
                visit(target, [*path, target])

    for module in graph:
        visit(module, [module])
    assert not cycles, cycles[:3]
