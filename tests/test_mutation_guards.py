"""Behaviour of the templates, the MoE connector, VLAP, SEA, SIMA, WCA, the data report and the monitor that no test
guarded: each test names what would go wrong without it."""

from __future__ import annotations

import math

import pytest
import torch

from alignlm.constants import IGNORE_INDEX
from alignlm.data.templates import get_template, to_turns, tokenize
from tests.conftest import fake_monitor
from tests.test_templates import CONVERSATION, _tiny, _tiny_with_bos, supervised_segments


def test_plain_supervises_the_caption_stripped_as_its_exported_template_trims_it():
    """``plain`` strips the caption (its Jinja export writes ``m['content'] | trim``): kept as written, a caption's
    stray spaces and line breaks were tokens the model learnt to write, and training saw other text than the export."""
    tok = _tiny()
    conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "  A red square. \n"}]
    rendered = get_template("plain").render(to_turns(conv), tok)
    assert rendered.text == "<image>A red square.\n"
    assert rendered.contents == ((7, 7 + len("A red square."), "assistant"),)


def test_vicuna_writes_the_records_own_system_turn_in_place_of_its_default():
    """A record's system turn replaces ``vicuna_v1``'s default system prompt (as its export does): written with the
    default instead, the record's instructions were never seen, and its content span pointed at the default's text."""
    tok = _tiny()
    conv = [{"from": "system", "value": "Be terse."}, *CONVERSATION]
    rendered = get_template("vicuna_v1").render(to_turns(conv), tok)
    assert rendered.text.startswith("Be terse. USER: ")
    assert rendered.contents[0] == (0, len("Be terse."), "system")


def test_a_text_that_starts_with_the_bos_gets_no_second_one():
    """``tokenize`` puts the BOS first only where the text does not already start with it (a configured system prompt
    that begins with "<s>"): two BOS tokens are a sequence start the model never saw in pretraining."""
    tok = _tiny_with_bos()
    template = get_template("vicuna_v1", system=tok.bos_token + "A chat.")
    ids, labels = tokenize(template.render(to_turns(CONVERSATION), tok), tok)
    assert int((ids == tok.bos_token_id).sum()) == 1 and int(ids[0]) == tok.bos_token_id


SPACED_END = (  # an answer, a space, then its end-of-turn token; the EOS after the last turn (as Phi-3 writes it)
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + ' <|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def _end_token(tok):
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]}, replace_extra_special_tokens=False)
    return tok


def test_an_answer_ends_at_the_control_token_that_follows_it_past_whitespace():
    """The supervised end of an answer is the control token after it, past the template's whitespace: looked for
    right at the answer's end, a space before ``<|end|>`` hid it, and the last answer learnt to write the EOS that only
    ends a whole conversation too."""
    tok = _end_token(_tiny())
    tok.chat_template = SPACED_END
    ids, labels = tokenize(get_template("chat").render(to_turns(CONVERSATION), tok), tok)
    assert tok.convert_ids_to_tokens(int(ids[-1])) == tok.eos_token and labels[-1] == IGNORE_INDEX
    segments = supervised_segments(ids, labels, tok)
    assert len(segments) == 2 and all(s.endswith("<|end|>") for s in segments)


def test_whitespace_after_a_turns_closing_control_token_is_not_supervised():
    """Where the template writes text between the answer and its closing control token, the span ends at that token:
    the line break the template writes after it is its own, not the model's to learn."""
    tok = _end_token(_tiny())
    tok.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '\\n---<|end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    )
    ids, labels = tokenize(get_template("chat").render(to_turns(CONVERSATION), tok), tok)
    segments = supervised_segments(ids, labels, tok)
    assert len(segments) == 2 and all(s.endswith("---<|end|>") for s in segments)
    assert labels[-1] == IGNORE_INDEX


def test_a_chat_template_that_trims_message_contents_is_located_by_the_trimmed_text():
    """Templates that write ``content | trim`` (Llama-2 strips them) are supported: a question with a trailing space
    is found trimmed; looked up only as written, such a record was refused as one the template changes."""
    from alignlm.models.tokenizer import CHATML

    tok = _tiny()
    tok.chat_template = CHATML.replace("message['content']", "(message['content'] | trim)")
    conv = [{"from": "human", "value": "Is it even or odd?  "}, {"from": "gpt", "value": "odd"}]
    rendered = get_template("chat").render(to_turns(conv), tok)
    start, end, role = rendered.contents[0]
    assert role == "user" and rendered.text[start:end] == "Is it even or odd?"


def _skewed_moe(**kwargs):
    from alignlm.models.connectors import MoEConnector

    torch.manual_seed(0)
    moe = MoEConnector(6, 5, num_experts=4, top_k=2, **kwargs)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 5.0  # feature 0 > 0 sends tokens to expert 0
    return moe, torch.randn(4, 32, 6).abs()


def test_moe_capacity_rounds_up_so_the_experts_take_at_least_the_factors_share():
    """``capacity`` is ``ceil(factor * T * k / E)``: rounded down, 1.1 x 128 x 2 / 4 = 70.4 gave 70, and a factor of 1
    over a token count that is no multiple of E / k left the experts too few slots for every token's top_k."""
    moe, _ = _skewed_moe(capacity_factor=1.1, eval_capacity_factor=1.0)
    assert moe.capacity(128) == 71
    moe.eval()
    assert moe.capacity(10) == 5 and moe.capacity(11) == 6


def test_moe_balance_loss_under_a_capacity_cap_measures_the_routers_own_preference():
    """The balance loss reads the router's top-1 choice before the cap moves tokens: read off the capped routing it saw
    a balanced load while the router still sent every token to one expert, and the router stopped learning to spread."""
    from alignlm.models.connectors.moe import balance_loss

    moe, x = _skewed_moe(capacity_factor=1.1)
    out = moe(x)
    _, probs, _, experts = moe.route(x.reshape(-1, 6))
    assert not torch.equal(experts[:, 0], probs.argmax(-1))  # the cap moved some tokens' first expert
    expected = moe.balance_weight * balance_loss(probs, probs.argmax(-1), groups=4)
    torch.testing.assert_close(out.aux_losses["moe_balance"], expected)


def test_moe_rerouted_is_the_share_of_slots_moved_off_the_routers_choice():
    """``moe_rerouted`` is the share of (token, slot) pairs the cap moved, not the share kept: inverted, a cap that
    moved a few tokens logged as moving most of them."""
    moe, x = _skewed_moe(capacity_factor=1.1)
    out = moe(x)
    _, probs, _, experts = moe.route(x.reshape(-1, 6))
    preferred = probs.topk(2, -1).indices
    moved = 1 - (experts[:, :, None] == preferred[:, None, :]).any(-1).float().mean()
    assert 0 < float(moved) < 0.5
    assert float(out.metrics["moe_rerouted"]) == pytest.approx(float(moved))


def test_vlap_pred_agree_compares_the_images_prediction_with_the_captions_assignment():
    """``pred_agree`` is how often the image's predicted word is the caption's assigned word (the swapped target the
    loss trains): compared with the image's own assignment it read 1 while image and caption meant different words."""
    from alignlm.objectives.vlap import vlap_loss

    words = torch.eye(4)
    _, apart = vlap_loss(words[[0, 2]], words[[1, 3]], words, None)
    _, together = vlap_loss(words[[0, 2]], words[[0, 2]], words, None)
    assert apart["pred_agree"].item() == 0.0 and apart["assign_agree"].item() == 0.0
    assert together["pred_agree"].item() == 1.0


def test_sea_samples_each_tokens_label_among_its_first_k_candidates(tiny_model):
    """The objective reads the first ``k`` candidates of each token: one fewer, ``k=1`` had no candidate at all and
    ``k=2`` could never draw the second, whatever its score."""
    from alignlm.methods.sea.objective import SEAObjective, sea_loss
    from tests.conftest import make_batch

    torch.manual_seed(0)
    model = tiny_model()
    batch = make_batch(model, [1, 2])
    m = model.num_image_tokens
    even = torch.arange(m) % 2 == 0  # even tokens' candidates: words 0, 1, 2; odd tokens': 2, 0, 1
    words = torch.where(even[:, None], torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1])).expand(3, m, 3).clone()
    scores = torch.tensor([0.0, 1.0, 9.0]).expand(3, m, 3).clone()
    batch["sea_words"], batch["sea_scores"] = words, scores
    out = model(batch)
    visual = out.visual_tokens.detach().flatten(0, 1)
    obj = SEAObjective(k=2, t_sample=1e-3)  # the second candidate always wins among the first two
    obj.set_words(model, ["red", "green", "blue"])
    second = torch.where(even, 1, 0).repeat(3)
    expected, _ = sea_loss(visual, second, obj.word_emb, obj.tau)
    term = obj(batch, out, model)
    assert expected.item() > 0 and term.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    one = SEAObjective(k=1, t_sample=1e-3)
    one.set_words(model, ["red", "green", "blue"])
    expected_first, _ = sea_loss(visual, torch.where(even, 0, 2).repeat(3), one.word_emb, one.tau)
    assert one(batch, out, model).loss.item() == pytest.approx(expected_first.item(), rel=1e-5)


def test_sea_counts_an_image_labelled_only_with_word_0_as_labelled():
    """``sea_labelled`` counts the images with any candidate, word id 0 included (-1 is none): counted as unlabelled,
    a micro-batch whose images all drew the first word of the list trained nothing and measured no accuracy."""
    from alignlm.methods.sea.hook import SeaLabelHook

    hook = SeaLabelHook.__new__(SeaLabelHook)  # collate reads nothing of the labels file
    labelled = {"sea_words": torch.zeros(1, 4, 2, dtype=torch.long), "sea_scores": torch.ones(1, 4, 2)}
    none = {"sea_words": torch.full((2, 4, 2), -1), "sea_scores": torch.zeros(2, 4, 2)}
    fields = hook.collate([labelled, none])
    assert fields["sea_labelled"] == 1 and fields["sea_words"].shape == (3, 4, 2)


def test_sea_labels_that_label_none_of_the_stages_images_fail_at_start_up():
    """A labels file made for other images labels none of the stage's: bound anyway, the stage trained SEA on no
    label at all (a zero loss every step) and said nothing."""
    from types import SimpleNamespace

    from alignlm.data.records import DataError
    from alignlm.methods.sea.hook import SeaLabelHook

    hook = SeaLabelHook.__new__(SeaLabelHook)
    hook.labels = SimpleNamespace(path="other.safetensors", check_aspect_ratio=lambda *a: None, coverage=lambda v: 0)
    dataset = SimpleNamespace(
        sources=[SimpleNamespace(path="data.json")],
        distinct_records=lambda: iter([(None, "r0", {}), (None, "r1", {})]),
        visual_inputs=lambda src, rec: ["a.png"],
    )
    with pytest.raises(DataError, match="label none of the images"):
        hook.bind(dataset)
    hook.labels.coverage = lambda v: 1
    hook.bind(dataset)


def test_sima_reads_the_replies_less_every_end_of_turn_token_they_share():
    """``answer_tokens`` drops all the trailing tokens "A" and "B" share: a template that ends a turn in two line
    breaks (``### Assistant: A\\n\\n``) left one of them on each reply, and the judge scored two-token replies."""
    from alignlm.methods.sima.generate import answer_tokens
    from tests.test_templates import THREE_HASH

    tok = _tiny()
    tok.chat_template = THREE_HASH
    a, b = answer_tokens(tok, {"template": "chat"})
    assert (a, b) == (tok.encode("A", add_special_tokens=False), tok.encode("B", add_special_tokens=False))


def _row_image(width: int, height: int):
    """A greyscale image whose every pixel is its row's number: a crop's first pixel tells its top row."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.repeat(np.arange(height, dtype=np.uint8)[:, None], width, axis=1), mode="L")


def test_wca_crops_of_a_tall_image_start_anywhere_down_its_height():
    """A crop's top row is drawn over the image's height, not its width: drawn over the width, the crops of a portrait
    image all came from its top part and its lower half was never looked at."""
    import numpy as np

    from alignlm.methods.wca.score import random_crops

    crops = random_crops(_row_image(10, 100), 200, (0.5, 0.5), np.random.default_rng(0))
    tops = [c.getpixel((0, 0)) for c in crops]
    assert all(c.size == (5, 50) for c in crops)
    assert max(tops) > 40 and all(0 <= t <= 50 for t in tops)


def test_wca_crop_sizes_are_drawn_across_the_scale_range():
    """Each crop's side is a uniform share within ``scale``: taken at the top of the range, every crop had one size and
    the local views WCA weighs were all alike."""
    import numpy as np

    from alignlm.methods.wca.score import random_crops

    sizes = {c.size for c in random_crops(_row_image(100, 100), 50, (0.2, 0.9), np.random.default_rng(0))}
    assert len(sizes) > 10 and min(s[0] for s in sizes) < 40 and max(s[0] for s in sizes) > 70


def test_wca_zero_shot_scores_wca_accuracy_by_the_wca_scores(monkeypatch):
    """``wca`` and ``wca_right`` come from the WCA scores, ``plain`` from the plain ones: read off the plain scores, the
    report showed no difference between the two methods whatever the crops and descriptions did."""
    from alignlm.methods.wca import score as wca_score

    monkeypatch.setattr(wca_score, "class_texts", lambda *a, **k: (None, None))
    plain, wca = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])  # plain picks class 0, WCA class 1
    monkeypatch.setattr(wca_score, "scores", lambda *a: (plain, wca))
    got = wca_score.zero_shot(None, [object(), object()], [1, 1], ["a", "b"], [["a"], ["b"]])
    assert got["plain"] == 0.0 and got["wca"] == 1.0 and got["wca_right"] == [1.0, 1.0]


def test_a_data_report_keeps_a_record_once_among_its_examples():
    """A record left out twice under one cause (two reasons) is one example: listed twice, it took the place of
    another record the user needed to see."""
    from alignlm.data.report import DataReport

    report = DataReport()
    for record_id in ("r0", "r1", "r1", "r2"):
        report.add("malformed record", record_id)
    assert report.counts == {"malformed record": 4} and report.examples == {"malformed record": ["r0", "r1", "r2"]}


def test_a_data_report_merge_keeps_at_most_its_few_examples_per_cause():
    """Merging the ranks' reports keeps ``EXAMPLES`` record ids per cause, as ``add`` does: merged without the bound,
    eight ranks' examples made a cause's line in the log and the stage table name 24 records."""
    from alignlm.data.report import EXAMPLES, DataReport

    first, second = DataReport(), DataReport()
    for i in range(EXAMPLES):
        first.add("missing image", f"a{i}")
        second.add("missing image", f"b{i}")
    merged = first.merge(second)
    assert merged.counts["missing image"] == 2 * EXAMPLES
    assert merged.examples["missing image"] == [f"a{i}" for i in range(EXAMPLES)]


def test_the_monitor_skips_a_measurement_whose_layer_features_are_not_finite(monkeypatch, alignlm_log):
    """Per-layer features are checked as the pooled ones are: a NaN in one layer's features reached the metrics, which
    refuse it, and the diagnostic ended the run."""
    from types import SimpleNamespace

    from alignlm.training import monitor

    finite = torch.zeros(2, 3)
    features = SimpleNamespace(
        visual_mean=finite, text_mean=finite, a_scores=None, layers={"llm.1": (finite, torch.full((2, 3), math.nan))}
    )
    monkeypatch.setattr(monitor, "extract", lambda *args: features)
    monkeypatch.setattr(monitor, "probe_metrics", lambda *args, **kwargs: {})
    monkeypatch.setattr(monitor, "flat", lambda values: {"pooled/cka": 0.5})
    assert monitor.AlignmentMonitor.__call__(fake_monitor(), 1, torch.nn.Linear(1, 1)) == {}
    assert "not finite" in alignlm_log.text


def test_a_monitor_measurement_skipped_for_a_damaged_image_restarts_the_time_share_clock(monkeypatch):
    """A skipped measurement ends where the next one's ``time_share`` starts, as a finished one does: otherwise the next
    share was measured over the time since an older measurement and understated the monitor's cost."""
    from alignlm.data.records import DataError
    from alignlm.training import monitor

    clock = iter([10.0, 11.0])  # the attempt starts at 10 s and gives up at 11 s

    def damaged(*args):
        raise DataError("image 0.png is damaged")

    monkeypatch.setattr(monitor.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(monitor, "extract", damaged)
    fake = fake_monitor()
    assert monitor.AlignmentMonitor.__call__(fake, 1, torch.nn.Linear(1, 1)) == {}
    assert fake.last == 11.0
