"""The query-string layer: keys, both parameter dialects, policies, canonical form, hints."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.errors import (
    BadKey,
    EdgeError,
    InvalidParameter,
    OutputTooLarge,
    ParameterNotAllowed,
)
from edge.params import (
    MAX_VALUE_CHARS,
    PARAMS,
    CropRect,
    Fit,
    Flip,
    Gravity,
    ImageRequest,
    OutputFormat,
    ParamPolicy,
    ReqFormat,
    ReqType,
    TransformSpec,
    accepted_formats,
    apply_client_hints,
    parse_key,
    parse_query,
)
from edge.settings import Rule, SettingsError, load_settings

Pairs = Sequence[tuple[str, str]]
DEFAULT = ParamPolicy()


def parse(*pairs: tuple[str, str], policy: ParamPolicy = DEFAULT) -> ImageRequest:
    return parse_query(list(pairs), policy)


def spec(*pairs: tuple[str, str]) -> TransformSpec:
    return parse(*pairs).spec


# --- parse_key ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw_path", "key"),
    [
        ("/photo.jpg", "photo.jpg"),
        ("/a/b/c.png", "a/b/c.png"),
        ("/a+b.jpg", "a+b.jpg"),
        ("/a%20b.jpg", "a b.jpg"),
        ("/caf%C3%A9.jpg", "café.jpg"),
        ("/café.jpg", "café.jpg"),
        ("/a%2520b.jpg", "a%20b.jpg"),
        ("/a%252Fb.jpg", "a%2Fb.jpg"),
        ("/a//b.jpg", "a//b.jpg"),
        ("/...jpg", "...jpg"),
        ("/a/.hidden", "a/.hidden"),
        ("/photo.jpg?w=300", "photo.jpg"),
        ("//leading.jpg", "/leading.jpg"),
        ("/100%", "100%"),
    ],
)
def test_parse_key_decodes_exactly_once(raw_path: str, key: str) -> None:
    assert parse_key(raw_path) == key


@pytest.mark.parametrize(
    ("raw_path", "reason"),
    [
        ("/", "empty"),
        ("", "empty"),
        ("/?w=1", "empty"),
        ("/a%2Fb.jpg", "encoded slash"),
        ("/a%2fb.jpg", "encoded slash"),
        ("/a%00b.jpg", "NUL"),
        ("/a\\b.jpg", "backslash"),
        ("/a%5Cb.jpg", "backslash"),
        ("/./a.jpg", "segment"),
        ("/a/../b.jpg", "segment"),
        ("/a/%2e%2e/b.jpg", "segment"),
        ("/a/%2E/b.jpg", "segment"),
        ("/a/..", "segment"),
        ("/..", "segment"),
        ("/%ff.jpg", "UTF-8"),
        ("/%C3.jpg", "UTF-8"),
        ("/a\udcff.jpg", "UTF-8"),
    ],
)
def test_parse_key_rejects(raw_path: str, reason: str) -> None:
    with pytest.raises(BadKey, match=reason) as caught:
        parse_key(raw_path)
    assert caught.value.status == 400


# --- defaults and originals ---------------------------------------------------------------


def test_no_parameters_is_an_original_with_default_spec() -> None:
    request = parse()
    assert request.spec == TransformSpec()
    assert request.is_original
    assert request.canonical() == "original&req=img,text"


@pytest.mark.parametrize(
    "pairs",
    [
        [("s", "abc")],
        [("sig", "abc")],
        [("backendTimeout", "2")],
        [("origin", "example.com")],
        [("bucket", "my-bucket")],
        [("defaultImage", "missing.jpg")],
        [("defaultImage", "")],
        [("utm_source", "newsletter"), ("fbclid", "x"), ("gclid", "y")],
        [("dpr", "on")],
    ],
)
def test_originals_ignore_non_transforming_parameters(pairs: Pairs) -> None:
    policy = ParamPolicy(ignored=("utm_*", "fbclid", "gclid"))
    request = parse_query(pairs, policy)
    assert request.is_original


@pytest.mark.parametrize(
    "pairs",
    [
        [("w", "300")],
        [("fit", "inside")],
        [("req", "img")],
        [("format", "jpeg")],
        [("dpr", "off")],
        [("req", "props")],
    ],
)
def test_any_other_parameter_is_not_an_original(pairs: Pairs) -> None:
    assert not parse_query(pairs, DEFAULT).is_original


def test_policy_auto_format_does_not_make_originals_transformed() -> None:
    request = parse(policy=ParamPolicy(auto_format=True))
    assert request.is_original
    assert request.spec.auto_format


# --- every row of the parameter table, both dialects -------------------------------------

VALID_SPECS: list[tuple[Pairs, dict[str, Any]]] = [
    # width / height
    ([("width", "300")], {"width": 300}),
    ([("w", "300")], {"width": 300}),
    ([("wid", "300")], {"width": 300}),
    ([("WIDTH", "0300")], {"width": 300}),
    ([("height", "200")], {"height": 200}),
    ([("h", "200")], {"height": 200}),
    ([("hei", "200")], {"height": 200}),
    ([("HeI", "1")], {"height": 1}),
    # dpr
    ([("dpr", "2")], {"dpr": 2.0}),
    ([("dpr", "1.5")], {"dpr": 1.5}),
    ([("dpr", "5")], {"dpr": 5.0}),
    ([("dpr", "on,2")], {"dpr": 2.0}),
    ([("DPR", "ON,3.25")], {"dpr": 3.25}),
    ([("dpr", "off")], {"dpr": 1.0}),
    ([("dpr", "on")], {"dpr": 1.0}),
    # fit
    *[([("fit", fit.value)], {"fit": fit}) for fit in Fit],
    ([("fit", "COVER")], {"fit": Fit.COVER}),
    ([("fit", "fit")], {"fit": Fit.CONTAIN}),
    ([("fit", "constrain")], {"fit": Fit.INSIDE}),
    ([("fit", "crop")], {"fit": Fit.COVER}),
    ([("fit", "wrap")], {"fit": Fit.OUTSIDE}),
    ([("fit", "stretch")], {"fit": Fit.FILL}),
    ([("fit", "crop,1")], {"fit": Fit.COVER, "upscale": True}),
    ([("fit", "Constrain,0")], {"fit": Fit.INSIDE, "upscale": False}),
    ([("fit", "crop,1"), ("upscale", "1")], {"fit": Fit.COVER, "upscale": True}),
    # crop: Imagizer values
    ([("crop", "fit")], {"fit": Fit.COVER, "gravity": Gravity.CENTER}),
    ([("crop", "pad")], {"fit": Fit.CONTAIN}),
    ([("crop", "top")], {"fit": Fit.COVER, "gravity": Gravity.NORTH}),
    ([("crop", "bottom")], {"fit": Fit.COVER, "gravity": Gravity.SOUTH}),
    ([("crop", "face")], {"fit": Fit.COVER, "gravity": Gravity.ATTENTION}),
    ([("crop", "attention")], {"fit": Fit.COVER, "gravity": Gravity.ATTENTION}),
    ([("crop", "Entropy")], {"fit": Fit.COVER, "gravity": Gravity.ENTROPY}),
    ([("crop", "pad"), ("gravity", "east")], {"fit": Fit.CONTAIN, "gravity": Gravity.EAST}),
    ([("crop", "top"), ("fit", "crop"), ("g", "north")], {"gravity": Gravity.NORTH}),
    # crop: Scene7 rectangle
    ([("crop", "10,20,300,200")], {"crop": CropRect(10, 20, 300, 200)}),
    ([("crop", "0,0,1,1")], {"crop": CropRect(0, 0, 1, 1)}),
    # gravity
    *[([("gravity", g.value)], {"gravity": g}) for g in Gravity],
    ([("g", "NorthEast")], {"gravity": Gravity.NORTHEAST}),
    ([("align", "west")], {"gravity": Gravity.WEST}),
    ([("align", "-1,-1")], {"gravity": Gravity.NORTHWEST}),
    ([("align", "0,-1")], {"gravity": Gravity.NORTH}),
    ([("align", "1,-0.8")], {"gravity": Gravity.NORTHEAST}),
    ([("align", "-0.6,0")], {"gravity": Gravity.WEST}),
    ([("align", "0.2,-0.4")], {"gravity": Gravity.CENTER}),
    ([("align", "0.5,-0.5")], {"gravity": Gravity.CENTER}),
    ([("align", "0.9,0.1")], {"gravity": Gravity.EAST}),
    ([("align", "-1,1")], {"gravity": Gravity.SOUTHWEST}),
    ([("align", ".1,+1")], {"gravity": Gravity.SOUTH}),
    ([("align", "0.51,0.7")], {"gravity": Gravity.SOUTHEAST}),
    # format
    ([("format", "jpeg")], {"format": OutputFormat.JPEG}),
    ([("format", "jpg")], {"format": OutputFormat.JPEG}),
    ([("f", "png")], {"format": OutputFormat.PNG}),
    ([("fmt", "webp")], {"format": OutputFormat.WEBP}),
    ([("format", "AVIF")], {"format": OutputFormat.AVIF}),
    ([("format", "gif")], {"format": OutputFormat.GIF}),
    ([("format", "auto")], {"format": None, "auto_format": True}),
    ([("fmt", "jpeg,rgb")], {"format": OutputFormat.JPEG}),
    ([("fmt", "png-alpha")], {"format": OutputFormat.PNG}),
    ([("fmt", "webp-alpha")], {"format": OutputFormat.WEBP}),
    ([("fmt", "JPG,RGB")], {"format": OutputFormat.JPEG}),
    # quality
    ([("quality", "1")], {"quality": 1}),
    ([("q", "100")], {"quality": 100}),
    ([("qlt", "80")], {"quality": 80}),
    ([("qlt", "80,1")], {"quality": 80}),
    ([("qlt", "75,0")], {"quality": 75}),
    # background
    ([("background", "ff0000")], {"background": (255, 0, 0, 255)}),
    ([("bg", "#FF000080")], {"background": (255, 0, 0, 128)}),
    ([("bgc", "0x00ff00")], {"background": (0, 255, 0, 255)}),
    ([("pad_color", "fff")], {"background": (255, 255, 255, 255)}),
    ([("bg", "#abc4")], {"background": (0xAA, 0xBB, 0xCC, 0x44)}),
    ([("bg", "0X000000")], {"background": (0, 0, 0, 255)}),
    # blur
    ([("blur", "0.3")], {"blur": 0.3}),
    ([("blur", "100")], {"blur": 100.0}),
    ([("blur", "2.50")], {"blur": 2.5}),
    # sharpen
    ([("sharpen", "0")], {"sharpen": None}),
    ([("sharpen", "1")], {"sharpen": 1.0}),
    ([("op_sharpen", "1")], {"sharpen": 1.0}),
    ([("op_sharpen", "0")], {"sharpen": None}),
    ([("sharpen", "2.5")], {"sharpen": 2.5}),
    ([("sharpen", "10")], {"sharpen": 10.0}),
    # rotate / flip
    *[([("rotate", str(angle))], {"rotate": angle}) for angle in (0, 90, 180, 270)],
    *[([("flip", flip.value)], {"flip": flip}) for flip in Flip],
    ([("flip", "HV")], {"flip": Flip.HV}),
    # booleans
    *[
        ([(name, text)], {name: value})
        for name in ("upscale", "autorotate", "strip", "lossless", "progressive")
        for text, value in (("1", True), ("0", False), ("true", True), ("FALSE", False))
    ],
]


@pytest.mark.parametrize(("pairs", "expected"), VALID_SPECS)
def test_valid_values(pairs: Pairs, expected: dict[str, Any]) -> None:
    result = parse_query(pairs, DEFAULT).spec
    assert {name: getattr(result, name) for name in expected} == expected


@pytest.mark.parametrize(
    ("pairs", "field", "value"),
    [
        ([("backendTimeout", "2.5")], "backend_timeout", 2.5),
        ([("BACKENDTIMEOUT", "0.1")], "backend_timeout", 0.1),
        ([("origin", "images.example.com")], "origin", "https://images.example.com"),
        ([("origin", "Images.Example.com:8443")], "origin", "https://images.example.com:8443"),
        ([("origin", "http://example.com")], "origin", "http://example.com"),
        ([("origin", "HTTPS://example.com:443/")], "origin", "https://example.com"),
        ([("origin", "http://example.com:80")], "origin", "http://example.com"),
        ([("origin", "http://10.0.0.1:9000")], "origin", "http://10.0.0.1:9000"),
        ([("origin", "[::1]:8080")], "origin", "https://[::1]:8080"),
        ([("origin", "http://[2001:DB8:0:0::1]")], "origin", "http://[2001:db8::1]"),
        ([("bucket", "my-bucket.v2")], "bucket", "my-bucket.v2"),
        ([("bucket", "abc")], "bucket", "abc"),
        ([("defaultImage", "missing.jpg")], "default_image", "missing.jpg"),
        ([("defaultImage", "/errors/missing.jpg")], "default_image", "errors/missing.jpg"),
        ([("defaultimage", "")], "default_image", ""),
        ([("req", "img")], "req", ReqType.IMG),
        ([("req", "props")], "req", ReqType.PROPS),
        ([("req", "imageprops")], "req", ReqType.IMAGEPROPS),
        ([("REQ", "Exists")], "req", ReqType.EXISTS),
        ([("req", "props,json")], "req_format", ReqFormat.JSON),
        ([("req", "exists,XML")], "req_format", ReqFormat.XML),
        ([("req", "imageprops,text")], "req_format", ReqFormat.TEXT),
        ([("req", "props")], "req_format", ReqFormat.TEXT),
        ([("s", "abc_-123")], "signature", "abc_-123"),
        ([("sig", "xyz")], "signature", "xyz"),
        ([("S", "xyz")], "signature", "xyz"),
    ],
)
def test_valid_request_values(pairs: Pairs, field: str, value: object) -> None:
    assert getattr(parse_query(pairs, DEFAULT), field) == value


def test_defaults_not_given_stay_none() -> None:
    request = parse(("w", "10"))
    assert request.backend_timeout is None
    assert request.origin is None
    assert request.bucket is None
    assert request.default_image is None
    assert request.signature is None


INVALID: list[tuple[Pairs, str]] = [
    # names
    ([("foo", "1")], "foo"),
    ([("widht", "300")], "widht"),
    ([("$thumb$", "")], "$thumb$"),
    ([("w", "1"), ("x", "1")], "x"),
    # width / height
    *[([(name, value)], "width") for name in ("width", "w", "wid") for value in ("0", "")],
    ([("w", "-5")], "width"),
    ([("w", "3.5")], "width"),
    ([("w", "1e3")], "width"),
    ([("w", " 300")], "width"),
    ([("w", "3_00")], "width"),
    ([("w", "٣٠٠")], "width"),
    ([("w", "9" * 40)], "width"),
    ([("hei", "abc")], "height"),
    ([("h", "0")], "height"),
    # dpr
    ([("dpr", "0.5")], "dpr"),
    ([("dpr", "5.01")], "dpr"),
    ([("dpr", "nan")], "dpr"),
    ([("dpr", "inf")], "dpr"),
    ([("dpr", "1e0")], "dpr"),
    ([("dpr", "on,")], "dpr"),
    ([("dpr", "on,9")], "dpr"),
    ([("dpr", "off,2")], "dpr"),
    ([("dpr", "yes")], "dpr"),
    # fit
    ([("fit", "hfit")], "fit"),
    ([("fit", "vfit")], "fit"),
    ([("fit", "squash")], "fit"),
    ([("fit", "crop,2")], "fit"),
    ([("fit", "crop,")], "fit"),
    ([("fit", "crop,1"), ("upscale", "0")], "fit"),
    ([("fit", "crop,0"), ("upscale", "true")], "fit"),
    # crop
    ([("crop", "middle")], "crop"),
    ([("crop", "1,2,3")], "crop"),
    ([("crop", "1,2,3,4,5")], "crop"),
    ([("crop", "-1,0,10,10")], "crop"),
    ([("crop", "0,0,0,10")], "crop"),
    ([("crop", "0,0,10,0")], "crop"),
    ([("crop", "0.5,0,10,10")], "crop"),
    ([("crop", "top"), ("fit", "contain")], "crop"),
    ([("crop", "fit"), ("fit", "inside")], "crop"),
    ([("crop", "pad"), ("fit", "crop")], "crop"),
    ([("crop", "top"), ("gravity", "south")], "crop"),
    ([("crop", "face"), ("align", "0,0")], "crop"),
    # gravity
    ([("gravity", "up")], "gravity"),
    ([("g", "")], "gravity"),
    ([("align", "2,0")], "gravity"),
    ([("align", "0,-1.5")], "gravity"),
    ([("align", "0")], "gravity"),
    ([("align", "0,0,0")], "gravity"),
    ([("align", "nan,0")], "gravity"),
    # format
    ([("format", "bmp")], "format"),
    ([("f", "")], "format"),
    ([("fmt", "png8")], "format"),
    ([("fmt", "tif-alpha")], "format"),
    ([("fmt", "jpeg,,rgb")], "format"),
    ([("fmt", "jpeg rgb")], "format"),
    # quality
    ([("quality", "0")], "quality"),
    ([("q", "101")], "quality"),
    ([("qlt", "80,2")], "quality"),
    ([("qlt", "80,")], "quality"),
    ([("qlt", ",1")], "quality"),
    ([("q", "80.5")], "quality"),
    # background
    ([("background", "red")], "background"),
    ([("bg", "#12")], "background"),
    ([("bgc", "12345")], "background"),
    ([("pad_color", "#1234567")], "background"),
    ([("bg", "##fff")], "background"),
    ([("bg", "0xggg")], "background"),
    # blur / sharpen
    ([("blur", "0.2")], "blur"),
    ([("blur", "0")], "blur"),
    ([("blur", "100.5")], "blur"),
    ([("blur", "-1")], "blur"),
    ([("sharpen", "11")], "sharpen"),
    ([("op_sharpen", "-1")], "sharpen"),
    ([("sharpen", "yes")], "sharpen"),
    # rotate / flip
    ([("rotate", "45")], "rotate"),
    ([("rotate", "360")], "rotate"),
    ([("rotate", "-90")], "rotate"),
    ([("flip", "x")], "flip"),
    ([("flip", "")], "flip"),
    # booleans
    *[
        ([(name, value)], name)
        for name in ("upscale", "autorotate", "strip", "lossless", "progressive")
        for value in ("2", "", "yes")
    ],
    # backendTimeout
    ([("backendTimeout", "0")], "backendTimeout"),
    ([("backendTimeout", "-1")], "backendTimeout"),
    ([("backendTimeout", "inf")], "backendTimeout"),
    ([("backendTimeout", "soon")], "backendTimeout"),
    # origin
    ([("origin", "")], "origin"),
    ([("origin", "ftp://example.com")], "origin"),
    ([("origin", "https://example.com/path")], "origin"),
    ([("origin", "https://user@example.com")], "origin"),
    ([("origin", "https://example.com?x=1")], "origin"),
    ([("origin", "example.com:0")], "origin"),
    ([("origin", "example.com:65536")], "origin"),
    ([("origin", "example.com:")], "origin"),
    ([("origin", "exa mple.com")], "origin"),
    ([("origin", "-example.com")], "origin"),
    ([("origin", "127.1")], "origin"),
    ([("origin", "[::1")], "origin"),
    ([("origin", "[zz::1]")], "origin"),
    ([("origin", "[::1]x")], "origin"),
    ([("origin", "éxample.com")], "origin"),
    # bucket
    ([("bucket", "ab")], "bucket"),
    ([("bucket", "My-Bucket")], "bucket"),
    ([("bucket", "-bucket")], "bucket"),
    ([("bucket", "bucket-")], "bucket"),
    ([("bucket", "a..b")], "bucket"),
    ([("bucket", "192.168.1.1")], "bucket"),
    ([("bucket", "xn--bucket")], "bucket"),
    ([("bucket", "bucket-s3alias")], "bucket"),
    ([("bucket", "b" * 64)], "bucket"),
    ([("bucket", "a_b")], "bucket"),
    # defaultImage
    ([("defaultImage", "/")], "defaultImage"),
    ([("defaultImage", "../secret.jpg")], "defaultImage"),
    ([("defaultImage", "a/./b.jpg")], "defaultImage"),
    ([("defaultImage", "a\\b.jpg")], "defaultImage"),
    ([("defaultImage", "a\x00b.jpg")], "defaultImage"),
    # req
    ([("req", "userdata")], "req"),
    ([("req", "props,html")], "req"),
    ([("req", "props,")], "req"),
    ([("req", "")], "req"),
    # any value that is absurdly long
    ([("defaultImage", "a" * (MAX_VALUE_CHARS + 1))], "defaultImage"),
    ([("s", "a" * (MAX_VALUE_CHARS + 1))], "s"),
]


@pytest.mark.parametrize(("pairs", "param"), INVALID)
def test_invalid_values_name_the_parameter(pairs: Pairs, param: str) -> None:
    with pytest.raises(InvalidParameter) as caught:
        parse_query(pairs, DEFAULT)
    assert caught.value.param == param
    assert str(caught.value).startswith(f"{param}: ")
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("pairs", "words"),
    [
        ([("w", "abc")], ["integer >= 1", "'abc'", "(as 'w')"]),
        ([("dpr", "9")], ["from 1 to 5", "on,"]),
        ([("fit", "hfit")], ["hfit is not supported"]),
        ([("crop", "top"), ("fit", "contain")], ["crop=top", "fit=contain"]),
        ([("crop", "top"), ("gravity", "south")], ["crop=top", "gravity=south"]),
        ([("fit", "crop,1"), ("upscale", "0")], ["upscale=1", "upscale=0"]),
        ([("foo", "1")], ["unknown parameter"]),
        ([("origin", "x/y")], ["host[:port]"]),
        ([("bg", "red")], ["hex RGB or RGBA"]),
        ([("w", "1" * 2000)], ["too long", "at most"]),
    ],
)
def test_invalid_messages_say_the_expected_form(pairs: Pairs, words: list[str]) -> None:
    with pytest.raises(InvalidParameter) as caught:
        parse_query(pairs, DEFAULT)
    for word in words:
        assert word in caught.value.reason


def test_long_unknown_names_are_cut_in_messages() -> None:
    with pytest.raises(InvalidParameter) as caught:
        parse(("x" * 500, "1"))
    assert len(caught.value.reason) < 120


@pytest.mark.parametrize(
    ("pairs", "param"),
    [
        ([("w", "1"), ("WIDTH", "2")], "width"),
        ([("width", "1"), ("wid", "1")], "width"),
        ([("h", "1"), ("hei", "1")], "height"),
        ([("f", "png"), ("fmt", "png")], "format"),
        ([("q", "1"), ("qlt", "1")], "quality"),
        ([("bg", "fff"), ("pad_color", "fff")], "background"),
        ([("g", "north"), ("align", "0,0")], "gravity"),
        ([("sharpen", "1"), ("op_sharpen", "1")], "sharpen"),
        ([("s", "a"), ("sig", "b")], "s"),
        ([("s", "a"), ("S", "a")], "s"),
        ([("dpr", "on"), ("dpr", "2")], "dpr"),
        ([("defaultImage", ""), ("defaultimage", "")], "defaultImage"),
    ],
)
def test_duplicates_under_any_alias_or_case(pairs: Pairs, param: str) -> None:
    with pytest.raises(InvalidParameter, match="more than once") as caught:
        parse_query(pairs, DEFAULT)
    assert caught.value.param == param


# --- policy -------------------------------------------------------------------------------


def test_ignored_parameters_are_not_validated_and_not_in_the_canonical_form() -> None:
    policy = ParamPolicy(ignored=("utm_*", "fbclid"))
    plain = parse_query([("w", "300")], policy)
    noisy = parse_query([("UTM_Source", "\x00" * 5000), ("w", "300"), ("fbclid", "")], policy)
    assert noisy.canonical() == plain.canonical()


def test_ignoring_comes_before_duplicate_detection() -> None:
    policy = ParamPolicy(ignored=("w",))
    assert parse_query([("w", "x"), ("width", "10")], policy).spec.width == 10


def test_parameters_outside_the_allowed_list_are_401() -> None:
    policy = ParamPolicy(allowed=frozenset({"width", "format"}))
    assert parse_query([("w", "300"), ("fmt", "png"), ("s", "x")], policy).spec.width == 300
    with pytest.raises(ParameterNotAllowed, match="height") as caught:
        parse_query([("w", "300"), ("hei", "1")], policy)
    assert caught.value.status == 401


def test_not_allowed_comes_before_invalid_values() -> None:
    policy = ParamPolicy(allowed=frozenset({"width"}))
    with pytest.raises(ParameterNotAllowed, match="blur"):
        parse_query([("w", "nonsense"), ("blur", "nonsense")], policy)


def test_allowed_list_accepts_aliases_and_rejects_unknown_names() -> None:
    assert ParamPolicy(allowed=frozenset({"w", "backendtimeout"})).allowed == frozenset(
        {"width", "backendtimeout"}
    )
    with pytest.raises(SettingsError, match="EDGE_IMAGE_PARAMS_ALLOWED"):
        ParamPolicy(allowed=frozenset({"widht"}))


@pytest.mark.parametrize(
    ("rules", "pairs", "message"),
    [
        ({"width": Rule(max=2000)}, [("w", "3000")], "width: 3000 is above the maximum 2000"),
        ({"quality": Rule(min=30)}, [("qlt", "20,1")], "quality: 20 is below the minimum 30"),
        ({"dpr": Rule(max=2)}, [("dpr", "on,2.5")], "dpr: 2.5 is above the maximum 2"),
        ({"format": Rule(allowed=("jpeg", "webp"))}, [("f", "png")], "format: 'png' is not"),
        ({"fit": Rule(allowed=("cover",))}, [("fit", "inside")], "fit: 'inside' is not"),
        ({"rotate": Rule(allowed=("0", "180"))}, [("rotate", "90")], "rotate: '90' is not"),
        ({"upscale": Rule(max=0)}, [("upscale", "true")], "upscale: 1 is above the maximum 0"),
    ],
)
def test_validation_rules_name_the_rule(rules: dict[str, Rule], pairs: Pairs, message: str) -> None:
    with pytest.raises(InvalidParameter) as caught:
        parse_query(pairs, ParamPolicy(validations=rules))
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("rules", "pairs"),
    [
        ({"width": Rule(min=10, max=2000)}, [("w", "2000")]),
        ({"width": Rule(min=10, max=2000)}, [("w", "10")]),
        ({"format": Rule(allowed=("jpg",))}, [("fmt", "jpeg,rgb")]),
        ({"fit": Rule(allowed=("crop",))}, [("fit", "cover")]),
        ({"dpr": Rule(allowed=("1", "2.0"))}, [("dpr", "on,2")]),
        ({"w": Rule(max=100)}, [("width", "100")]),
        ({"dpr": Rule(max=2)}, [("dpr", "on")]),
    ],
)
def test_validation_rules_compare_canonical_values(rules: dict[str, Rule], pairs: Pairs) -> None:
    # A value inside the rule parses exactly as it would without the rule.
    ruled = parse_query(pairs, ParamPolicy(validations=rules))
    assert ruled == parse_query(pairs, DEFAULT)


@pytest.mark.parametrize(
    "rules",
    [
        {"widht": Rule(max=1)},
        {"format": Rule(max=3)},
        {"fit": Rule(allowed=("sideways",))},
    ],
)
def test_rules_that_cannot_apply_are_settings_errors(rules: dict[str, Rule]) -> None:
    with pytest.raises(SettingsError, match="EDGE_IMAGE_PARAM_VALIDATIONS"):
        ParamPolicy(validations=rules)


def test_policy_from_settings() -> None:
    settings = load_settings(
        {
            "EDGE_IGNORED_PARAMS": "utm_*,Ref",
            "EDGE_IMAGE_PARAMS_ALLOWED": "width,height",
            "EDGE_IMAGE_PARAM_VALIDATIONS": '{"width": {"max": 500}}',
            "EDGE_AUTO_FORMAT": "true",
            "EDGE_MAX_OUTPUT_DIMENSION": "1000",
        }
    )
    policy = ParamPolicy.from_settings(settings)
    assert policy.is_ignored("REF")
    assert policy.is_ignored("utm_medium")
    assert policy.allowed == frozenset({"width", "height"})
    assert policy.validations["width"] == Rule(max=500)
    assert policy.auto_format
    assert policy.max_output_dimension == 1000


def test_policy_from_default_settings_ignores_tracking_parameters() -> None:
    policy = ParamPolicy.from_settings(load_settings({}))
    request = parse_query([("utm_campaign", "x"), ("gclid", "y"), ("fbclid", "z")], policy)
    assert request.is_original


@pytest.mark.parametrize(
    ("pairs", "limit"),
    [
        ([("w", "8193")], 8192),
        ([("w", "4097"), ("dpr", "2")], 8192),
        ([("h", "2000"), ("dpr", "on,5")], 8192),
        ([("w", "501")], 500),
        ([("h", "300"), ("dpr", "2")], 500),
    ],
)
def test_output_over_the_dimension_limit(pairs: Pairs, limit: int) -> None:
    with pytest.raises(OutputTooLarge, match=str(limit)) as caught:
        parse_query(pairs, ParamPolicy(max_output_dimension=limit))
    assert caught.value.status == 400


def test_output_at_the_dimension_limit_is_fine() -> None:
    assert parse(("w", "4096"), ("h", "4096"), ("dpr", "2")).spec.dpr == 2.0


# --- format negotiation defaults ----------------------------------------------------------


def test_auto_format_from_the_policy_only_when_no_format_is_given() -> None:
    policy = ParamPolicy(auto_format=True)
    assert parse_query([("w", "10")], policy).spec.auto_format
    explicit = parse_query([("w", "10"), ("f", "png")], policy).spec
    assert (explicit.auto_format, explicit.format) == (False, OutputFormat.PNG)
    assert not parse_query([("w", "10")], DEFAULT).spec.auto_format


# --- canonical form -----------------------------------------------------------------------


def test_canonical_is_the_same_for_every_alias_and_case() -> None:
    forms = [
        [("w", "300"), ("h", "200"), ("fit", "cover")],
        [("WIDTH", "300"), ("hei", "0200"), ("FIT", "Crop")],
        [("fit", "crop"), ("wid", "300"), ("height", "200")],
        [("crop", "fit"), ("Wid", "300"), ("H", "200"), ("s", "sig"), ("backendTimeout", "1")],
    ]
    canonicals = {parse_query(form, DEFAULT).canonical() for form in forms}
    assert canonicals == {"width=300&height=200&fit=cover&req=img,text"}


@pytest.mark.parametrize(
    ("pairs", "canonical"),
    [
        ([("dpr", "2.50")], "dpr=2.5&req=img,text"),
        ([("dpr", "on,2")], "dpr=2&req=img,text"),
        ([("blur", "0.30")], "blur=0.3&req=img,text"),
        ([("bg", "FFF")], "background=ffffffff&req=img,text"),
        ([("crop", "1,2,3,4")], "crop=1,2,3,4&req=img,text"),
        ([("f", "auto")], "auto_format=1&req=img,text"),
        ([("fmt", "jpg,rgb")], "format=jpeg&req=img,text"),
        ([("strip", "0"), ("upscale", "true")], "upscale=1&strip=0&req=img,text"),
        ([("req", "props,json")], "req=props,json"),
        ([("fit", "inside"), ("rotate", "0")], "req=img,text"),
        ([("sharpen", "0")], "req=img,text"),
        (
            [("origin", "a.example"), ("bucket", "abc"), ("defaultImage", "x")],
            "original&req=img,text",
        ),
    ],
)
def test_canonical_values(pairs: Pairs, canonical: str) -> None:
    assert parse_query(pairs, DEFAULT).canonical() == canonical


def test_canonical_distinguishes_originals_from_default_transforms() -> None:
    assert parse().canonical() != parse(("fit", "inside")).canonical()


# --- Accept -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "formats"),
    [
        (None, set()),
        ("", set()),
        ("*/*", set()),
        ("image/*", set()),
        ("image/avif,image/webp,image/apng,image/*,*/*;q=0.8", {"avif", "webp"}),
        ("image/webp", {"webp"}),
        ("IMAGE/WEBP ; Q=0.5", {"webp"}),
        ("image/webp;q=0", set()),
        ("image/webp;q=0.000", set()),
        ("image/webp;q=1.0, image/avif;q=0.001", {"webp", "avif"}),
        ("image/webp, image/webp;q=0", set()),
        ("image/avif;q=2", set()),
        ("image/avif;q=abc", set()),
        ("image/avif;q=", set()),
        ("image/avif;level=1;q=0.9", {"avif"}),
        ("image/jpeg,image/png,image/gif", {"jpeg", "png", "gif"}),
        ("image/jpg", {"jpeg"}),
        ("text/webp, application/avif", set()),
        (",,;;==///", set()),
        ("image/avif" + ",x" * 10000, {"avif"}),
        ("\x00\xff image/webp", set()),
    ],
)
def test_accepted_formats(accept: str | None, formats: set[str]) -> None:
    assert {f.value for f in accepted_formats(accept)} == formats


@given(st.text(max_size=200))
def test_accepted_formats_never_fails(accept: str) -> None:
    assert accepted_formats(accept) <= set(OutputFormat)


# --- client hints -------------------------------------------------------------------------


def hinted(
    pairs: Pairs,
    dpr: str | None,
    width: str | None,
    max_dimension: int = 8192,
    max_pixels: int = 40_000_000,
) -> tuple[TransformSpec, tuple[str, ...]]:
    request, used = apply_client_hints(
        parse_query(pairs, DEFAULT), dpr, width, max_dimension, max_pixels
    )
    return request.spec, used


def test_dpr_hint_fills_an_open_dpr() -> None:
    result, used = hinted([("w", "300")], "2", None)
    assert (result.width, result.dpr, used) == (300, 2.0, ("Sec-CH-DPR",))


@pytest.mark.parametrize(("hint", "dpr"), [("0.75", 1.0), ("7", 5.0), ("2.625", 2.625)])
def test_dpr_hint_is_clamped(hint: str, dpr: float) -> None:
    assert hinted([("w", "100")], hint, None)[0].dpr == dpr


def test_dpr_hint_is_lowered_to_stay_within_the_output_limit() -> None:
    result, used = hinted([("w", "1000")], "3", None, max_dimension=2000)
    assert (result.dpr, used) == (2.0, ("Sec-CH-DPR",))


@pytest.mark.parametrize(("width", "height"), [(4000, 4000), (3001, 4999), (4471, 4471)])
def test_dpr_hint_is_lowered_to_keep_the_box_within_the_pixel_limit(
    width: int, height: int
) -> None:
    result, used = hinted([("w", str(width)), ("h", str(height))], "2", None)
    device = (round(width * result.dpr), round(height * result.dpr))
    assert 39_900_000 < device[0] * device[1] <= 40_000_000  # lowered, but only just
    assert used == ("Sec-CH-DPR",)


def test_a_box_already_over_the_pixel_limit_keeps_dpr_1() -> None:
    result, _ = hinted([("w", "7000"), ("h", "7000")], "2", None)
    assert result.dpr == 1.0  # the URL itself is refused later, as without the hint


@pytest.mark.parametrize("garbage", ["", "abc", "-1", "0", "nan", "inf", "1e2", "2,3"])
def test_garbage_hints_are_ignored(garbage: str) -> None:
    result, used = hinted([("h", "100")], garbage, garbage)
    assert (result.dpr, result.width, used) == (1.0, None, ())


@pytest.mark.parametrize("pairs", [[("w", "300"), ("dpr", "3")], [("w", "300"), ("dpr", "off")]])
def test_hints_never_override_the_url(pairs: Pairs) -> None:
    before = parse_query(pairs, DEFAULT).spec
    result, used = hinted(pairs, "2", "999")
    assert (result, used) == (before, ())


def test_scene7_dpr_on_takes_the_hint() -> None:
    result, used = hinted([("w", "300"), ("dpr", "on")], "2", None)
    assert (result.dpr, used) == (2.0, ("Sec-CH-DPR",))


@pytest.mark.parametrize(
    ("hint", "width"), [("1", 50), ("50", 50), ("333", 350), ("1000", 1000), ("99999", 8192)]
)
def test_width_hint_rounds_up_to_50_and_is_capped(hint: str, width: int) -> None:
    result, used = hinted([("h", "100")], None, hint)
    assert (result.width, result.dpr, used) == (width, 1.0, ("Sec-CH-Width",))


def test_width_hint_is_device_pixels_and_dpr_folds_into_the_height() -> None:
    result, used = hinted([("h", "300")], "2", "640")
    assert (result.width, result.height, result.dpr) == (650, 600, 1.0)
    assert used == ("Sec-CH-DPR", "Sec-CH-Width")


def test_url_dpr_folds_into_the_height_under_a_width_hint() -> None:
    result, used = hinted([("h", "301"), ("dpr", "1.5")], "3", "600")
    assert (result.width, result.height, result.dpr, used) == (600, 452, 1.0, ("Sec-CH-Width",))


def test_dpr_hint_with_nothing_left_to_scale_is_not_named() -> None:
    result, used = hinted([("fit", "cover")], "2", "600")
    assert (result.width, result.height, result.dpr, used) == (600, None, 1.0, ("Sec-CH-Width",))


@pytest.mark.parametrize(
    "pairs", [[], [("s", "x")], [("req", "exists")], [("req", "imageprops,json")]]
)
def test_hints_do_not_apply_to_originals_or_source_queries(pairs: Pairs) -> None:
    request = parse_query(pairs, DEFAULT)
    assert apply_client_hints(request, "2", "600", 8192, 40_000_000) == (request, ())


def test_hinted_values_reach_the_canonical_form() -> None:
    request = parse(("h", "100"))
    with_hints, _ = apply_client_hints(request, "2", "333", 8192, 40_000_000)
    assert with_hints.canonical() == "width=350&height=200&req=img,text"


# --- properties ---------------------------------------------------------------------------

ALL_NAMES = sorted({name for param in PARAMS for name in (param.name, *param.aliases)})


def random_case(text: str) -> st.SearchStrategy[str]:
    flips = st.lists(st.booleans(), min_size=len(text), max_size=len(text))
    return flips.map(
        lambda up: "".join(c.upper() if u else c.lower() for c, u in zip(text, up, strict=True))
    )


NAMES = st.one_of(
    st.sampled_from(ALL_NAMES).flatmap(random_case),
    st.sampled_from(["utm_source", "preset", "$thumb$", "", "w ", "wídth"]),
    st.text(max_size=12),
)
VALUES = st.one_of(
    st.sampled_from(
        [
            "",
            "0",
            "1",
            "-1",
            "on,2",
            "off",
            "on",
            "1e5",
            "nan",
            "inf",
            "-0",
            "0x",
            "#",
            ",",
            "1,2,3,4",
            "-1,1",
            "crop,1",
            "top",
            "png-alpha",
            "jpeg,rgb",
            "80,1",
            "fff",
            "http://[::1]:0",
            "a..b",
            "../x",
            "props,json",
            "9" * 5000,
        ]
    ),
    st.text(max_size=30),
    st.integers(-10, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
POLICIES = st.sampled_from(
    [
        DEFAULT,
        ParamPolicy(ignored=("utm_*", "fbclid"), auto_format=True),
        ParamPolicy(allowed=frozenset({"width", "height", "format"})),
        ParamPolicy(validations={"width": Rule(max=100), "format": Rule(allowed=("png",))}),
        ParamPolicy(max_output_dimension=64),
    ]
)


@given(st.lists(st.tuples(NAMES, VALUES), max_size=8), POLICIES)
def test_parse_query_raises_only_edge_errors(pairs: Pairs, policy: ParamPolicy) -> None:
    try:
        status = 200 if parse_query(pairs, policy).canonical() else 500
    except EdgeError as exc:
        status = exc.status
    assert status in (200, 400, 401)


def same_meaning(*spellings: str) -> st.SearchStrategy[tuple[str, ...]]:
    return st.just(spellings)


#: canonical name -> strategy of equivalent spellings of one random value
SPELLINGS: dict[str, st.SearchStrategy[tuple[str, ...]]] = {
    "width": st.integers(1, 1500).map(lambda n: (str(n), f"0{n}")),
    "height": st.integers(1, 1500).map(lambda n: (str(n), f"00{n}")),
    "dpr": st.sampled_from(["1", "1.5", "2", "3"]).map(
        lambda v: (v, f"on,{v}", v + ("0" if "." in v else ".0"))
    ),
    "fit": st.sampled_from(
        [
            ("inside", "constrain"),
            ("cover", "crop", "COVER,0"),
            ("contain", "fit"),
            ("fill", "stretch"),
            ("outside", "wrap"),
        ]
    ),
    "crop": st.sampled_from([("face", "attention"), ("top",), ("pad",), ("1,2,30,40",)]),
    "gravity": st.sampled_from(
        [
            ("north", "0,-1", "0.2,-0.8"),
            ("center", "0,0", "-0.3,0.5"),
            ("southeast", "1,1"),
            ("entropy", "ENTROPY"),
        ]
    ),
    "format": st.sampled_from(
        [("jpeg", "jpg", "jpeg,rgb", "JPG"), ("png", "png-alpha"), ("webp",), ("auto", "AUTO")]
    ),
    "quality": st.integers(1, 100).map(lambda n: (str(n), f"{n},1", f"{n},0")),
    "background": st.sampled_from([("ffffff", "#fff", "0xFFFFFFFF", "FFFF"), ("12345678",)]),
    "blur": st.sampled_from([("0.5", "0.50", ".5"), ("2", "2.0")]),
    "sharpen": st.sampled_from([("0", "0.0"), ("1", "1.0")]),
    "rotate": st.sampled_from([("90", "090"), ("0",)]),
    "flip": st.sampled_from([("hv", "HV"), ("v", "V")]),
    **{
        flag: st.sampled_from([("1", "true", "TRUE"), ("0", "false")])
        for flag in ("upscale", "autorotate", "strip", "lossless", "progressive")
    },
    "req": st.sampled_from([("img", "IMG,text"), ("props", "props,text"), ("props,json",)]),
}
#: parameters left out of the canonical form: present in one rendering only
LEFT_OUT = [("s", "abc"), ("backendTimeout", "3"), ("defaultImage", "x.jpg"), ("utm_x", "1")]
ALIASES = {param.name: (param.name, *param.aliases) for param in PARAMS}
INVARIANCE_POLICY = ParamPolicy(ignored=("utm_*",))


def outcome(pairs: Pairs) -> tuple[str, ...]:
    try:
        return ("ok", parse_query(pairs, INVARIANCE_POLICY).canonical())
    except EdgeError as exc:
        return (type(exc).__name__, getattr(exc, "param", ""))


@given(st.data())
def test_canonical_is_invariant_under_order_alias_and_case(data: st.DataObject) -> None:
    chosen = data.draw(st.lists(st.sampled_from(sorted(SPELLINGS)), unique=True, max_size=8))
    first: list[tuple[str, str]] = []
    second: list[tuple[str, str]] = []
    for name in chosen:
        spellings = data.draw(SPELLINGS[name])
        for rendering in (first, second):
            alias = data.draw(st.sampled_from(ALIASES[name]).flatmap(random_case))
            rendering.append((alias, data.draw(st.sampled_from(spellings))))
    second.extend(data.draw(st.lists(st.sampled_from(LEFT_OUT), unique=True)))
    shuffled = data.draw(st.permutations(second))
    assert outcome(first) == outcome(shuffled)


def test_every_canonical_parameter_is_in_the_table() -> None:
    names = {param.name for param in PARAMS}
    spec_params = {f.name for f in dataclasses.fields(TransformSpec)} - {"auto_format"}
    assert spec_params <= names
    assert set(SPELLINGS) | {name for name, _ in LEFT_OUT} >= names - {"origin", "bucket"}
