"""The syntax of a model reference in a config (`train.init_from`, `prepare.vocabulary_from`),
checked when the config loads; what it names is found when a run is planned
(`pipelines.inference.pin`), which needs MLflow and storage, so not here."""

from __future__ import annotations

import re

FORMS = (
    "a model folder, a storage URI (file://, s3://, ...), runs:/<run id>/<path>, "
    "models:/<name>/<version> or models:/<name>@<alias>"
)
REGISTERED = re.compile(r"^models:/(m-[0-9a-f]+(/.*)?|[^/@]+/[0-9]+|[^/@]+@[^/@]+)$")
RUN = re.compile(r"^runs:/[0-9a-zA-Z]+/.+$")


def model_reference(ref: str | None) -> str | None:
    """`ref` without surrounding blanks, or ValueError (one line) when it cannot name a model."""
    if ref is None:
        return None
    ref = ref.strip()
    if not ref:
        raise ValueError(f"empty: null, or {FORMS}")
    if ref.startswith("models:/") and not REGISTERED.match(ref):
        raise ValueError(f"{ref}: expected models:/<name>/<version> or models:/<name>@<alias>")
    if ref.startswith("runs:/") and not RUN.match(ref):
        raise ValueError(f"{ref}: expected runs:/<run id>/<path>")
    return ref
