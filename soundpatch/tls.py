"""Which certificate authorities soundpatch's https connections trust.

By default, those of certifi's bundle (httpx's own default). Behind a proxy that inspects
TLS, as many company networks have, the proxy's CA must be trusted instead: the bundle
named by `SSL_CERT_FILE` (a PEM file), or the folder named by `SSL_CERT_DIR`, as for most
tools. The providers' client and the client fetching `https://` inputs both take it from
here, and a bundle that cannot be read stops a run before it starts, in one sentence.
S3 (boto3) takes its own, `AWS_CA_BUNDLE`, checked here the same way.
"""

from __future__ import annotations

import functools
import os
import ssl

from soundpatch.errors import ConfigError


def verify() -> ssl.SSLContext | bool:
    """What an httpx client is given as `verify`: the CA bundle of this environment."""
    return _context(os.environ.get("SSL_CERT_FILE") or None, os.environ.get("SSL_CERT_DIR") or None)


def check_s3_bundle() -> None:
    """S3 goes through boto3, which takes its CA bundle from `AWS_CA_BUNDLE` (its own
    variable) itself; one that cannot be read stops the run here, in one sentence, rather
    than at a request, in boto3's words."""
    bundle = os.environ.get("AWS_CA_BUNDLE") or None
    if bundle:
        _bundle_context(bundle, "AWS_CA_BUNDLE")


_FIX = "point it at your network's CA bundle or unset it"


@functools.lru_cache(maxsize=4)
def _context(bundle: str | None, folder: str | None) -> ssl.SSLContext | bool:
    if bundle:
        return _bundle_context(bundle, "SSL_CERT_FILE")
    if folder:
        if not os.path.isdir(folder):
            raise ConfigError(f"SSL_CERT_DIR names {folder}, which is not a folder: {_FIX}.")
        return ssl.create_default_context(capath=folder)
    return True


@functools.lru_cache(maxsize=4)
def _bundle_context(bundle: str, variable: str) -> ssl.SSLContext:
    if not os.path.isfile(bundle):
        raise ConfigError(f"{variable} names {bundle}, which is not a file: {_FIX}.")
    try:
        return ssl.create_default_context(cafile=bundle)
    except (ssl.SSLError, OSError, ValueError) as exc:
        why = (str(exc.args[-1] if exc.args else exc) or type(exc).__name__).split(" (_ssl")[0]
        raise ConfigError(
            f"{variable} names {bundle}, which holds no certificate in PEM form ({why}): {_FIX}."
        ) from None
