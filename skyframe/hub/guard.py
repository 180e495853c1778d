"""The hub's own part of its HTTP defences; the rest is the daemon API's
(:mod:`skyframe.httpguard`: constant-time secrets, Host, same-origin JSON POSTs, bounded
bodies; :class:`skyframe.api.TokenThrottle`: guesses slowed per address).
"""

from __future__ import annotations

import hmac

SESSION_COOKIE = "skyframe_hub_session"


def session_value(token: str) -> str:
    """The page's cookie: derived from the operators' token, never the token itself."""
    return hmac.new(token.encode(), b"skyframe hub session", "sha256").hexdigest()
