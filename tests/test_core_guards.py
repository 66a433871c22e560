"""Guards on core behaviour of the alignment metrics, the collator, the chunked LM loss, weight I/O and step
checkpoints that the other test files leave unchecked: boundaries, tie handling, refusals and bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from alignlm.constants import IGNORE_INDEX
from alignlm.data.collate import Collator, index_fields, sample_means
from alignlm.geometry import metrics as M
from alignlm.models.io import (
    check_fits,
    final_parts,
    final_stage,
    load_part_state,
)
from alignlm.models.lm_loss import head_transform, linear_cross_entropy, linear_token_nll, linear_weight, scalar_problem
from alignlm.training import checkpoint as ckpt
from tests.test_durable_writes import written_step

# ---------------------------------------------------------------------------------------------- alignment metrics


def test_ranked_neighbour_lists_put_a_clearly_nearer_item_before_tied_ones():
    """Item 0's nearest neighbour is item 3 (cosine 0.71), then items 1 and 2 tie (cosine 0): its list with k = 2
    is [3, 1], the tie going to the lower index. Taking the lowest indices among everything at or above the k-th value
    would drop the clearly nearer item whenever it came after tied ones in the listing, and the cycle, LCS and
    edit-distance metrics would score lists that are not the nearest neighbours."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [1.0, 1.0]], dtype=torch.float64)
    knn, _ = M.knn_lists(x, x, topk=2, preprocess=False)
    assert knn[0].tolist() == [3, 1]


def test_near_duplicate_captions_tie_like_exact_duplicates():
    """Copies of a caption embedded in different batches differ by rounding (1e-12 here): they tie for a neighbour
    slot within the tolerance, as exact copies do, so mutual kNN and CKNNA give the exact copies' values. Counting
    only the exact ties as the slot's candidates would give each near-copy a whole slot (mutual kNN 0.375, not
    0.271)."""
    g = torch.Generator().manual_seed(0)
    captions = torch.randn(6, 8, generator=g, dtype=torch.float64)
    images = torch.randn(12, 8, generator=g, dtype=torch.float64)
    exact = captions.repeat_interleave(2, 0)
    near = exact.clone()
    near[1::2, 0] += 1e-12
    for metric in (M.mutual_knn, M.cknna):
        assert metric(images, near, topk=2) == pytest.approx(metric(images, exact, topk=2), abs=1e-9)


def test_cknna_with_two_candidates_for_each_tied_slot_is_a_number():
    """Each vertex of an octahedron (lifted off the origin) has four neighbours tied for its two slots, a share of one
    half each: a tie, not a representation whose slots are mostly undecided (shares under one half), so identical
    features score 1 rather than nan."""
    vertices = torch.cat([torch.eye(3), -torch.eye(3)]).double()
    x = torch.cat([vertices, torch.ones(6, 1, dtype=torch.float64)], dim=1)
    assert M.cknna(x, x, topk=2) == pytest.approx(1.0, abs=1e-12)


def test_cknna_refuses_a_single_neighbour():
    """CKNNA's masked kernels need at least two neighbours per item; topk = 1 is refused, naming topk, rather than
    returning a number from a mask too thin to centre."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g)
    with pytest.raises(ValueError, match="topk >= 2"):
        M.cknna(a, b, topk=1)


def test_unbiased_cka_refuses_fewer_than_four_items():
    """The unbiased HSIC averages over quadruples of distinct items and divides by n (n - 3): three items have none,
    and the estimator would divide by zero, so it is refused by name rather than returning inf or nan."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    with pytest.raises(ValueError, match="at least 4 items"):
        M.unbiased_cka(a, b)


def test_cknna_of_spaces_sharing_no_neighbours_is_zero():
    """Eight items on a circle, listed in steps of three around it in the second space: no item has a neighbour in
    common in the two spaces, so the jointly masked kernel is all zeros and CKNNA is 0, the least alignment, not nan
    (the no-spread test belongs to a kernel's HSIC with itself, never to the cross term)."""
    n = 8
    angle = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    a = torch.stack([angle.cos(), angle.sin()], dim=1)
    place = torch.empty(n, dtype=torch.long)
    place[torch.tensor([(3 * i) % n for i in range(n)])] = torch.arange(n)
    b = a[place]
    assert M.mutual_knn(a, b, topk=2) == 0.0
    assert M.cknna(a, b, topk=2) == 0.0


def test_rbf_median_bandwidth_averages_the_two_middle_distances():
    """Four items at 0, 1, 3, 7 (and 0, 2, 3, 9): their 16 squared distances have the middle pair 4 and 9, so the
    median heuristic's bandwidth is 6.5 (numpy's median), not the upper middle value 9, which would move rbf CKA by
    4e-3."""
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
    y = torch.tensor([[0.0], [2.0], [3.0], [9.0]], dtype=torch.float64)
    want = M.cka(x, y, kernel="rbf", sigma=math.sqrt(6.5), preprocess=False)
    assert M.cka(x, y, kernel="rbf", preprocess=False) == pytest.approx(want, rel=1e-12)


def test_linear_unbiased_cka_ignores_a_common_offset_of_the_features():
    """The unbiased HSIC ignores a shift shared by every item (features in one cone, as most models' are); computed
    from the uncentred features its sums cancel to rounding, and an offset of 100 would turn the kernels' self-HSIC into
    noise (nan). Centred first, the value is the unshifted one."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(40, 6, generator=g, dtype=torch.float64)
    b = a @ torch.randn(6, 5, generator=g, dtype=torch.float64) + torch.randn(40, 5, generator=g, dtype=torch.float64)
    want = M.unbiased_cka(a, b, preprocess=False)
    assert M.unbiased_cka(a + 100.0, b + 100.0, preprocess=False) == pytest.approx(want, abs=1e-9)


def test_svcca_never_exceeds_one():
    """Canonical correlations are cosines, at most 1; the singular values of two orthonormal bases' product come out
    up to 1e-15 above it by rounding: unclamped, a feature set compared with itself would score above 1 (a value a
    report's threshold or a best-of comparison can trip on) for several seeds out of these twenty."""
    for seed in range(20):
        a = torch.randn(30, 12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert M.svcca(a, a) <= 1.0, seed


def test_token_word_accuracy_refuses_a_label_id_one_past_the_vocabulary():
    """A label word id equal to the vocabulary size names no word: refused like any id out of range, rather than
    silently counted as a miss (a label list built against a larger tokenizer)."""
    g = torch.Generator().manual_seed(4)
    tokens, words = torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g)
    with pytest.raises(ValueError, match="label word ids"):
        M.token_word_accuracy(tokens, words, [[0], [4], [5]])


def test_nearest_words_marks_a_non_finite_token_as_having_no_direction():
    """A token with a NaN entry (an fp16 overflow in a connector) has no nearest word: -1, which the caller refuses,
    not the index argmax happens to give a row of NaN cosines (0 here, counted as a real answer)."""
    words = torch.eye(4, dtype=torch.float64)
    tokens = torch.tensor([[0.0, 2.0, 0.0, 0.0], [float("nan"), 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert M.nearest_words(tokens, words).tolist() == [1, -1, -1]


def test_prepare_features_refuses_a_quantile_above_one():
    """The clamp's quantile ``q`` is a fraction of the entries, in (0, 1]: 1.2 is a mistyped setting (a percentage
    meant as 0.95?), refused by name rather than read as "no clamp"."""
    with pytest.raises(ValueError, match="q must be in"):
        M.prepare_features(torch.randn(6, 4, generator=torch.Generator().manual_seed(5)), q=1.2)


# ------------------------------------------------------------------------------------------------------- collator

IMAGE = 99  # the image token of the synthetic samples below, two slots per image


def sample(i: int, images: int, text: list[int], **extra) -> dict:
    """A tokenised sample: ``images`` image blocks of two slots, then supervised text."""
    ids = torch.tensor([IMAGE] * 2 * images + text)
    labels = torch.tensor([IGNORE_INDEX] * 2 * images + text)
    return {"id": f"s{i}", "input_ids": ids, "labels": labels, "n_images": images, **extra}


def test_captions_are_read_from_real_tokens_only_when_padding_carries_labels():
    """A batch built outside the collator may label its padding (labels copied from the input ids): which samples
    carry a caption, and so which images are paired, is read from the real tokens (sample id >= 0) only; counting the
    padding's labels would index a bincount with -1 and fail the step."""
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 8, 0, 0]])
    sample_ids = torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, -1, -1]])
    is_image = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    fields = index_fields(labels, sample_ids, is_image, num_image_tokens=2, num_samples=2)
    assert fields["pair_images"].tolist() == [0, 1] and fields["pair_samples"].tolist() == [0, 1]


def test_sample_means_are_zero_for_a_sample_without_kept_tokens():
    """A sample with none of the kept tokens (a caption cut away by truncation) has a mean of zeros, documented and
    finite; dividing by its count of 0 would give NaN, which would reach an objective's loss through the means it
    averages."""
    values = torch.arange(12.0).reshape(1, 4, 3)
    sample_ids = torch.tensor([[0, 0, 1, 1]])
    keep = torch.tensor([[True, True, False, False]])
    means = sample_means(values, sample_ids, keep, num_samples=2)
    assert means.tolist() == [[1.5, 2.5, 3.5], [0.0, 0.0, 0.0]]


def test_a_left_padding_collator_pads_one_sample_per_row_even_with_a_pack_length():
    """Generation pads on the left, one prompt per row, so that every row's next token follows its own prompt: a
    ``pack_length`` set for training does not pack such a batch (packed rows put other samples after a prompt)."""
    samples = [sample(0, 1, [5, 6, 7]), sample(1, 0, [8, 9]), sample(2, 1, [5, 6, 7])]
    batch = Collator(0, padding_side="left", pack_length=8, image_token_id=IMAGE, num_image_tokens=2)(samples)
    assert batch["input_ids"].tolist() == [[IMAGE, IMAGE, 5, 6, 7], [0, 0, 0, 8, 9], [IMAGE, IMAGE, 5, 6, 7]]
    assert "position_ids" not in batch


def packed_batch() -> dict:
    """Three samples of 5, 2 and 4 tokens packed into rows of 8: [s0 s1] and [s2, then 3 padding]."""
    samples = [sample(0, 1, [5, 6, 7]), sample(1, 0, [8, 9]), sample(2, 1, [5, 6], truncated=True)]
    return Collator(0, pack_length=8, image_token_id=IMAGE, num_image_tokens=2)(samples)


def test_packed_rows_are_as_wide_as_their_longest_content():
    """Rows are cut to the longest row's tokens (7 here), not padded out to ``pack_length``: padding columns cost a
    whole batch's compute for nothing."""
    packed = packed_batch()
    assert packed["input_ids"].shape == (2, 7)


def test_the_batch_counts_its_real_tokens():
    """``num_tokens`` is every real token of the batch (5 + 2 + 4), counted by the collator so that the throughput's
    token count never reads the device."""
    assert packed_batch()["num_tokens"] == 11


def test_the_batch_names_its_truncated_samples():
    """``truncated`` names the samples the data policy cut to fit, which the trainer counts and reports."""
    assert packed_batch()["truncated"] == ["s2"]


@pytest.mark.parametrize("per_token", [False, True])
def test_chunked_cross_entropy_sums_a_bf16_heads_gradient_in_float32(per_token):
    """A bf16 head's weight gradient is summed over the chunks in float32 and rounded to bf16 once: summed in bf16
    over 128 chunks it would drift three times as far from the float32 gradient (1.2e-2 of its largest entry, 4e-3
    so)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2048, 16, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(40, 16, generator=g).bfloat16().requires_grad_()
    targets = torch.randint(0, 40, (2048,), generator=g)
    want = torch.autograd.grad(F.cross_entropy(hidden.float() @ weight.float().T, targets, reduction="sum"), weight)[
        0
    ].float()
    loss = (linear_token_nll if per_token else linear_cross_entropy)(hidden, weight, targets, rows=16)
    got = torch.autograd.grad(loss.sum(), weight)[0]
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 6e-3 * want.abs().max()


def test_head_with_a_bias_is_not_read_as_a_plain_matmul():
    """The chunked loss reads only the head's weight: a head with a bias runs as a module, so its bias takes part in
    the logits and trains."""
    assert linear_weight(nn.Linear(8, 5, bias=False)) is not None
    assert linear_weight(nn.Linear(8, 5, bias=True)) is None


def test_a_boolean_logit_scale_is_refused_naming_it():
    """``logit_scale: true`` is no factor, though Python would multiply by it as 1.0: refused, naming model.llm and the
    key, like any value that is not a number."""
    from types import SimpleNamespace as Config

    with pytest.raises(ValueError, match="model.llm.*logit_scale=True"):
        head_transform(Config(model_type="cohere", logit_scale=True))


def test_a_zero_logits_scaling_is_refused_naming_it():
    """Granite's head divides by ``logits_scaling``: 0 is refused as a ValueError naming model.llm and the key, not
    left to fail as a bare ZeroDivisionError."""
    from types import SimpleNamespace as Config

    with pytest.raises(ValueError, match="model.llm.*logits_scaling=0"):
        head_transform(Config(model_type="granite", logits_scaling=0))


def test_an_integer_tensor_is_no_loss():
    """A 0-dim integer tensor (a count returned where a loss was meant) cannot be back-propagated: named as such."""
    assert scalar_problem(torch.tensor(3.0)) is None
    assert scalar_problem(torch.tensor(3)) == "a torch.int64 tensor of shape []"


def test_chunked_cross_entropy_computes_no_gradient_for_frozen_hidden_states():
    """Hidden states that need no gradient (everything below the head frozen) get none computed: per chunk one matmul
    for the logits and one for the head's gradient, not a third for the hidden states'."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Matmuls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Matmuls.count += str(func) == "aten.mm.default"
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    with Matmuls():
        linear_cross_entropy(hidden, weight, targets, rows=8)  # five chunks
    assert Matmuls.count == 10


# ------------------------------------------------------------------------------------------------------ weights I/O


def test_weights_of_another_shape_with_as_many_entries_are_refused():
    """A [4, 2] weight does not fit a [2, 4] one though both hold 8 numbers (a transposed export): refused, naming
    the weight, before anything is copied."""
    with pytest.raises(ValueError, match="weight w of ckpt has shape \\[4, 2\\]"):
        check_fits({"w": torch.zeros(4, 2)}, {"w": torch.zeros(2, 4)}, "ckpt")


def test_a_finals_parts_include_those_it_holds_weights_of_beyond_its_metadata(tmp_path):
    """A part whose weights the file holds but its ``parts`` metadata leaves out is still loaded whole (and so checked
    for missing weights), not overlaid tensor by tensor on the built model."""
    save_file(
        {"connector.w": torch.zeros(1), "llm.w": torch.zeros(1)},
        str(tmp_path / "model.safetensors"),
        metadata={"parts": "connector"},
    )
    assert final_parts(tmp_path) == ["connector", "llm"]


def test_a_finals_stage_is_the_one_its_metadata_names_wherever_it_lies(tmp_path):
    """A ``final/`` set aside or copied elsewhere still names the stage that trained it (its template prompts the
    model), from its weights' metadata rather than the folder it sits in."""
    final = tmp_path / "copied" / "final"
    final.mkdir(parents=True)
    save_file(
        {"connector.w": torch.zeros(1)},
        str(final / "model.safetensors"),
        metadata={"parts": "connector", "stage": "pretrain"},
    )
    assert final_stage(final) == "pretrain"


def test_weights_the_model_has_no_place_for_are_refused_naming_them():
    """A checkpoint of another config holding weights this model lacks is refused with a KeyError that says so and
    names them, not a bare KeyError of one name from deep inside the shape check."""
    model = nn.Sequential()
    model.add_module("connector", nn.Linear(3, 2))
    state = {"connector.weight": torch.zeros(2, 3), "connector.bias": torch.zeros(2), "connector.extra": torch.zeros(1)}
    with pytest.raises(KeyError, match="weights the model lacks.*connector.extra"):
        load_part_state(model, state, ["connector"])


def test_a_tied_weight_arrives_with_the_one_it_is_tied_to():
    """Weights tied to each other are saved under one name (safetensors refuses shared storage): loading that one
    fills the other, which is not reported missing."""
    shared = nn.Linear(2, 2)
    part = nn.Module()
    part.a, part.b = shared, shared
    model = nn.Sequential()
    model.add_module("connector", part)
    load_part_state(model, {"connector.a.weight": torch.ones(2, 2), "connector.a.bias": torch.ones(2)}, ["connector"])
    assert torch.equal(model.connector.b.weight, torch.ones(2, 2))


# ------------------------------------------------------------------------------------------------ step checkpoints


class WithStatistics(nn.Module):
    """The least a checkpoint writer needs of a model: named parts, one of them with running statistics."""

    PARTS = ("connector",)

    def __init__(self) -> None:
        super().__init__()
        self.connector = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_resuming_names_the_trained_buffers_a_checkpoint_does_not_hold(tmp_path):
    """A checkpoint written before step checkpoints held trained parts' buffers resumes with those buffers as they
    started, and ``apply_training_state`` names them for the caller's warning."""
    folder, model, optimizer, scheduler = written_step(tmp_path, 1, WithStatistics())
    state = ckpt.read_training_state(folder, 0)
    state.weights = {k: v for k, v in state.weights.items() if "running" not in k and "num_batches" not in k}
    missing, _ = ckpt.apply_training_state(state, model, optimizer, scheduler, 0)
    assert sorted(missing) == ["connector.1.num_batches_tracked", "connector.1.running_mean", "connector.1.running_var"]


def test_resuming_without_a_saved_loss_scaler_says_so(tmp_path):
    """An fp16 run resumed from a checkpoint that holds no loss scaler (written without one) is told the scaler starts
    afresh: ``apply_training_state`` returns False for the caller's warning."""
    folder, model, optimizer, scheduler = written_step(tmp_path, 1, WithStatistics())
    state = ckpt.read_training_state(folder, 0)
    scaler = torch.amp.GradScaler("cpu")
    assert ckpt.apply_training_state(state, model, optimizer, scheduler, 0, scaler=scaler)[1] is False
    assert ckpt.apply_training_state(state, model, optimizer, scheduler, 0)[1] is True
