"""The demo model's answers to what a client's request adds (tool_choice, response_format), and the
smallest instance of a JSON schema it answers structured-output requests with."""

from __future__ import annotations

import json
from typing import Any

import pytest

from corral.providers.base import (
    ChatMessage,
    ModelRequest,
    ResponseFormat,
    TextDelta,
    ToolCall,
    ToolCallsPart,
    ToolChoice,
    ToolSpec,
)
from corral.providers.demo import DemoOptions, DemoProvider
from corral.providers.json_instance import minimal_instance

WEATHER = ToolSpec("get_weather", "", {"type": "object", "properties": {"city": {"type": "string"}},
                                       "required": ["city"]})
CLOCK = ToolSpec("get_time", "", {"type": "object", "properties": {"tz": {"type": "string", "minLength": 3}},
                                  "required": ["tz"]})


async def reply(request: ModelRequest) -> tuple[list[ToolCall], str]:
    calls: list[ToolCall] = []
    text = ""
    async for part in DemoProvider(DemoOptions()).stream(request):
        if isinstance(part, ToolCallsPart):
            calls.extend(part.calls)
        elif isinstance(part, TextDelta):
            text += part.text
    return calls, text


def ask(text: str, **request: Any) -> ModelRequest:
    return ModelRequest([ChatMessage("user", text)], request.pop("tools", (WEATHER, CLOCK)), **request)


async def test_tool_choice_none_calls_nothing() -> None:
    calls, text = await reply(ask('/tool get_weather {"city": "Oslo"}', tool_choice=ToolChoice("none")))
    assert calls == [] and text == 'echo: /tool get_weather {"city": "Oslo"}'


async def test_required_calls_the_first_tool_offered_with_the_smallest_arguments() -> None:
    [call], _ = await reply(ask("hi", tool_choice=ToolChoice("required")))
    assert (call.name, call.arguments) == ("get_weather", {"city": ""})
    [call], _ = await reply(ask('/tool get_time {"tz": "UTC"}', tool_choice=ToolChoice("required")))
    assert (call.name, call.arguments) == ("get_time", {"tz": "UTC"})  # a directed call satisfies it


async def test_a_named_function_is_called_with_its_directed_arguments_or_the_smallest() -> None:
    [call], _ = await reply(ask("hi", tool_choice=ToolChoice("function", "get_time")))
    assert (call.name, call.arguments) == ("get_time", {"tz": "xxx"})
    directed = '/tool get_weather {"city": "Oslo"}\n/tool get_time {"tz": "CET"}'
    [call], _ = await reply(ask(directed, tool_choice=ToolChoice("function", "get_time")))
    assert (call.name, call.arguments) == ("get_time", {"tz": "CET"})


async def test_a_forced_choice_lets_the_demo_answer_once_the_turn_has_a_result() -> None:
    messages = [ChatMessage("user", "hi"), ChatMessage("assistant", "", (ToolCall("c1", "get_weather", {}),)),
                ChatMessage("tool", "sunny", tool_call_id="c1")]
    calls, text = await reply(ModelRequest(messages, (WEATHER,), tool_choice=ToolChoice("required")))
    assert calls == [] and text == "tool results: sunny"


async def test_a_json_schema_gets_its_smallest_instance_and_json_object_an_echo() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    _, text = await reply(ask("hi", response_format=ResponseFormat("json_schema", "n", schema)))
    assert json.loads(text) == {"n": 0}
    _, text = await reply(ask("hi", response_format=ResponseFormat("json_object")))
    assert json.loads(text) == {"echo": "echo: hi"}
    calls, text = await reply(ask('/tool get_weather {"city": "Oslo"}',
                                  response_format=ResponseFormat("json_schema", "n", schema)))
    assert [c.name for c in calls] == ["get_weather"] and text == ""  # a tool call comes first


@pytest.mark.parametrize(("schema", "instance"), [
    ({"type": "string"}, ""),
    ({"type": "string", "minLength": 2}, "xx"),
    ({"type": "integer", "minimum": 5}, 5),
    ({"type": "integer", "exclusiveMinimum": 5}, 6),
    ({"type": "number", "multipleOf": 0.5, "minimum": 0.2}, 0.5),
    ({"type": "boolean"}, False),
    ({"type": "null"}, None),
    ({"type": ["string", "null"]}, ""),
    ({"enum": ["b", "a"]}, "b"),
    ({"const": 7}, 7),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 2}, [0, 0]),
    ({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "minItems": 2}, ["", 0]),
    ({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}, "required": ["b"]},
     {"b": 0}),
    ({"anyOf": [{"type": "null"}, {"type": "integer"}]}, 0),
    ({"allOf": [{"properties": {"a": {"type": "string"}}, "required": ["a"]},
                {"properties": {"b": {"const": 1}}, "required": ["b"]}]}, {"a": "", "b": 1}),
    # pydantic's shape: a model nested through $defs, an optional field, a list of models
    ({"$defs": {"Pet": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}},
      "type": "object",
      "properties": {"owner": {"type": "string"}, "pet": {"$ref": "#/$defs/Pet"},
                     "nick": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
                     "others": {"type": "array", "items": {"$ref": "#/$defs/Pet"}}},
      "required": ["owner", "pet", "others"]},
     {"owner": "", "pet": {"name": ""}, "others": []}),
])
def test_minimal_instance(schema: dict[str, Any], instance: Any) -> None:
    assert minimal_instance(schema) == instance


def test_a_recursive_schema_ends() -> None:
    schema = {"$defs": {"Node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}},
                                 "required": ["next"]}}, "$ref": "#/$defs/Node"}
    value = minimal_instance(schema)
    depth = 0
    while isinstance(value, dict) and "next" in value:
        value, depth = value["next"], depth + 1
    assert 10 < depth < 40
