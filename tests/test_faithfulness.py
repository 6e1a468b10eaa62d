"""Behaviour that follows the original LatentMAS (Gen-Verse/LatentMAS) and the kNN-latentMAS fork
by default, and the settings that switch to the other behaviour (docs/faithfulness.md)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from captures import tiny_config

from latentmas.decoding import Sampler, Sampling
from latentmas.knn import KnnFilter
from latentmas.methods import get_method
from latentmas.methods.common import (
    ProblemResult,
    chat_text,
    encode,
    sampling_of,
    thinking_of,
    top_k_of,
)
from latentmas.methods.text_mas import readable_turns
from latentmas.prompts import AGENTS, agent_prompt
from latentmas.shared_cache import SegmentKey, SharedCache
from latentmas.tasks import get_task
from latentmas.tasks.scoring import (
    accuracy_fields,
    original_correct,
    original_prediction,
    tally,
)

GSM8K = get_task("gsm8k")
PROMPT = agent_prompt("planner", "What is 2 + 3?", GSM8K.answer_instruction)


# --------------------------------------------------------------------------- thinking


def test_default_prompt_ends_as_the_chat_template_writes_it(tiny_lm):
    text = chat_text(tiny_lm, PROMPT, thinking_of(tiny_config()))
    assert text.endswith("<|im_start|>assistant\n") and "<think>" not in text


def test_think_appends_a_bare_think_as_the_originals_flag(tiny_lm):
    template = chat_text(tiny_lm, PROMPT, "template")
    assert chat_text(tiny_lm, PROMPT, thinking_of(tiny_config(think=True))) == template + "<think>"


def test_no_think_writes_the_empty_block(tiny_lm):
    text = chat_text(tiny_lm, PROMPT, thinking_of(tiny_config(no_think=True)))
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_think_and_no_think_together_is_an_error():
    with pytest.raises(ValueError, match="contradict"):
        thinking_of(tiny_config(think=True, no_think=True))


def test_encode_reads_a_bool_as_the_think_flag(tiny_lm):
    assert encode(tiny_lm, [PROMPT], False)[0] == [chat_text(tiny_lm, PROMPT, "template")]
    assert encode(tiny_lm, [PROMPT], True)[0] == [chat_text(tiny_lm, PROMPT, "open")]
    with pytest.raises(ValueError, match="thinking mode"):
        chat_text(tiny_lm, PROMPT, "maybe")


@pytest.mark.parametrize("method", ["baseline", "text_mas", "latent_mas"])
@pytest.mark.parametrize("overrides, ending", [({}, "assistant\n"), ({"think": True}, "assistant\n<think>"),
                                               ({"no_think": True}, "</think>\n\n")])
def test_every_agent_prompt_ends_as_the_setting_says(tiny_lm, fake_problems, method, overrides, ending):
    cfg = tiny_config(method=method, max_new_tokens=2, latent_steps=1, **overrides)
    [result] = get_method(method)(tiny_lm, fake_problems()[:1], GSM8K, cfg)
    assert result.agents and all(turn.input.endswith(ending) for turn in result.agents)
    if not overrides:
        assert not any("<think>" in turn.input for turn in result.agents)


# --------------------------------------------------------------------------- text_mas topologies


def test_hierarchical_specialists_read_nothing_and_the_judger_reads_all():
    done = ["planner turn", "critic turn", "refiner turn"]
    assert [readable_turns(a, "hierarchical", done[:i]) for i, a in enumerate(AGENTS)] == [[], [], [], done]
    assert [readable_turns(a, "sequential", done[:i]) for i, a in enumerate(AGENTS)] == [
        [], done[:1], done[:2], done]


@pytest.mark.parametrize("topology", ["sequential", "hierarchical"])
def test_text_mas_prompts_quote_whom_the_topology_says(tiny_lm, fake_problems, topology):
    cfg = tiny_config(method="text_mas", prompt=topology, max_new_tokens=4)
    [result] = get_method("text_mas")(tiny_lm, fake_problems()[1:2], GSM8K, cfg)
    quoted = [[name for name in ("[Planner]", "[Critic]", "[Refiner]") if name in turn.input]
              for turn in result.agents]
    if topology == "hierarchical":
        assert quoted == [[], [], [], ["[Planner]", "[Critic]", "[Refiner]"]]
    else:
        assert quoted == [[], ["[Planner]"], ["[Planner]", "[Critic]"], ["[Planner]", "[Critic]", "[Refiner]"]]
    for turn in result.agents[:3]:  # what each quoted agent wrote is what the judger read
        assert turn.output.strip() in result.agents[3].input


# --------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{18}", "18"),
    ("\\boxed{3} then \\boxed{18 dollars}", "18"),  # the last box, its first number
    ("\\boxed{1,000}", "1"),  # no thousands separators
    ("\\boxed{\\frac{1}{2}}", "1"),  # the box ends at the first }
    ("\\boxed{-2.50}", "-2.50"),
    ("\\boxed{C}", "c"),  # no number: the contents, lower-cased
    ("\\boxed{ Option B }", "option b"),
    ("no box: 3 apples, then 7", "7"),  # no box: the last number of the text
    ("nothing here", None),
    ("", None),
])
def test_original_prediction(text, expected):
    assert original_prediction(text) == expected


@pytest.mark.parametrize("task, text, gold, ours, original", [
    ("gsm8k", "\\boxed{18}", "18", True, True),
    ("gsm8k", "\\boxed{18.0}", "18", True, False),  # compared as text
    ("gsm8k", "\\boxed{1,000}", "1000", True, False),
    ("gsm8k", "\\boxed{\\$18}", "18", True, True),
    ("gsm8k", "The answer is 18.", "18", True, True),
    ("gsm8k", "#### 18\nchecked in 2 steps", "18", True, False),  # ours reads the cue, the original the last number
    ("gpqa", "\\boxed{C}", "C", True, True),
    ("gpqa", "\\boxed{\\text{C}}", "C", True, False),
    ("gpqa", "\\boxed{(C)}", "C", True, False),
    ("gpqa", "The answer is (C).", "C", True, False),
    ("aime2024", "\\boxed{033}", "33", True, True),  # integers compared by value
    ("aime2024", "\\boxed{x}", "33", False, False),  # not an integer: wrong, no error
    ("aime2024", "nothing", "33", False, False),
])
def test_both_rules(task, text, gold, ours, original):
    t = get_task(task)
    assert t.is_correct(t.extract_answer(text), gold) is ours
    assert original_correct(task, original_prediction(text), gold) is original


def test_results_carry_both_rules(tiny_lm, fake_problems):
    results = get_method("latent_mas")(tiny_lm, fake_problems(), GSM8K, tiny_config(max_new_tokens=4))
    for result in results:
        assert result.prediction_original == original_prediction(result.output)
        assert result.correct_original == original_correct("gsm8k", result.prediction_original, result.gold)
        row = json.loads(json.dumps(dataclasses.asdict(result)))
        assert {"correct", "correct_original", "prediction_original"} <= set(row)


def test_finish_scores_a_known_output_both_ways():
    from latentmas.methods.common import AgentTurn, finish
    from latentmas.tasks import Problem

    problem = Problem(number=1, question="q", gold="18", source="test")
    [result] = finish([problem], GSM8K, [[AgentTurn("judger", "p", "\\boxed{18.0}", 1, 1)]], 0.0)
    assert isinstance(result, ProblemResult)
    assert (result.correct, result.correct_original, result.prediction_original) == (True, False, "18.0")


def test_tally_and_accuracy_fields():
    rows = [{"correct": True, "correct_original": True}, {"correct": True, "correct_original": False},
            {"correct": False}, {"correct": False, "correct_original": False}]
    assert tally(rows) == (2, 1, 4)
    assert accuracy_fields(*tally(rows)) == {"accuracy": 0.5, "correct": 2, "accuracy_original": 0.25,
                                             "correct_original": 1}
    assert accuracy_fields(0, 0, 0)["accuracy_original"] == 0.0


# --------------------------------------------------------------------------- kNN


def _cache_with(lm, n: int) -> SharedCache:
    shared = SharedCache(lm, 1)
    ids = torch.arange(5, 5 + n)[None]
    shared.extend(lm.model.get_input_embeddings()(ids), torch.ones(1, n, dtype=torch.bool), ids,
                  SegmentKey("planner", "prompt"))
    return shared


@pytest.mark.parametrize("renumber, first_new", [(False, 10), (True, 6)])
def test_knn_positions_after_a_trim(tiny_lm, renumber, first_new):
    shared = _cache_with(tiny_lm, 10)
    keep = torch.zeros(1, 10, dtype=torch.bool)
    keep[0, [0, 2, 3, 6, 8, 9]] = True
    shared.keep(keep, renumber=renumber)
    assert shared.positions[0].tolist() == [0, 2, 3, 6, 8, 9]  # kept keys keep their RoPE phase
    ids = torch.tensor([[7, 8]])
    shared.extend(tiny_lm.model.get_input_embeddings()(ids), torch.ones(1, 2, dtype=torch.bool), ids,
                  SegmentKey("critic", "prompt"))
    assert shared.positions[0, -2:].tolist() == [first_new, first_new + 1]


class _Positions:
    """Records, at each hand-off (after the trim), row 0's positions, segments and the incoming prompt's length."""

    def __init__(self):
        self.seen = []

    def on_handoff(self, event):
        shared = event.shared
        real = shared.real_columns(0)
        self.seen.append((shared.positions[0, real].tolist(),
                          [shared.segments[i].agent for i in shared.segment_ids[0, real].tolist()],
                          int(event.prompt_mask[0].sum())))


@pytest.mark.parametrize("knn_positions", ["keep", "renumber"])
def test_knn_positions_setting_reaches_the_run(tiny_lm, fake_problems, knn_positions):
    cfg = tiny_config(knn_filter=True, knn_percentage=0.5, max_new_tokens=1, knn_positions=knn_positions)
    observer = _Positions()
    get_method("latent_mas")(tiny_lm, fake_problems()[:1], GSM8K, cfg, observer=observer)
    (first, _, critic_prompt), (second, agents, _) = observer.seen[:2]
    written = critic_prompt + cfg.latent_steps  # columns the critic wrote after the first trim
    start = {"keep": max(first) + 1, "renumber": len(first)}[knn_positions]
    critic = [p for p, agent in zip(second, agents) if agent == "critic"]
    # the second trim keeps a subset of them, always the newest (min_keep): the last latent step
    assert set(critic) <= set(range(start, start + written)) and critic[-1] == start + written - 1
    assert len(first) < max(first) + 1  # the first trim removed columns, so the two settings differ


@pytest.mark.parametrize("T, p", [(100, 0.29), (100, 0.57), (10, 0.7), (50, 0.8), (7, 0.3)])
def test_knn_count_is_floor_with_a_rounding_guard(T, p):
    """This project keeps floor(T·p + 1e-9); the fork int(T·p). They differ where T·p lands just under
    an integer in floating point: 100 · 0.29 = 28.999999999999996 (the fork keeps 28, this project 29)."""
    knn = KnnFilter(percentage=p, min_keep=0, strategy="top")
    kept = int(knn.keep_mask(torch.randn(1, T), torch.ones(1, T, dtype=torch.bool)).sum())
    assert kept == math.floor(T * p + 1e-9)
    assert (kept != int(T * p)) == ((T, p) in [(100, 0.29), (100, 0.57)])


# --------------------------------------------------------------------------- sampling


def test_top_k_follows_the_models_generation_config(tiny_lm):
    config = tiny_lm.model.generation_config
    saved = config.top_k
    try:
        config.top_k = 20
        assert top_k_of(tiny_lm, tiny_config()) == 20 == sampling_of(tiny_config(), tiny_lm).top_k
        assert top_k_of(tiny_lm, tiny_config(top_k=0)) == 0
        assert top_k_of(tiny_lm, tiny_config(top_k=3)) == 3
        config.top_k = None
        assert top_k_of(tiny_lm, tiny_config()) == 0
    finally:
        config.top_k = saved


def test_top_k_cuts_before_sampling():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 2.8]])
    draws = set()
    for seed in range(200):
        sampler = Sampler(Sampling(temperature=5.0, top_p=1.0, top_k=2), [torch.Generator().manual_seed(seed)])
        draws.add(int(sampler(logits)))
    assert draws == {1, 2}
    wide = {int(Sampler(Sampling(temperature=5.0, top_p=1.0), [torch.Generator().manual_seed(s)])(logits))
            for s in range(200)}
    assert wide == {0, 1, 2, 3, 4}


# --------------------------------------------------------------------------- datasets


def test_gpqa_reads_the_originals_lettered_copy():
    gpqa = get_task("gpqa")
    question = "Which is heavier?\nA. a feather\nB. a brick\nC. a leaf\nD. a hair"
    assert gpqa.parse_record({"question": question, "answer": "B"}) == (question, "B")
    for bad in ("E", "Bee", "a brick"):
        with pytest.raises(ValueError, match="option letter"):
            gpqa.parse_record({"question": question, "answer": bad})


def test_medqa_reads_the_originals_copy():
    """The shape of the original's data/medqa.json (content made up): options repeated inside the
    question, `options` as "A. text", `answer` the correct option's text."""
    options = ["A. Rest", "B. Surgery", "C. Antibiotics", "D. Observation"]
    record = {"question": "A patient has a fever.\n" + "\n".join(options) + "\n\n" + "\n".join(options),
              "options": options, "answer": "Antibiotics", "query": "ignored"}
    question, gold = get_task("medqa").parse_record(record)
    assert gold == "C" and question.count("Antibiotics") == 1 and question.startswith("A patient has a fever.")


# --------------------------------------------------------------------------- the noise-floor bench


def test_noise_floor_bench_runs_on_tiny_qwen3(tiny_lm_cache_env, tmp_path):
    import importlib.util
    from pathlib import Path

    from click.testing import CliRunner

    path = Path(__file__).resolve().parents[1] / "bench" / "noise_floor.py"
    spec = importlib.util.spec_from_file_location("noise_floor", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "noise.json"
    result = CliRunner().invoke(bench.main, ["--device", "cpu", "--problems", "2", "--batch_size", "2",
                                             "--latent_steps", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "By segment" in result.output and "By latent step" in result.output
    figures = json.loads(out.read_text())["figures"]
    repeats = [f for f in figures if f["comparison"] == "repeat"]
    assert repeats and all(f["mean"] == f["max"] == 0.0 for f in repeats)  # the CPU is reproducible
    steps = {(f["key"][0], f["key"][1]) for f in figures if f["table"] == "latent_step"}
    assert steps == {(agent, step) for agent in ("planner", "critic", "refiner") for step in (1, 2)}
    assert {f["comparison"] for f in figures} == {"repeat", "bs2", "fast"}
    bad = CliRunner().invoke(bench.main, ["--dtypes", "fp8"])
    assert bad.exit_code != 0 and "unknown dtype fp8" in bad.output
