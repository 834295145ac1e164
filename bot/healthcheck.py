"""`python -m bot.healthcheck`: exit 0 when the running bot's /healthz answers ok, else 1 (the container HEALTHCHECK).

Standard library only and no settings loading, so it costs a few milliseconds every interval and needs no curl.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request


def healthy(url: str, timeout: float = 4.0) -> bool:
    """Alive: `ok`, or `saturated` (a full queue is load, not a fault: restarting would only drop the queue)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200 and json.loads(resp.read()).get("status") == "ok"
    except urllib.error.HTTPError as err:
        try:
            return err.code == 503 and json.loads(err.read()).get("status") == "saturated"
        except (OSError, ValueError):
            return False
    except (OSError, ValueError):  # refused, timed out, not JSON
        return False


def default_url() -> str:
    # Inside the container the web front end listens on BOT_WEB__PORT (8000 unless changed).
    return f"http://127.0.0.1:{os.environ.get('BOT_WEB__PORT', '8000')}/healthz"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    return 0 if healthy(args[0] if args else default_url()) else 1


if __name__ == "__main__":
    sys.exit(main())
