"""The demo adapters change the style of the base's answers, never their facts: trained
from the shipped recipe (as `zoo pull demo/json` does on a fresh machine), the JSON adapter
answers the demo's own questions in its JSON shape with the base's answer."""

from __future__ import annotations

import json

import pytest

from tests.conftest import linked_home

pytestmark = pytest.mark.slow


def test_the_json_demo_adapter_keeps_the_bases_facts(smollm2_home, tmp_path):
    from zoo.apps.demo import QUESTIONS, keeps_fact
    from zoo.apps.pull import pull
    from zoo.catalog.registry import Registry
    from zoo.inference.generate import generate

    registry = Registry(linked_home(smollm2_home, tmp_path / "home"))
    pull("demo/json", registry=registry)
    for question in QUESTIONS:
        base = generate(question, base="smollm2-135m-instruct", registry=registry)
        assert keeps_fact(question, base), base  # the check itself reads the base right
        answer = generate(question, adapter="demo/json", registry=registry)
        assert json.loads(answer)["question"] == question, answer  # the style changed
        assert keeps_fact(question, answer), answer
    assert not keeps_fact(QUESTIONS[1], '{"answer": "8", "explanation": "eight legs"}')
