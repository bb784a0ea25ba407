"""JSON Schema of flows, auth profiles and settings, for editor completion."""

from __future__ import annotations

from typing import Any, Literal

import pydantic

from flowrunner.model import Flow, Profile, Settings

SchemaKind = Literal["flow", "profile", "settings"]

_TITLES = {
    "flow": "flowrunner flow (flows/*.yaml)",
    "profile": "flowrunner auth profile (auth_profiles/*.yaml)",
    "settings": "flowrunner settings (flowrunner.yaml)",
}


def json_schema(kind: SchemaKind) -> dict[str, Any]:
    if kind == "flow":
        schema = Flow.model_json_schema(by_alias=True)
    elif kind == "profile":
        schema = pydantic.TypeAdapter(Profile).json_schema(by_alias=True)
    else:
        schema = Settings.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = _TITLES[kind]
    return schema
