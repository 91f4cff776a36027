"""Which certificate authorities soundpatch's https connections trust.

By default, those of certifi's bundle (httpx's own default). Behind a proxy that inspects
TLS, as many company networks have, the proxy's CA must be trusted instead: the bundle
named by `SSL_CERT_FILE` (a PEM file), or the folder named by `SSL_CERT_DIR`, as for most
tools. The providers' client and the client fetching `https://` inputs both take it from
here, and a bundle that cannot be read stops a run before it starts, in one sentence.
"""

from __future__ import annotations

import functools
import os
import ssl

from soundpatch.errors import ConfigError


def verify() -> ssl.SSLContext | bool:
    """What an httpx client is given as `verify`: the CA bundle of this environment."""
    return _context(os.environ.get("SSL_CERT_FILE") or None, os.environ.get("SSL_CERT_DIR") or None)


@functools.lru_cache(maxsize=4)
def _context(bundle: str | None, folder: str | None) -> ssl.SSLContext | bool:
    fix = "point it at your network's CA bundle or unset it"
    if bundle:
        if not os.path.isfile(bundle):
            raise ConfigError(f"SSL_CERT_FILE names {bundle}, which is not a file: {fix}.")
        try:
            return ssl.create_default_context(cafile=bundle)
        except (ssl.SSLError, OSError, ValueError) as exc:
            why = (str(exc.args[-1] if exc.args else exc) or type(exc).__name__).split(" (_ssl")[0]
            raise ConfigError(
                f"SSL_CERT_FILE names {bundle}, which holds no certificate in PEM form ({why}): {fix}."
            ) from None
    if folder:
        if not os.path.isdir(folder):
            raise ConfigError(f"SSL_CERT_DIR names {folder}, which is not a folder: {fix}.")
        return ssl.create_default_context(capath=folder)
    return True
