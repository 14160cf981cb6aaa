"""The engine's request-rule matcher (``kr_rules_judge``, ``kr_glob``, ``kr_bad_path`` in
``kodarelay/_inspect.c``) against its specification, ``Filter.explain_request`` and
``kodarelay.requestrules``, fuzzed with hypothesis: for any rules naming a host and any
request to it, the engine decides what Python decides, with the same rule and detail."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kodarelay import Filter, relay
from kodarelay.requestrules import _path_regex, bad_path

pytestmark = pytest.mark.skipif(not hasattr(relay.impl, "RequestRules"), reason="the pure-Python twin has no engine")

PATH_CHARS = "/ab.*%2fF5cC0e?\\"
paths = st.text(alphabet="/ab.%2fF5cC0e?\\", min_size=0, max_size=14)
patterns = st.text(alphabet="/ab.*", min_size=1, max_size=8).map(lambda p: "/" + p.lstrip("/"))
methods = st.sampled_from(["GET", "HEAD", "POST", "DELETE", "OPTIONS", "PATCH"])


@settings(max_examples=400, deadline=None)
@given(patterns, paths)
def test_glob_is_the_path_regex(pattern, path):
    want = _path_regex(pattern).fullmatch(path) is not None
    assert relay.impl._glob(pattern, path) == want


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=PATH_CHARS, min_size=0, max_size=16))
def test_bad_path_is_requestrules_bad_path(path):
    assert relay.impl._bad_path(path) == bad_path(path)


@st.composite
def rule_sets(draw):  # type: ignore[no-untyped-def]
    allow, deny = [], []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["host", "methods", "path", "both", "read-only"]))
        ms = ",".join(sorted(set(draw(st.lists(methods, min_size=1, max_size=3)))))
        path = draw(patterns)
        text = {"host": "h.test", "methods": f"{ms} h.test", "path": f"h.test{path}", "both": f"{ms} h.test{path}",
                "read-only": "read-only h.test"}[kind]
        (deny if kind != "read-only" and draw(st.booleans()) and kind != "host" else allow).append(text)
    return allow, deny


@settings(max_examples=300, deadline=None)
@given(rule_sets(), methods, paths)
def test_the_engine_judges_a_request_as_explain_request_does(rules, method, path):
    allow, deny = rules
    flt = Filter(allow, deny=deny)
    judged, program = flt.request_program("h.test", 443)
    engine = relay.impl.RequestRules(judged, program).judge(method, "/" + path.lstrip("/"))
    path = "/" + path.lstrip("/")
    if not flt.has_request_rules("h.test", 443):
        assert engine == (None, None, None)
        return
    d = flt.explain_request("h.test", 443, method, path)
    if d.reason == "allowed":
        assert engine == (None, d.rule, None)
    elif d.reason in ("request_denied", "request_not_allowed", "bad_path"):
        assert engine[0] == d.reason
        if d.reason == "request_denied":
            assert engine[1] == d.rule
        if d.reason == "bad_path":
            assert engine[2] == d.detail
    else:
        # a host-level refusal (no allow rule admits h.test at all): such a tunnel is never
        # opened, so the engine never judges its requests
        assert d.reason in ("not_allowed", "denied")
