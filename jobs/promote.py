"""Moving the champion alias in the MLflow registry, by the gate or by hand, with a record.

Every move is tagged on the version it lands on (`crossmodal.promoted`: when, who, why) and
appended to the registered model's `crossmodal.champion_history` (JSON, the last 50 moves),
which `rollback` reads to find the champion before the current one.
"""

from __future__ import annotations

import getpass
import json
import time
from dataclasses import dataclass

from pipelines.errors import UserError

HISTORY_TAG = "crossmodal.champion_history"
HISTORY_LENGTH = 50


class RegistryError(UserError):
    """A registered model, version or alias that is not there; one line."""


@dataclass
class Move:
    model: str
    alias: str
    version: int
    previous: int | None
    action: str  # promote | rollback
    by: str
    why: str


def client_for(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri, registry_uri=tracking_uri)


def aliased_version(client, model: str, alias: str):
    """The version `alias` points at, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def history(client, model: str) -> list[dict]:
    tags = client.get_registered_model(model).tags
    try:
        return json.loads(tags.get(HISTORY_TAG, "[]"))
    except ValueError:
        return []


def move_alias(client, model: str, alias: str, version: int, action: str, why: str, by: str | None = None) -> Move:
    """Point `alias` at `version` and record the move."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(model, str(version))
    except MlflowException:
        raise RegistryError(f"{model} version {version}: no such registered model version") from None
    current = aliased_version(client, model, alias)
    previous = int(current.version) if current is not None else None
    move = Move(model, alias, int(version), previous, action, by or getpass.getuser(), why)
    client.set_registered_model_alias(model, alias, str(version))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    client.set_model_version_tag(model, str(version), f"crossmodal.{action}", f"{stamp} by {move.by}: {why}"[:4900])
    record = {"at": stamp, "action": action, "alias": alias, "version": move.version, "previous": previous}
    record |= {"by": move.by, "why": why[:300]}
    moves = (history(client, model) + [record])[-HISTORY_LENGTH:]
    client.set_registered_model_tag(model, HISTORY_TAG, json.dumps(moves))
    return move


def rollback(client, model: str, alias: str, why: str, by: str | None = None) -> Move:
    """Point `alias` back at the version it named before the current one was promoted (a
    second rollback goes one further back, not forth again)."""
    current = aliased_version(client, model, alias)
    if current is None:
        raise RegistryError(f"{model}@{alias}: no such alias, nothing to roll back")
    for record in reversed(history(client, model)):
        promoted_here = record["action"] == "promote" and record["alias"] == alias
        if promoted_here and record["version"] == int(current.version) and record["previous"] is not None:
            return move_alias(client, model, alias, record["previous"], "rollback", why, by)
    raise RegistryError(f"{model}@{alias} (version {current.version}): no earlier version recorded to roll back to")
