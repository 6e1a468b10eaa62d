"""The latent readout: what the model would say next at each latent step, as the capture stores it.

Checked against an independent loop (the prompt prefills and latent steps rerun here with
`SharedCache.extend` and `LatentInput`, the LM head and softmax applied to the hidden states
they return), across batch sizes, on and off, and against greedy decoding.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from captures import assert_same_handoffs, solve_and_capture, tiny_config

from capture.format import CaptureError, CaptureReader, CaptureWriter, Handoff, LatentReadout, ProblemRecord

LATENT_HANDOFF = "refiner_to_judger"  # reads every non-judger agent's latent columns


def _reference(lm, problem, cfg):
    """Per non-judger agent, rerun alone (batch of one): the greedy first token after its prompt on the
    shared cache, and each latent step's softmax over the vocabulary and realigned input.

    Returns {agent: (greedy_id, probs [steps, vocab], fed [steps, hidden])}.
    """
    import torch

    from latentmas.methods.common import encode, thinking_of
    from latentmas.prompts import AGENTS, agent_prompt
    from latentmas.realign import LatentInput
    from latentmas.shared_cache import LATENT, SegmentKey, SharedCache
    from latentmas.tasks import get_task

    task = get_task(cfg.task)
    shared = SharedCache(lm, 1)
    latent_input = LatentInput(lm, cfg.latent_space_realign)
    embed = lm.model.get_input_embeddings()
    ones = torch.ones(1, 1, dtype=torch.bool)
    latent_ids = torch.full((1, 1), LATENT, dtype=torch.long)
    result = {}
    with torch.no_grad():
        for agent in AGENTS[:-1]:
            prompt = agent_prompt(agent, problem.question, task.answer_instruction, cfg.prompt, "latent_mas")
            _, ids, mask = encode(lm, [prompt], thinking_of(cfg))
            with shared.restored():
                greedy = int(shared.extend(embed(ids), mask, ids, SegmentKey(agent, "prompt"), logits=True).argmax())
            hidden = shared.extend(embed(ids), mask, ids, SegmentKey(agent, "prompt"))
            probs, fed = [], []
            for _ in range(cfg.latent_steps):
                probs.append(torch.softmax(lm.model.lm_head(hidden).float(), dim=-1)[0])
                fed.append(latent_input(hidden)[0])
                hidden = shared.extend(fed[-1][None, None, :], ones, latent_ids, SegmentKey(agent, "latent"))
            result[agent] = (greedy, torch.stack(probs), torch.stack(fed))
    return result


def _latent_readouts(path, number):
    """{agent: (ids [steps, k], probs [steps, k], entropy [steps], cosine [steps], nearest tokens)} of a problem."""
    with CaptureReader(path) as capture:
        handoff = capture.handoff(number, LATENT_HANDOFF)
    out = {}
    for segment in handoff.segments:
        if segment.kind == "latent":
            cols = slice(segment.start, segment.stop)
            r = handoff.readout
            out[segment.agent] = (r.ids[cols], r.probs[cols], r.entropy[cols], r.realign_cosine[cols],
                                  r.realign_token[cols], r.step[cols])
    return out


@pytest.mark.parametrize("fast, realign", [(False, False), (True, True)])  # plain and static steps
def test_readout_equals_an_independent_recomputation(tiny_lm, fake_problems, tmp_path, fast, realign):
    import torch

    cfg = tiny_config(fast_decode=fast, latent_space_realign=realign)
    problems = fake_problems()
    solve_and_capture(tiny_lm, problems, cfg, tmp_path / "run.h5", batch_size=3)
    weight = tiny_lm.model.get_input_embeddings().weight.float()
    for problem in problems:
        stored = _latent_readouts(tmp_path / "run.h5", problem.number)
        reference = _reference(tiny_lm, problem, cfg)
        assert sorted(stored) == sorted(reference) and stored
        for agent, (greedy, probs, fed) in reference.items():
            ids, top_probs, entropy, cosine, nearest, steps = stored[agent]
            np.testing.assert_array_equal(steps, np.arange(cfg.latent_steps))
            assert ids.shape == (cfg.latent_steps, cfg.readout_top_k)
            want_probs, want_ids = probs.topk(cfg.readout_top_k, dim=-1)
            np.testing.assert_array_equal(ids, want_ids.numpy())
            np.testing.assert_allclose(top_probs, want_probs.numpy(), atol=1e-5, rtol=0)
            want_entropy = -(probs * probs.log()).sum(dim=-1)
            np.testing.assert_allclose(entropy, want_entropy.numpy(), atol=1e-4, rtol=0)
            assert ids[0, 0] == greedy  # greedy consistency: the first latent column reads the prompt's next token
            if realign:
                cosines = torch.nn.functional.cosine_similarity(fed.float()[:, None, :], weight[None], dim=-1)
                best, best_id = cosines.max(dim=-1)
                np.testing.assert_allclose(cosine, best.numpy(), atol=1e-5, rtol=0)
                assert nearest == [tiny_lm.tokenizer.decode([int(i)]) for i in best_id]
            else:
                assert np.isnan(cosine).all() and nearest == [""] * cfg.latent_steps


def test_readout_is_batch_independent(tiny_lm, fake_problems, tmp_path):
    cfg = tiny_config()
    problems = fake_problems()
    solve_and_capture(tiny_lm, problems, cfg, tmp_path / "one.h5", batch_size=1)
    solve_and_capture(tiny_lm, problems, cfg, tmp_path / "three.h5", batch_size=3)
    for problem in problems:
        with CaptureReader(tmp_path / "one.h5") as one, CaptureReader(tmp_path / "three.h5") as three:
            for a, b in zip(one.handoffs(problem.number), three.handoffs(problem.number)):
                assert a.readout.has.sum() > 0
                np.testing.assert_array_equal(a.readout.ids, b.readout.ids)
                assert a.readout.tokens == b.readout.tokens
                np.testing.assert_allclose(a.readout.probs, b.readout.probs, atol=1e-5, rtol=0)
                np.testing.assert_allclose(a.readout.entropy, b.readout.entropy, atol=1e-4, rtol=0)


def test_readout_changes_neither_matrices_nor_predictions(tiny_lm, fake_problems, tmp_path):
    problems = fake_problems()
    on = solve_and_capture(tiny_lm, problems, tiny_config(readout_top_k=3), tmp_path / "on.h5", batch_size=3)
    off = solve_and_capture(tiny_lm, problems, tiny_config(readout_top_k=0), tmp_path / "off.h5", batch_size=3)
    assert [r.prediction for r in on] == [r.prediction for r in off]
    assert_same_handoffs(tmp_path / "on.h5", tmp_path / "off.h5")
    with CaptureReader(tmp_path / "on.h5") as capture:
        assert capture.readout_top_k == 3
        handoff = capture.handoff(1, LATENT_HANDOFF)
        assert handoff.readout.ids.shape[1] == 3
        latent = np.array([t == "<latent>" for t in handoff.tokens])
        np.testing.assert_array_equal(handoff.readout.has, latent)  # exactly the latent columns
    with CaptureReader(tmp_path / "off.h5") as capture:
        assert capture.readout_top_k == 0 and capture.handoff(1, LATENT_HANDOFF).readout is None


def test_readout_survives_knn_trims(tiny_lm, fake_problems, tmp_path):
    """Kept latent columns keep their step's readout, whatever the trim (positions renumbered or not)."""
    problems = fake_problems()
    solve_and_capture(tiny_lm, problems, tiny_config(), tmp_path / "plain.h5", batch_size=3)
    cfg = tiny_config(knn_filter=True, knn_percentage=0.5, knn_min_keep=2, knn_positions="renumber")
    solve_and_capture(tiny_lm, problems, cfg, tmp_path / "knn.h5", batch_size=3)
    with CaptureReader(tmp_path / "plain.h5") as plain, CaptureReader(tmp_path / "knn.h5") as knn:
        planner = plain.handoff(1, "planner_to_critic")  # the first hand-off is trimmed after the same steps
        trimmed = knn.handoff(1, "planner_to_critic")
        by_position = {int(p): i for i, p in enumerate(planner.positions)}
        checked = 0
        for column in np.flatnonzero(trimmed.readout.has):
            same = by_position[int(trimmed.positions[column])]
            np.testing.assert_array_equal(trimmed.readout.ids[column], planner.readout.ids[same])
            assert trimmed.readout.step[column] == planner.readout.step[same]
            checked += 1
        assert checked > 0
        np.testing.assert_array_equal(trimmed.readout.has, [t == "<latent>" for t in trimmed.tokens])


def _handoff(width=4, readout=None):
    return Handoff("planner", "critic", np.zeros((2, width), np.float32), np.arange(width), ["a"] * width,
                   readout=readout)


def _readout(width=4):
    readout = LatentReadout.empty(width, 2)
    readout.step[1] = 0
    readout.ids[1] = [7, 3]
    readout.tokens[1] = ["x", "y"]
    readout.probs[1] = [0.5, 0.25]
    readout.entropy[1] = 1.5
    return readout


def test_schema_1_files_read_without_readout(tmp_path):
    path = tmp_path / "old.h5"
    with CaptureWriter.open(path, {}, {"a": 1}, num_layers=2) as writer:
        writer.append(ProblemRecord(1, "q", "1", "1", True, [_handoff()]))
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 1
    with CaptureReader(path) as capture:
        assert capture.readout_top_k == 0 and capture.handoffs(1)[0].readout is None


def test_readout_round_trip_and_refusals(tmp_path):
    path = tmp_path / "new.h5"
    with CaptureWriter.open(path, {}, {"a": 1}, num_layers=2, readout_top_k=2) as writer:
        writer.append(ProblemRecord(1, "q", "1", "1", True, [_handoff(readout=_readout()), _handoff(width=3)]))
    with CaptureReader(path) as capture:
        assert capture.attrs["schema_version"] == 3
        first, second = capture.handoffs(1)
        np.testing.assert_array_equal(first.readout.ids, _readout().ids)
        assert first.readout.tokens[1] == ["x", "y"] and first.readout.tokens[0] == ["", ""]
        np.testing.assert_array_equal(first.readout.probs[1], [0.5, 0.25])
        assert not second.readout.has.any()  # a hand-off written without one has none
    with CaptureWriter.open(path, {}, {"a": 1}, num_layers=2) as writer:  # a resume keeps the file's k
        assert writer.readout_top_k == 2
        with pytest.raises(CaptureError, match=r"readout ids is \[4, 3\], not \[4, 2\]"):
            writer.append(ProblemRecord(2, "q", "1", "1", True, [_handoff(readout=LatentReadout.empty(4, 3))]))
    with CaptureWriter.open(tmp_path / "none.h5", {}, {}, num_layers=2) as writer:
        with pytest.raises(CaptureError, match="keeps none"):
            writer.append(ProblemRecord(1, "q", "1", "1", True, [_handoff(readout=_readout())]))
    with h5py.File(path, "r+") as f:
        del f["readout/prob"]
    with pytest.raises(CaptureError, match="part of a latent readout"):
        CaptureReader(path)
    with h5py.File(path, "r+") as f:
        f["readout"].create_dataset("prob", data=np.zeros((2, 1), dtype="S3"))
    with pytest.raises(CaptureError, match="/readout/prob holds"):
        CaptureReader(path)


def test_readout_and_info_commands(tiny_lm, fake_problems, tmp_path):
    from click.testing import CliRunner

    from render.info import info_command
    from render.readout import readout_command

    problems = fake_problems()[:2]
    solve_and_capture(tiny_lm, problems, tiny_config(), tmp_path / "run.h5", batch_size=2)
    with CaptureReader(tmp_path / "run.h5") as capture:
        first = capture.handoff(1, "planner_to_critic").readout
        top = [first.tokens[c][0] for c in range(len(first.ids)) if first.has[c]]
    runner = CliRunner()
    info = runner.invoke(info_command, [str(tmp_path / "run.h5"), "--problem", "1"])
    assert info.exit_code == 0, info.output
    line = next(x for x in info.output.splitlines() if "planner latent:" in x)
    assert line.count("→") == 2 and len(top) == 3
    table = runner.invoke(readout_command, [str(tmp_path / "run.h5"), "--problems", "2", "--csv",
                                            str(tmp_path / "steps.csv")])
    assert table.exit_code == 0, table.output
    rows = table.output.splitlines()[1:]
    assert len(rows) == 9 and all(r.split()[0] == "2" for r in rows)  # 3 agents x 3 steps of problem 2
    import csv

    with open(tmp_path / "steps.csv", encoding="utf-8") as f:
        records = list(csv.DictReader(f))
    assert [(r["agent"], r["step"]) for r in records[:4]] == [("planner", "0"), ("planner", "1"), ("planner", "2"),
                                                                ("critic", "0")]
    assert {f"token_{i}" for i in range(1, 6)} <= set(records[0])
    assert float(records[0]["prob_1"]) >= float(records[0]["prob_2"])
    missing = runner.invoke(readout_command, [str(tmp_path / "run.h5"), "--problems", "7"])
    assert missing.exit_code != 0 and "no problem 7" in missing.output
    solve_and_capture(tiny_lm, problems[:1], tiny_config(readout_top_k=0), tmp_path / "off.h5")
    off = runner.invoke(readout_command, [str(tmp_path / "off.h5")])
    assert off.exit_code != 0 and "no latent readout" in off.output


def test_figure_labels_and_viewer_show_the_readout():
    from render.kinds.base import column_labels
    from render.viewer.data import encode_handoff

    handoff = _handoff(readout=_readout())
    assert column_labels(handoff) == ["a", "[x]", "a", "a"]
    assert column_labels(_handoff()) == ["a"] * 4
    encoded = encode_handoff(handoff, "seed")["readout"]
    assert encoded[0] is None and encoded[1] == {"tokens": ["x", "y"], "probs": [0.5, 0.25], "entropy": 1.5}
    assert "readout" not in encode_handoff(_handoff(), "seed")


def _wide_handoff(steps=10, prompt=290, tops=None):
    """Two agents' prompt and latent columns (600 with the defaults: too many for token labels), the latent
    columns read as `tops` (one per step, the same for both agents)."""
    from capture.format import Segment

    tops = tops or [f"t{i}" for i in range(steps)]
    width = 2 * (prompt + steps)
    readout = LatentReadout.empty(width, 2)
    segments = []
    for i, agent in enumerate(("planner", "critic")):
        start = i * (prompt + steps)
        segments += [Segment(agent, "prompt", start, start + prompt),
                     Segment(agent, "latent", start + prompt, start + prompt + steps)]
        for step, column in enumerate(range(start + prompt, start + prompt + steps)):
            readout.step[column], readout.ids[column] = step, [step, 0]
            readout.tokens[column] = [tops[step], "other"]
    return Handoff("planner", "critic", np.zeros((3, width), np.float32), np.arange(width), ["a"] * width,
                   segments, readout)


def test_segment_band_carries_the_readout_where_token_labels_do_not_fit():
    from render.batch import RenderOptions
    from render.colormaps import ModeScale
    from render.kinds import get_kind

    hostile = ["$x^2$", "\\undefinedcmd", "$\\qq$", " the", "\n", "+", "7", "8", "9", "10"]
    handoff = _wide_handoff(tops=hostile)
    mode = ModeScale.of({})
    for kind in ("multi", "single"):
        fig = get_kind(kind).draw(handoff, title="t", mode=mode, cmap=None, options=RenderOptions(token_labels=True))
        strip = fig.render_info.readout_strip
        assert len(strip) == 2 and strip[0] == strip[1], strip  # one per latent segment
        assert strip[0] == "$x^2$·\\undefi…·$\\qq$· the·↵·+·7·8·9·10", strip  # each token cut to 8 characters
        drawn = [t for t in fig.axes[0].texts if t.get_text() in strip]
        assert len(drawn) == 2 and not any(t.get_usetex() for t in drawn)
        fig.canvas.draw()  # mathtext would fail on $\qq$ (an unknown command); drawn as text it does not
        plain = get_kind(kind).draw(handoff, title="t", mode=mode, cmap=None, options=RenderOptions())
        assert plain.render_info.readout_strip == ()  # only when --token-labels was asked for
    narrow = _wide_handoff(prompt=20)  # 60 columns: the labels fit and carry the readout themselves
    fig = get_kind("multi").draw(narrow, title="t", mode=mode, cmap=None, options=RenderOptions(token_labels=True))
    assert fig.render_info.readout_strip == () and fig.render_info.layout.token_labels
    assert "[t0]" in [t.get_text() for t in fig.axes[0].get_xticklabels()]


def test_readout_strip_keeps_to_its_room():
    from render.figures import readout_strip_texts
    from render.layout import text_width_in

    handoff = _wide_handoff(tops=[f"token{i}" for i in range(10)])
    tokens = [r[0] if has else "" for r, has in zip(handoff.readout.tokens, handoff.readout.has)]
    roomy = readout_strip_texts(handoff.segments, tokens, plot_w_in=20.0)
    assert [text for _, text in roomy] == ["·".join(f"token{i}" for i in range(10))] * 2
    assert roomy[0][0] == 294.5  # centred on the first latent segment (columns 290..299)
    for plot_w_in, texts in ((20.0, roomy), (3.0, readout_strip_texts(handoff.segments, tokens, plot_w_in=3.0))):
        per_column = plot_w_in / 600
        extents = [((x + 0.5) * per_column - text_width_in(t, 6) / 2, (x + 0.5) * per_column + text_width_in(t, 6) / 2)
                   for x, t in texts]
        assert len(extents) == 2 and 0 <= extents[0][0] and extents[0][1] < extents[1][0] and extents[1][1] <= plot_w_in
    tight = readout_strip_texts(handoff.segments, tokens, plot_w_in=3.0)
    assert all(text.endswith("…") for _, text in tight)
    assert readout_strip_texts(handoff.segments, tokens, plot_w_in=0.1) == []  # no room: none


@pytest.mark.parametrize("realign", [False, True])
def test_readout_in_chunks_equals_the_readout_at_once(tiny_lm, monkeypatch, realign):
    """The LM head runs over a few steps at a time (bounded memory); the result is the all-at-once one."""
    import torch

    from capture import readout

    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn(3, 5, tiny_lm.hidden_size, generator=generator)
    fed = torch.randn(3, 5, tiny_lm.hidden_size, generator=generator) if realign else None
    at_once = readout.latent_readout(tiny_lm, hidden, fed, top_k=4)
    vocab = tiny_lm.model.get_output_embeddings().weight.shape[0]
    assert readout.CHUNK_ELEMENTS // vocab >= 15  # one chunk above
    monkeypatch.setattr(readout, "CHUNK_ELEMENTS", 2 * vocab)  # two steps per chunk: 8 chunks, the last one short
    chunked = readout.latent_readout(tiny_lm, hidden, fed, top_k=4)
    assert chunked.shape == at_once.shape == (3, 5, readout.packed_width(4))
    torch.testing.assert_close(chunked, at_once, atol=1e-6, rtol=1e-6, equal_nan=True)
    assert torch.isnan(chunked[..., -1]).all() != realign  # the nearest-token column is filled with realignment
