"""`parse_request`: every body a client can send is a CompletionRequest or a RequestError that
names the field, never an exception from deeper down (the server's tests send these over HTTP)."""

from __future__ import annotations

import json

import pytest

from albor.infer.api import CompletionRequest, RequestError, parse_request


def refusal(body: bytes) -> dict[str, str | None]:
    with pytest.raises(RequestError) as e:
        parse_request(body)
    assert e.value.status == 400
    json.dumps(e.value.body).encode("utf-8")  # the answer itself always encodes
    return dict(e.value.body["error"])


@pytest.mark.parametrize(
    ("body", "param", "where"),
    [
        (rb'{"prompt": "\ud800"}', "prompt", "prompt is"),
        (rb'{"prompt": ["a", "b", "\udc00z"]}', "prompt", "prompt[2]"),
        (rb'{"prompt": "x", "suffix": "\udbff"}', "suffix", "suffix is"),
        (rb'{"prompt": "x", "stop": "\ud800"}', "stop", "stop is"),
        (rb'{"prompt": "x", "stop": ["\n", "\udfff"]}', "stop", "stop[1]"),
        (rb'{"prompt": "x", "user": "\ud800"}', "user", "user is"),
        (rb'{"prompt": "x", "logit_bias": {"\ud800": 1}}', "logit_bias", "logit_bias.'\\ud800'"),
        (rb'{"prompt": "x", "\ud800": 1}', None, "a field name"),
    ],
)
def test_lone_surrogates_are_refused_by_field(body: bytes, param: str | None, where: str) -> None:
    error = refusal(body)
    assert error["code"] == "invalid_unicode" and error["param"] == param
    assert str(error["message"]).startswith(where) and "lone surrogate" in str(error["message"])


def test_surrogate_pairs_are_text() -> None:
    req = parse_request(rb'{"prompt": "emoji \ud83d\ude00"}')
    assert req.prompt == "emoji \U0001f600"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"prompt": "caf\xe9"}', "invalid_utf8"),
        (b"\xff\xfe{}", "invalid_utf8"),
        (b"", "invalid_json"),
        (b'{"prompt": "x",}', "invalid_json"),
        (b'{"prompt": "x", "temperature": Infinity}', "invalid_json"),
        (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "invalid_json"),
        (b"[" * 100_000, "invalid_json"),
        (b'"just a string"', "invalid_json"),
    ],
)
def test_bodies_that_are_not_json_objects(body: bytes, code: str) -> None:
    assert refusal(body)["code"] == code


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": "x", "seed": 1 << 64}, "seed"),
        ({"prompt": "x", "seed": -(1 << 63) - 1}, "seed"),
        ({"prompt": "x", "top_k": 0}, "top_k"),
        ({"prompt": "x", "stream_options": {"include_usage": "yes"}}, "stream_options"),
        ({"prompt": "x", "echo": 1}, "echo"),
    ],
)
def test_values_out_of_range_or_type(fields: dict[str, object], param: str) -> None:
    assert refusal(json.dumps(fields).encode())["param"] == param


def test_a_full_request_parses() -> None:
    fields = {"prompt": ["a", "b"], "suffix": "c", "stop": ["\n"], "seed": (1 << 64) - 1, "n": 2}
    req = parse_request(json.dumps(fields).encode())
    assert req == CompletionRequest.model_validate(fields)
