"""PerModel: what is derived from a model is made once per model object, and a new
model (a reloaded flow) gets its own."""

from __future__ import annotations

import gc

from flowrunner.model import Flow, HttpStep
from flowrunner.model.base import PerModel


def _flow(url: str) -> Flow:
    return Flow.model_validate(
        {"name": "f", "steps": [{"id": "get", "http": {"url": url}}]},
    )


def _url_of(flow: Flow) -> str:
    step = flow.steps[0]
    assert isinstance(step, HttpStep)
    return step.http.url


def test_made_once_per_model_object() -> None:
    made: list[str] = []

    def url_of(flow: Flow) -> str:
        made.append(flow.name)
        return _url_of(flow)

    derive = PerModel(url_of)
    flow = _flow("https://a.example/x")
    assert derive(flow) == "https://a.example/x"
    assert derive(flow) == "https://a.example/x"
    assert made == ["f"]
    # An equal model that is another object (the same file loaded again) is made anew.
    assert derive(_flow("https://a.example/x")) == "https://a.example/x"
    assert made == ["f", "f"]


def test_a_new_model_at_a_reused_identity_is_not_mistaken_for_the_old() -> None:
    derive: PerModel[Flow, str] = PerModel(_url_of, kept=2)
    urls = []
    for n in range(50):
        flow = _flow(f"https://a.example/{n}")
        urls.append(derive(flow))
        del flow
        gc.collect()  # frees the model once the cache lets go, so its id may come back
    assert urls == [f"https://a.example/{n}" for n in range(50)]


def test_bounded() -> None:
    derive: PerModel[Flow, str] = PerModel(lambda flow: flow.name, kept=3)
    flows = [_flow(f"https://a.example/{n}") for n in range(10)]
    for flow in flows:
        derive(flow)
    assert len(derive._made) <= 3
