"""Secrets never reach MLflow or the logs: passwords and keys inside URIs, and the values of
secret environment variables, are replaced by `***` wherever config or environment text is
written (params, tags, config.yaml, error text, stage results, logged files, echoed lines).

Credentials belong in the environment (AWS_*, MLFLOW_TRACKING_PASSWORD, HF_TOKEN, ...), where
pyarrow, MLflow and the hubs read them; a URI that carries them still works for the run, and
what is recorded of it is redacted."""

from __future__ import annotations

import os
import re

MASK = "***"
# scheme://user:password@host -> scheme://user:***@host (the user name stays: it says who)
USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@?#]*):(?P<secret>[^@\s/?#]+)@")
# ?secret=..., &access_key=..., X-Amz-Signature=... (presigned URLs), token=..., sig=...
SECRET_WORDS = r"secret|token|password|passwd|pwd|key|signature|sig|credential|auth|session"
QUERY = re.compile(rf"(?P<head>[?&;](?:[\w.-]*(?:{SECRET_WORDS})[\w.-]*)=)(?P<secret>[^&#\s\"']+)", re.IGNORECASE)
# An environment variable holds a secret when a word of its name (split on "_") says so:
# AWS_SECRET_ACCESS_KEY, HF_TOKEN, MLFLOW_TRACKING_PASSWORD, DB_PASSWD, OPENAI_API_KEY. Whole
# words, because a substring matched PWD (the working directory) and masked every path.
SECRET_ENV_WORDS = {
    "SECRET", "TOKEN", "PASSWORD", "PASSWD", "PASSPHRASE", "KEY", "APIKEY", "SIGNATURE", "CREDENTIAL",
    "CREDENTIALS", "PRIVATE", "CERT", "SAS", "AUTHKEY",
}  # fmt: skip
# Names with such a word that hold no secret.
NOT_SECRET_ENV = {"AWS_ACCESS_KEY_ID", "SSH_AUTH_SOCK", "RAY_AUTH_MODE"}
MIN_SECRET_LEN = 6


def secret_env_name(name: str) -> bool:
    return name not in NOT_SECRET_ENV and bool(SECRET_ENV_WORDS & set(name.upper().split("_")))


def secret_env_values(environ=None) -> list[str]:
    """Values of environment variables whose names say they hold a secret, longest first."""
    environ = os.environ if environ is None else environ
    values = {value for name, value in environ.items() if secret_env_name(name) and len(value) >= MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact(text: str, environ=None) -> str:
    """`text` with URI passwords, secret query values and secret env values masked."""
    if not text:
        return text
    text = USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
    text = QUERY.sub(lambda m: f"{m['head']}{MASK}", text)
    for value in secret_env_values(environ):
        text = text.replace(value, MASK)
    return text


def redact_tree(value):
    """A JSON-like value (dicts, lists, strings) with every string (keys too) redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_tree(k): redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_tree(v) for v in value]
    return value


def redact_bytes(data: bytes) -> bytes:
    """A file's bytes redacted when it is text; binary files (images, weights) pass as they are."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return data
    return redact(text).encode("utf-8")
