"""The errors soundpatch raises on purpose.

Each carries one sentence a user can act on. The CLI prints it to stderr without a
traceback; anything else escaping is a bug.
"""

from __future__ import annotations

import re


class SoundpatchError(Exception):
    """A problem the user can fix; the message is one clear sentence."""


class ManifestError(SoundpatchError):
    """The manifest as a whole cannot be read (a bad row is not this: it becomes `invalid`)."""


class ConfigError(SoundpatchError):
    """The config file or a command-line override is not usable."""


class RowError(SoundpatchError):
    """One row cannot be processed; the message goes into that row's `error` column."""


class OutOfRoom(RowError):
    """A write failed for want of disk space: freeing some and running again mends it. The
    message names the disk and ends "free some space and run it again" (a caller may add
    how: the file of several rows adds "with the same --run-id to make it")."""


def as_sentence(text: str, fallback: str = "Unknown error") -> str:
    """One sentence for a row's `error` column: capitalised, one closing full stop. One that
    begins with a path, a URL or a name (`http://host/x.wav is ...`, `take_2.wav ...`) is
    left as it begins: a capital there would name another file."""
    text = text.strip().rstrip(".")
    if not text:
        text = fallback
    if _NAMED_FIRST.match(text):
        return text + "."
    return text[:1].upper() + text[1:] + "."


# A first word that is a path, a URL, a file or a key's name: it has a slash, an underscore
# or a dot inside it.
_NAMED_FIRST = re.compile(r"\S*([/\\_]|\.\S)")


# OpenSSL's names for a handshake that no retry will mend: a certificate not trusted here
# (or not for this host), a server that does not speak TLS (older and newer OpenSSL).
_LASTING_TLS = ("CERTIFICATE_VERIFY_FAILED", "WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG")


def sentence_of(exc: BaseException) -> str:
    """The error as one sentence, named by its type when it says nothing."""
    return as_sentence(str(exc), fallback=type(exc).__name__)


def lasting_tls_failure(exc: BaseException) -> bool:
    """A connection failed in a TLS handshake that trying again in a few seconds will not
    mend. A handshake cut short (an overloaded server dropping it) is not one of them."""
    return any(name in str(exc) for name in _LASTING_TLS)


def network_reason(exc: BaseException, bundle: str = "SSL_CERT_FILE", whose: str = "its") -> str:
    """Why a connection to a server failed, in words a user can act on (no parentheses, for
    a caller to put it in some): the exception's class name alone ("ConnectError") hides
    whether nothing listened there, the name did not resolve, or the server's certificate
    is not trusted here (`bundle`: the variable naming the CA bundle that client trusts;
    `whose`: the server's, as the sentence names it)."""
    text = str(exc).strip()
    if "CERTIFICATE_VERIFY_FAILED" in text:
        detail = text.split("certificate verify failed:", 1)[-1].split("(_ssl")[0].strip(" :")
        return (
            f"{whose} TLS certificate is not trusted here: {detail or 'verify failed'}; behind a proxy that "
            f"inspects TLS, set {bundle} to its CA bundle"
        )
    if "[SSL" in text:
        return f"the TLS handshake failed: {text.split('(_ssl')[0].strip()}, as when a server speaks plain http"
    if "Connection refused" in text:
        return "the connection was refused: nothing listens at that address and port"
    if "Name or service not known" in text or "name resolution" in text or "nodename nor servname" in text:
        return "its host name does not resolve"
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__
