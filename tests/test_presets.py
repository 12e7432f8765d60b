"""Presets: EDGE_PRESETS / EDGE_PRESETS_FILE checked at start, expanded per request
(``preset=<name>`` and Scene7's ``$name$``), explicit parameters overriding them,
EDGE_ONLY_PRESETS, and one cache entry for a preset and its spelt-out parameters."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edge.errors import InvalidParameter, ParameterNotAllowed, PresetsOnly
from edge.params import (
    Fit,
    Gravity,
    ImageRequest,
    ParamPolicy,
    apply_client_hints,
    parse_query,
)
from edge.settings import SettingsError, load_settings
from tests.helpers import decode, start_edge

Pairs = list[tuple[str, str]]

PRESETS = "thumb=width=200&height=200&fit=cover;hero=width=1600;Top=crop=top&w=300&h=100"
PHOTO = "/photo-1200x980.jpg"


def policy(**env: str) -> ParamPolicy:
    return ParamPolicy.from_settings(load_settings({"EDGE_PRESETS": PRESETS, **env}))


def parse(query: Pairs, **env: str) -> ImageRequest:
    return parse_query(query, policy(**env))


def problems_of(env: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    return "\n".join(caught.value.problems)


# --- settings ------------------------------------------------------------------------------


def test_presets_parse_into_names_and_pairs() -> None:
    settings = load_settings(
        {"EDGE_PRESETS": " thumb=width=200&height=200&fit=cover ; hero=w=1600;"}
    )
    assert settings.presets == {
        "thumb": (("width", "200"), ("height", "200"), ("fit", "cover")),
        "hero": (("w", "1600"),),
    }


def test_presets_file_skips_blank_lines_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "presets"
    path.write_text(
        "# thumbnails\n\nthumb=width=200&height=200\n  # indented comment\nhero=w=1600\n"
    )
    settings = load_settings({"EDGE_PRESETS_FILE": str(path), "EDGE_PRESETS": "card=w=400"})
    assert settings.presets_file == {
        "thumb": (("width", "200"), ("height", "200")),
        "hero": (("w", "1600"),),
    }
    assert set(settings.all_presets) == {"thumb", "hero", "card"}


def test_values_are_decoded_like_a_query_string() -> None:
    settings = load_settings({"EDGE_PRESETS": "pad=crop=pad&bg=%23ff0000"})
    assert settings.presets["pad"] == (("crop", "pad"), ("bg", "#ff0000"))


BAD_PRESETS = [
    # (EDGE_PRESETS, words the message must hold besides the variable's name)
    ("thumb=wdth=200", ["'thumb'", "wdth", "unknown parameter"]),
    ("thumb=width=abc", ["'thumb'", "width", "integer"]),
    ("thumb=width=200&fit=sideways", ["'thumb'", "fit"]),
    ("th umb=width=1", ["th umb", "not name=query"]),
    ("$thumb$=width=1", ["$thumb$", "not name=query"]),
    ("thumb", ["'thumb'", "not name=query"]),
    ("thumb=", ["'thumb'", "at least one parameter"]),
    ("a=width=1;A=width=2", ["'A'", "defined twice"]),
    ("a=preset=b", ["'a'", "another preset"]),
    ("a=$b$", ["'a'", "another preset"]),
    ("a=width=1&s=abc", ["'a'", "signature"]),
    ("a=width=1&w=2", ["'a'", "more than once"]),
    ("a=crop=top&fit=inside", ["'a'", "conflicts"]),
    ("big=width=9000", ["'big'", "maximum output dimension"]),
]


@pytest.mark.parametrize(("value", "words"), BAD_PRESETS)
def test_bad_presets_stop_settings_load_naming_variable_and_preset(
    value: str, words: list[str]
) -> None:
    text = problems_of({"EDGE_PRESETS": value})
    assert "EDGE_PRESETS" in text
    for word in words:
        assert word in text, (word, text)


def test_the_output_limit_applied_is_the_configured_one() -> None:
    text = problems_of({"EDGE_PRESETS": "card=width=400", "EDGE_MAX_OUTPUT_DIMENSION": "300"})
    assert "EDGE_PRESETS: preset 'card'" in text
    assert load_settings({"EDGE_PRESETS": "card=width=300", "EDGE_MAX_OUTPUT_DIMENSION": "300"})


def test_every_bad_preset_is_reported_together() -> None:
    text = problems_of({"EDGE_PRESETS": "a=wdth=1;b=width=x;c=width=3", "EDGE_PORT": "x"})
    assert "'a'" in text
    assert "'b'" in text
    assert "'c'" not in text
    assert "EDGE_PORT" in text


def test_bad_preset_file_lines_are_named_by_number(tmp_path: Path) -> None:
    path = tmp_path / "presets"
    path.write_text("# presets\nthumb=width=200\nhero=width=huge\n")
    text = problems_of({"EDGE_PRESETS_FILE": str(path)})
    assert "EDGE_PRESETS_FILE" in text
    assert str(path) in text
    assert "'hero'" in text
    assert "width" in text
    path.write_text("thumb=width=200\nnot a preset\n")
    assert "line 2" in problems_of({"EDGE_PRESETS_FILE": str(path)})


def test_a_missing_presets_file_stops_start(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    text = problems_of({"EDGE_PRESETS_FILE": str(missing)})
    assert "EDGE_PRESETS_FILE" in text
    assert "cannot read it" in text


def test_a_preset_defined_in_both_places_stops_start(tmp_path: Path) -> None:
    path = tmp_path / "presets"
    path.write_text("thumb=width=200\n")
    text = problems_of({"EDGE_PRESETS_FILE": str(path), "EDGE_PRESETS": "THUMB=width=100"})
    assert "EDGE_PRESETS and EDGE_PRESETS_FILE both define thumb" in text


def test_only_presets_without_presets_stops_start() -> None:
    assert "EDGE_ONLY_PRESETS" in problems_of({"EDGE_ONLY_PRESETS": "true"})


def test_preset_may_be_named_in_the_allowed_list() -> None:
    settings = load_settings({"EDGE_PRESETS": PRESETS, "EDGE_IMAGE_PARAMS_ALLOWED": "preset,w"})
    assert ParamPolicy.from_settings(settings).allowed == frozenset({"width"})


def test_the_cli_stops_with_a_clear_message() -> None:
    env = {**os.environ, "EDGE_PRESETS": "thumb=width=200;hero=wdth=1600"}
    result = subprocess.run(
        [sys.executable, "-m", "edge"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "EDGE_PRESETS" in result.stderr
    assert "preset 'hero': wdth: unknown parameter" in result.stderr
    assert "Traceback" not in result.stderr


# --- expansion -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        [("preset", "thumb")],
        [("PRESET", "Thumb")],
        [("$thumb$", "")],
        [("$THUMB$", "")],
    ],
)
def test_a_preset_expands_to_its_parameters(query: Pairs) -> None:
    request = parse(query)
    assert (request.spec.width, request.spec.height, request.spec.fit) == (200, 200, Fit.COVER)
    assert request.given == {"width", "height", "fit"}
    assert request.preset == "thumb"
    assert not request.is_original


def test_explicit_parameters_override_the_preset_without_being_duplicates() -> None:
    for query in ([("preset", "thumb"), ("w", "300")], [("width", "300"), ("$thumb$", "")]):
        request = parse(query)
        assert (request.spec.width, request.spec.height) == (300, 200), query
        assert request.spec.fit is Fit.COVER


def test_explicit_parameters_beside_a_preset_are_still_validated() -> None:
    with pytest.raises(InvalidParameter) as caught:
        parse([("preset", "thumb"), ("w", "0")])
    assert caught.value.param == "width"
    with pytest.raises(InvalidParameter) as duplicate:
        parse([("preset", "thumb"), ("w", "300"), ("width", "300")])
    assert duplicate.value.param == "width"


UNTANGLED = [
    # preset Top = crop=top (cover, north) & w=300 & h=100
    ([("gravity", "south")], Fit.COVER, Gravity.SOUTH),
    ([("fit", "contain")], Fit.CONTAIN, Gravity.NORTH),
    ([("fit", "inside"), ("g", "east")], Fit.INSIDE, Gravity.EAST),
    ([("crop", "entropy")], Fit.COVER, Gravity.ENTROPY),
]


@pytest.mark.parametrize(("explicit", "fit", "gravity"), UNTANGLED)
def test_explicit_fit_or_gravity_beats_a_preset_crop_mode(
    explicit: Pairs, fit: Fit, gravity: Gravity
) -> None:
    request = parse([("preset", "Top"), *explicit])
    assert (request.spec.fit, request.spec.gravity) == (fit, gravity)
    assert (request.spec.width, request.spec.height) == (300, 100)


def test_an_explicit_crop_mode_beats_a_preset_fit_and_gravity() -> None:
    env = {"EDGE_PRESETS": "boxed=fit=contain&gravity=west&w=100&h=100"}
    plain = parse([("preset", "boxed"), ("crop", "fit")], **env)
    assert (plain.spec.fit, plain.spec.gravity) == (Fit.COVER, Gravity.WEST)  # fit has no gravity
    top = parse([("preset", "boxed"), ("crop", "top")], **env)
    assert (top.spec.fit, top.spec.gravity) == (Fit.COVER, Gravity.NORTH)


def test_explicit_upscale_beats_a_preset_fit_suffix_and_the_other_way_round() -> None:
    env = {"EDGE_PRESETS": "big=fit=crop,1&w=100&h=100;up=upscale=1&w=100"}
    assert parse([("preset", "big")], **env).spec.upscale is True
    assert parse([("preset", "big"), ("upscale", "0")], **env).spec.upscale is False
    up = parse([("preset", "up"), ("fit", "constrain,0")], **env)
    assert (up.spec.upscale, up.spec.fit) == (False, Fit.INSIDE)


def test_conflicts_among_explicit_parameters_are_still_400() -> None:
    with pytest.raises(InvalidParameter) as caught:
        parse([("preset", "thumb"), ("crop", "top"), ("fit", "inside")])
    assert caught.value.param == "crop"


def test_unknown_presets_are_400_naming_what_was_written() -> None:
    with pytest.raises(InvalidParameter) as caught:
        parse([("preset", "nope")])
    assert caught.value.param == "preset"
    assert "unknown preset 'nope'" in str(caught.value)
    assert caught.value.cacheable
    with pytest.raises(InvalidParameter) as word:
        parse([("$nope$", "")])
    assert word.value.param == "$nope$"
    with pytest.raises(InvalidParameter):
        parse_query([("preset", "thumb")], ParamPolicy())  # no presets configured


def test_two_presets_are_a_duplicate() -> None:
    with pytest.raises(InvalidParameter) as caught:
        parse([("preset", "thumb"), ("$hero$", "")])
    assert caught.value.param == "preset"
    assert "more than once" in str(caught.value)


def test_a_dollar_word_with_a_value_is_not_a_preset() -> None:
    with pytest.raises(InvalidParameter) as caught:
        parse([("$thumb$", "1")])
    assert caught.value.param == "$thumb$"
    assert "unknown parameter" in str(caught.value)


def test_client_hints_do_not_override_what_the_preset_fixed() -> None:
    request, used = apply_client_hints(parse([("preset", "thumb")]), "2", "500", 8192, 40_000_000)
    assert (request.spec.width, request.spec.height, request.spec.dpr) == (200, 200, 2.0)
    assert used == ("Sec-CH-DPR",)


# --- operator policies -----------------------------------------------------------------------


def test_preset_parameters_are_exempt_from_the_allowed_list() -> None:
    env = {"EDGE_IMAGE_PARAMS_ALLOWED": "width"}
    assert parse([("preset", "thumb")], **env).spec.fit is Fit.COVER
    assert parse([("preset", "thumb"), ("w", "100")], **env).spec.width == 100
    with pytest.raises(ParameterNotAllowed):
        parse([("preset", "thumb"), ("h", "100")], **env)


def test_preset_parameters_are_exempt_from_validation_rules() -> None:
    env = {"EDGE_IMAGE_PARAM_VALIDATIONS": json.dumps({"width": {"max": 1000}})}
    assert parse([("preset", "hero")], **env).spec.width == 1600
    for query in ([("w", "1600")], [("preset", "thumb"), ("w", "1600")]):
        with pytest.raises(InvalidParameter) as caught:
            parse(query, **env)
        assert "maximum" in str(caught.value)


ONLY = {"EDGE_ONLY_PRESETS": "true"}


@pytest.mark.parametrize(
    "query",
    [
        [("w", "100")],
        [("preset", "thumb"), ("w", "100")],
        [("$thumb$", ""), ("q", "50")],
        [("preset", "thumb"), ("req", "props")],
        [("req", "imageprops")],
        [("dpr", "on")],
    ],
)
def test_only_presets_refuses_anything_else_with_401(query: Pairs) -> None:
    with pytest.raises(PresetsOnly) as caught:
        parse(query, **ONLY)
    assert caught.value.status == 401
    assert caught.value.detail == "EDGE_ONLY_PRESETS"


def test_only_presets_checks_names_first() -> None:
    with pytest.raises(InvalidParameter):
        parse([("wdth", "100")], **ONLY)  # an unknown name is a 400 before anything


@pytest.mark.parametrize(
    ("query", "original"),
    [
        ([("preset", "thumb")], False),
        ([("$hero$", ""), ("s", "sig"), ("backendTimeout", "2")], False),
        ([("preset", "thumb"), ("origin", "cdn.example.com"), ("defaultImage", "")], False),
        ([("preset", "thumb"), ("utm_source", "mail")], False),
        ([], True),
        ([("backendTimeout", "2"), ("sig", "x")], True),
    ],
)
def test_only_presets_accepts_presets_and_originals(query: Pairs, original: bool) -> None:
    assert parse(query, **ONLY).is_original is original


# --- canonical form (the cache key) ----------------------------------------------------------


def test_a_preset_and_its_parameters_share_a_canonical_form() -> None:
    expected = parse([("width", "200"), ("height", "200"), ("fit", "cover")]).canonical()
    for query in (
        [("preset", "thumb")],
        [("$thumb$", "")],
        [("PRESET", "THUMB"), ("s", "x"), ("backendTimeout", "3")],
        [("hei", "200"), ("wid", "200"), ("fit", "crop")],
    ):
        assert parse(query).canonical() == expected, query
    assert "preset" not in expected
    assert parse([("preset", "hero")]).canonical() != expected


def test_an_overridden_preset_matches_its_spelt_out_equivalent() -> None:
    overridden = parse([("preset", "thumb"), ("w", "300")]).canonical()
    assert overridden == parse([("w", "300"), ("h", "200"), ("fit", "cover")]).canonical()


# --- end to end ------------------------------------------------------------------------------


async def drain(client: Any) -> None:
    """Let cache writes scheduled after the response finish."""
    from edge.app import STATE

    background = client.server.app[STATE].background
    if background:
        await asyncio.wait(background, timeout=5)


async def test_preset_requests_over_http_share_the_cache(aiohttp_client: Any) -> None:
    client = await start_edge(aiohttp_client, {"EDGE_PRESETS": PRESETS})
    first = await client.get(f"{PHOTO}?preset=thumb")
    assert first.status == 200
    assert first.headers["X-Edge-Cache"] == "miss"
    image = decode(await first.read())
    assert (image.width, image.height) == (200, 200)
    await drain(client)
    for query in ("$thumb$", "width=200&height=200&fit=cover", "PRESET=Thumb"):
        again = await client.get(f"{PHOTO}?{query}")
        assert again.status == 200, query
        assert again.headers["X-Edge-Cache"] == "hit", query
    unknown = await client.get(f"{PHOTO}?preset=nope")
    assert unknown.status == 400
    assert "unknown preset" in await unknown.text()


async def test_only_presets_over_http(aiohttp_client: Any) -> None:
    client = await start_edge(aiohttp_client, {"EDGE_PRESETS": PRESETS, **ONLY})
    refused = await client.get(f"{PHOTO}?width=100")
    assert refused.status == 401
    beside = await client.get(f"{PHOTO}?preset=thumb&q=20")
    assert beside.status == 401
    served = await client.get(f"{PHOTO}?preset=hero")
    assert served.status == 200
    assert decode(await served.read()).width == 1200  # 1600 asked, never enlarged
    original = await client.get(PHOTO)
    assert original.status == 200
    assert original.headers["Content-Type"] == "image/jpeg"


async def test_only_presets_with_originals_off(aiohttp_client: Any) -> None:
    env = {"EDGE_PRESETS": PRESETS, **ONLY, "EDGE_ALLOW_ORIGINAL_IMAGE_REQUEST": "false"}
    client = await start_edge(aiohttp_client, env)
    assert (await client.get(PHOTO)).status == 401
    assert (await client.get(f"{PHOTO}?$thumb$")).status == 200
