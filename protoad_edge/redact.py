"""Secrets out of what a run shows: the password in a source's URL and secret-looking parameters are masked
before a source's name reaches a record, a log or error line, the summary or a file.

OpenCV's FFmpeg backend takes a camera's credentials only inside its URL (``rtsp://admin:pass@10.0.0.5/live``),
so the SOURCE a user types is a secret: ``parse_source`` keeps it whole for the capture alone and names the
source everywhere else with ``redact``'s text.
"""

from __future__ import annotations

import re

MASK = "***"
# scheme://[userinfo@]host...: the authority ends at the first '/', '?', '#' (or whitespace, inside a GStreamer
# pipeline); the user information at its last '@', as FFmpeg splits it (an unencoded '@' in a password).
_AUTHORITY = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s]*)@")
# name=value after '?', '&' or ';' (a URL's query) or whitespace (a GStreamer property such as rtspsrc's
# user-pw=...); a quoted value may hold spaces.
_PARAMETER = re.compile(r"(?P<lead>[?&;\s])(?P<name>[^=&;#?\s]+)=(?P<value>\"[^\"]*\"|'[^']*'|[^&;#\s]*)")
# A parameter is secret when its name holds one of these (any case): password, passwd, passphrase, pwd, token,
# access_token, key, api_key, secret, client_secret, auth, authorization, signature, credential; or is
# GStreamer's user-pw / proxy-pw.
_SECRET_NAME = re.compile(r"pass|pwd|token|key|secret|auth|signature|credential|(?:^|[-_])pw$", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with every URL's password masked (``rtsp://user:***@host/...``; a user information without a
    password, which may itself be a token, as ``***@host``) and every secret parameter's value masked
    (``?token=***``). Text without either, a file path or a camera index, comes back unchanged."""
    return _PARAMETER.sub(_mask_parameter, _AUTHORITY.sub(_mask_userinfo, text))


def _mask_userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match["userinfo"].partition(":")
    return f"{match['scheme']}{user}:{MASK}@" if colon else f"{match['scheme']}{MASK}@"


def _mask_parameter(match: re.Match[str]) -> str:
    if not _SECRET_NAME.search(match["name"]):
        return match[0]
    return f"{match['lead']}{match['name']}={MASK}"
