"""Templates: sandboxed and strict; untrusted values encoded or refused; secrets redacted."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.templates import Templates
from probes.base import Untrusted
from probes.errors import ExtractFailed, TemplateError

VARS = {
    "run": {"id": "r1", "correlation": "hw-r1"},
    "variant": {"base_url": "http://127.0.0.1:8000"},
    "steps": {"create": {"id": Untrusted("a/b?c=d&e"), "n": 7, "evil": Untrusted("x\r\nSet: 1")}},
}


def test_untrusted_values_are_url_encoded_in_urls_but_trusted_ones_are_not() -> None:
    t = Templates()
    url = t.render("{{ variant.base_url }}/orders/{{ steps.create.id }}", VARS, "url")
    assert url == "http://127.0.0.1:8000/orders/a%2Fb%3Fc%3Dd%26e"


def test_untrusted_crlf_is_refused_in_headers() -> None:
    with pytest.raises(ExtractFailed, match="CR/LF"):
        Templates().render("{{ steps.create.evil }}", VARS, "header")


def test_text_mode_keeps_values_as_they_are() -> None:
    assert Templates().render("{{ steps.create.n }}-{{ run.id }}", VARS, "text") == "7-r1"


def test_unknown_variables_are_errors_not_empty_strings() -> None:
    with pytest.raises(TemplateError, match="nope"):
        Templates().render("{{ steps.nope.id }}", VARS, "text")


def test_sandbox_refuses_attribute_escapes() -> None:
    with pytest.raises(TemplateError):
        Templates().render("{{ ''.__class__.__mro__[1].__subclasses__() }}", VARS, "text")


def test_secret_references_resolve_and_are_redacted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HW_TOKEN", "s3cr3t-token")
    secret_file = tmp_path / "pw"
    secret_file.write_text("file-password\n")
    t = Templates()
    assert t.render("Bearer ${env:HW_TOKEN}", VARS, "header") == "Bearer s3cr3t-token"
    assert t.render(f"${{file:{secret_file}}}", VARS, "text") == "file-password"
    assert t.redactor("got 401 for s3cr3t-token and file-password") == "got 401 for *** and ***"


def test_missing_secret_names_the_reference_not_a_value() -> None:
    with pytest.raises(TemplateError, match="HW_DOES_NOT_EXIST"):
        Templates().render("${env:HW_DOES_NOT_EXIST}", VARS, "text")


@pytest.mark.parametrize("mode", ["text", "url", "header"])
@pytest.mark.parametrize(
    "value", ["plain", Untrusted("a/b c?"), 7, 3.0, True, None, Untrusted("x"), "ünï"]
)
def test_the_fast_path_renders_exactly_as_jinja(value: object, mode: str) -> None:
    """Simple `{{ a.b }}` templates skip Jinja; they must render byte for byte the same."""
    from monitor.templates import _simple_parts

    variables = {"steps": {"s": {"v": value}}, "variant": {"base_url": "http://h:1"}}
    template = "{{ variant.base_url }}/x/{{ steps.s.v }}?q={{steps.s.v}}"
    assert _simple_parts(template) is not None
    fast = Templates().render(template, variables, mode)  # type: ignore[arg-type]
    jinja = str(Templates()._compiled(template, mode).render(variables))
    assert fast == jinja


@pytest.mark.parametrize("mode", ["text", "url", "header"])
@pytest.mark.parametrize(
    "value",
    ["plain", Untrusted("a/b c?"), 7, 3.0, True, None, "ünï", {"a": 1}, [1], Untrusted("x\r\n")],
)
def test_a_one_name_template_renders_the_same_every_time(value: object, mode: str) -> None:
    """`{{ a.b }}` alone is rendered by a shorter path from its second render on: the same
    text, or the same error, as the first render and as Jinja."""
    variables = {"steps": {"s": {"v": value}}}
    templates = Templates()
    for template in ("{{ steps.s.v }}", "{{steps.s.v}}"):
        seen = []
        for _ in range(3):
            try:
                seen.append(templates.render(template, variables, mode))  # type: ignore[arg-type]
            except ExtractFailed as refused:
                seen.append(f"refused: {refused}")
        try:
            jinja = str(Templates()._compiled(template, mode).render(variables))
        except ExtractFailed as refused:
            jinja = f"refused: {refused}"
        assert seen == [jinja] * 3
    assert templates._one == {
        "{{ steps.s.v }}": ("steps", "s", "v"),
        "{{steps.s.v}}": ("steps", "s", "v"),
    }


def test_a_one_name_template_that_stops_resolving_fails_as_jinja_words_it() -> None:
    templates = Templates()
    assert templates.render("{{ steps.a.id }}", {"steps": {"a": {"id": "x"}}}, "text") == "x"
    for missing in ({"steps": {"a": {}}}, {"steps": {}}, {"steps": "text"}):
        with pytest.raises(TemplateError, match="steps"):
            templates.render("{{ steps.a.id }}", missing, "text")


def test_a_template_with_a_secret_reference_is_resolved_every_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    templates = Templates()
    monkeypatch.setenv("HW_ONE_NAME", "{{ run.id }}")
    assert templates.render("${env:HW_ONE_NAME}", VARS, "text") == "r1"
    monkeypatch.setenv("HW_ONE_NAME", "{{ run.correlation }}")  # a rotated secret
    assert templates.render("${env:HW_ONE_NAME}", VARS, "text") == "hw-r1"
    assert templates._one == {}


def test_templates_with_filters_still_go_through_jinja() -> None:
    from monitor.templates import _simple_parts

    assert _simple_parts("{{ run.id | upper }}") is None
    assert Templates().render("{{ run.id | upper }}", VARS, "text") == "R1"


def test_run_values_for_imported_requests_are_made_once_per_run() -> None:
    """`run.guid`, `run.timestamp`, `run.iso_timestamp` (Postman's `{{$guid}}` …): the same
    within a run, another guid in another run, none made for a run that does not ask."""
    import re
    import time

    from probes.base import RunValues

    templates = Templates()
    run = RunValues(id="0123456789abcdef")
    assert "guid" in run and "guid" not in dict(run)  # nothing made yet
    text = "{{ run.guid }} {{ run.timestamp }} {{ run.iso_timestamp }}"
    first = templates.render(text, {"run": run}, "text")
    assert templates.render(text, {"run": run}, "text") == first
    guid, stamp, iso = first.split()
    assert re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", guid
    )
    assert abs(int(stamp) - time.time()) < 5 and iso.endswith("Z")
    other = templates.render("{{ run.guid }}", {"run": RunValues(id="fedcba9876543210")}, "text")
    assert other != guid
