"""Shared fixtures. Nothing here is autouse and nothing imports torch at import time,
so test files that never touch a model (render, tasks) stay torch-free.

- `offline`: HF_HUB_OFFLINE=1 (session scope, so module fixtures may use it).
- `tiny_lm_cache_env`: builds `tiny-qwen3` once into a pytest temp folder, sets
  LATENTMAS_CACHE to it for the session and returns {"LATENTMAS_CACHE": folder}
  (pass it to subprocesses).
- `tiny_lm`: the built model loaded on CPU with `load_model("tiny-qwen3", "cpu")`.
- `fused_lm`: the same with its projections fused (`fuse_projections=True`), as on CUDA.
- `make_problems` / `fake_problems`: a list of `latentmas.tasks.Problem`.
- `workdir`: tmp_path as the working directory, offline, with tiny-qwen3 built (CLI runs).
"""

from __future__ import annotations

import pytest


def make_problems(questions=None, golds=None) -> list:
    """Problems numbered 1..n (default: three of different lengths)."""
    from latentmas.tasks import Problem

    if questions is None:
        questions = [
            "What is 2 + 3?",
            "Tom has 12 apples and gives 5 of them to his friend. How many apples does Tom have left now?",
            "A shop sells pens at 3 dollars each. Mia buys 4 pens and 2 notebooks at 5 dollars each, "
            "then pays with a 50 dollar bill. How many dollars of change does she get back?",
        ]
    golds = golds or [str(i) for i in range(1, len(questions) + 1)]
    return [Problem(number=i + 1, question=q, gold=g, source=f"fake:{i + 1}")
            for i, (q, g) in enumerate(zip(questions, golds))]


@pytest.fixture(scope="session")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="session")
def tiny_lm_cache_env(tmp_path_factory, offline):
    folder = tmp_path_factory.mktemp("latentmas-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LATENTMAS_CACHE", str(folder))
        from latentmas.models import tiny_qwen3

        tiny_qwen3.ensure_built()
        yield {"LATENTMAS_CACHE": str(folder)}


@pytest.fixture(scope="session")
def tiny_lm(tiny_lm_cache_env):
    from latentmas.models import load_model

    return load_model("tiny-qwen3", "cpu")


@pytest.fixture(scope="session")
def fused_lm(tiny_lm_cache_env):
    """`tiny_lm` with its q/k/v and gate/up projections fused (`latentmas.fused_projections`), as models load on CUDA."""
    from latentmas.models import load_model

    return load_model("tiny-qwen3", "cpu", fuse_projections=True)


@pytest.fixture
def fake_problems():
    return make_problems


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_lm_cache_env):
    """Run in tmp_path (offline, tiny-qwen3 built) so captures/, charts/ and runs/ land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def compiled_graphs(monkeypatch):
    """The FX graphs dynamo hands the compiled prefills' backend (`compiled_prefill.BACKEND`), which runs
    them as they are; dynamo reset before and after."""
    import torch

    from latentmas import compiled_prefill

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(compiled_prefill, "BACKEND", backend)
    monkeypatch.setattr(compiled_prefill, "_COMPILED", {})
    torch._dynamo.reset()
    yield graphs
    torch._dynamo.reset()
