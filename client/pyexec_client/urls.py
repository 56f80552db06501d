"""Server URLs as they may be shown: without the user name, password or token they carry."""

from __future__ import annotations


def without_credentials(urls: str) -> str:
    """``urls`` (comma-separated) with any user name, password or token taken out, to show.
    A URL without a scheme (``user:pass@host:4222``, which nats-py takes) is read like one with
    it, and nothing in the URL is parsed (a malformed port or address is shown as given)."""
    shown = []
    for given in urls.split(","):
        url = given.strip()
        userinfo = _userinfo(url)
        if userinfo:
            url = url.replace(f"{userinfo}@", "***@", 1)
        shown.append(url)
    return ",".join(shown)


def redact(exc: BaseException, servers: str | list[str]) -> str:
    """An error's text with the servers' credentials taken out."""
    text = repr(exc)
    for url in [servers] if isinstance(servers, str) else servers:
        for part in url.split(","):
            userinfo = _userinfo(part.strip())
            if userinfo:
                text = text.replace(userinfo, "***")
    return text


def _userinfo(url: str) -> str:
    """The ``user:password`` or token of a server URL, with or without its scheme; "" if none.
    All before the last ``@``: a password may hold ``@`` or ``/`` unescaped."""
    rest = url.partition("://")[2] if "://" in url else url
    return rest.rpartition("@")[0]
