"""``AlignLM``: vision tower -> connector -> causal LLM, with visual tokens spliced in place.

The data pipeline already expanded each ``<image>`` placeholder to ``M`` copies of the image token, so
splicing is one ``index_copy`` into those slots: no Python loop over samples, any number of images per sample, and
text-only samples mixed in. A batch with no image at all still runs one zero image through the vision
path (scaled by zero, the tower in eval mode so that its BatchNorm statistics never see it), so data-parallel and
ZeRO-3 ranks stay in step.

Batch keys (a plain dict of tensors): ``input_ids``, ``attention_mask``, ``labels`` ``[rows, T]``;
``pixel_values`` ``[n_images, 3, H, W]`` or ``image_embeds`` ``[n_images, N, Dv]`` (precomputed features standing in
for the tower's output), images in reading order across the batch; ``position_ids`` when samples are packed end to
end in rows (each sample's positions start at 0, which isolates it in attention); the index the collator computes
on the CPU (``sample_ids``, ``num_samples``, ``image_sample``, ``image_positions``, ``lm_positions``, ``lm_targets``,
the image-caption pairs; see ``data/collate.py``; computed here for a batch built by hand); ``cu_seq_lens`` and
``max_seq_len`` (the runs of one sample each, and the longest, over the flattened rows: flash-attention's varlen
kernel takes the samples from them, packed or padded, without a look at the device); optional
``num_items_in_batch`` (supervised-token count the LM loss is normalised by, set by the trainer so that gradient
accumulation and data parallelism give the same gradients as one big batch); and whatever fields the model's extra
input parts read (``models/extras.py``).
Nothing in the forward pass waits on the GPU: consistency checks are device-side asserts there.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.generation.stopping_criteria import StoppingCriteriaList, StopStringCriteria
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from alignlm.constants import IMAGE_TOKEN
from alignlm.data.collate import index_fields, sample_counts
from alignlm.data.templates import TurnEnd
from alignlm.models.connectors.base import Connector, ConnectorOutput
from alignlm.models.extras import InputPart
from alignlm.models.lm_loss import head_transform, linear_cross_entropy, linear_token_nll, linear_weight
from alignlm.models.vision import VisionTower

# attention kernels that take each sample's run of tokens from cumulative lengths (cu_seq_lens), any number of rows
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
# the layer types of transformers' configs (``layer_types``) whose masks ``AlignLM.sample_mask`` builds
MASKED_LAYER_TYPES = ("full_attention", "sliding_attention")

INDEX_KEYS = (
    "sample_ids",
    "num_samples",
    "image_sample",
    "lm_positions",
    "lm_targets",
    "pair_images",
    "pair_samples",
    "pair_caption",
)

Batch = dict[str, Any]


@dataclass
class AlignOutput(ModelOutput):
    """Everything objectives may need from one forward pass (``AlignLM.forward`` sets every field but ``logits`` and
    ``hidden_states``, which are asked for).

    A ``ModelOutput`` (a dict as well as a dataclass), so that wrappers which look for the tensors in a module's
    output find them: DeepSpeed ZeRO-3 gathers the LM head's weight for the backward only if it does."""

    lm_loss: torch.Tensor
    lm_loss_sum: torch.Tensor | None = None
    num_items: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    vision_features: torch.Tensor | None = None
    visual_tokens: torch.Tensor | None = None
    image_positions: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] | None = None  # {} when not given
    # the connector's; of the zero image when the batch has none (``has_images``): no data, the trainer leaves them out
    metrics: dict[str, torch.Tensor] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    sample_logps: torch.Tensor | None = None  # [num_samples]: each sample's summed log-probability of its labels
    # [rows, T, Dl]: the tensor the LLM decoded from, no copy (its first layer, or a checkpoint, keeps it for the
    # backward anyway): each token's embedding, with the visual tokens and the extra parts' embeddings in their slots.
    # Objectives read the captions' token embeddings here (a caption token is never a slot): a second lookup in the
    # table after the forward finds it resharded under FSDP2 (a DTensor shard), where the forward had it whole.
    inputs_embeds: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # ModelOutput first: it tells a copy made from a dict (accelerate's fp32 conversion of a mixed-precision
        # forward's output does that) by every field but the first being None, which the defaults below would spoil
        super().__post_init__()
        self.aux_losses = {} if self.aux_losses is None else self.aux_losses
        self.metrics = {} if self.metrics is None else self.metrics


def has_images(batch: Batch) -> bool:
    """Whether the batch holds images (or the features standing in for them); without, the model runs a zero image
    through the vision path to keep ranks in step, and what the connector reports of it is no data."""
    pixels = batch.get("pixel_values")
    return batch.get("image_embeds") is not None or (pixels is not None and pixels.shape[0] > 0)


class AlignLM(nn.Module):
    """A LLaVA-style multimodal LLM whose three parts are swappable by config."""

    PARTS: tuple[str, ...] = ("vision", "connector", "llm")  # a model with extra input parts adds their names

    def __init__(
        self,
        vision: VisionTower,
        connector: Connector,
        llm: nn.Module,
        tokenizer: Any,
        extras: dict[str, InputPart] | None = None,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.tokenizer = tokenizer
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens(
                {"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False
            )
        self.extras: dict[str, int] = {}  # extra input part name -> the id of its slot token
        for name, part in (extras or {}).items():
            if hasattr(self, name):
                raise ValueError(f"model.extras.{name}: the name is taken by the model itself; choose another")
            if part.slot_token not in tokenizer.get_vocab():
                tokenizer.add_special_tokens(
                    {"additional_special_tokens": [part.slot_token]}, replace_extra_special_tokens=False
                )
            setattr(self, name, part)
            self.extras[name] = tokenizer.convert_tokens_to_ids(part.slot_token)
        if self.extras:
            self.PARTS = (*AlignLM.PARTS, *self.extras)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.image_token_id: int = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if llm.get_input_embeddings().num_embeddings < len(tokenizer):
            llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        self.num_image_tokens: int = connector.num_tokens(vision.num_patches)
        self.frozen_parts: set[str] = set()

    @property
    def slot_token_ids(self) -> list[int]:
        """The extra parts' slot tokens, which the data pipeline inserts after BOS (in this order)."""
        return list(self.extras.values())

    @property
    def image_only_slot_ids(self) -> list[int]:
        """The slot tokens of the extra parts that only samples with an image get (``InputPart.with_images_only``)."""
        return [token_id for name, token_id in self.extras.items() if getattr(self, name).with_images_only]

    @property
    def requires_batch_keys(self) -> tuple[str, ...]:
        """Batch fields the extra parts need in their current train modes."""
        return tuple(k for name in self.extras for k in getattr(self, name).requires_batch_keys)

    @property
    def image_spec(self):
        return self.vision.image_spec

    def train(self, mode: bool = True) -> AlignLM:
        """Frozen parts stay in eval mode, so BatchNorm statistics and dropout of a frozen tower never move.

        transformers checkpoints a layer only while the layer itself is in training mode, and a frozen LLM still
        passes the gradient down to the connector (stage 1): a checkpointed frozen part's layers keep the training
        flag on themselves alone, their modules below (dropout, attention) staying in eval mode, so
        ``stage.gradient_checkpointing`` saves memory there too (it did nothing while the LLM was frozen)."""
        super().train(mode)
        for part in self.frozen_parts:
            getattr(self, part).eval()
            for layer in getattr(self, part).modules():
                if isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing:
                    layer.training = mode
        return self

    def encode_images(self, batch: Batch) -> torch.Tensor:
        """Vision features ``[n_images, N, Dv]``; a zero image when the batch has none (keeps ranks in step).

        The zero image runs with the tower in eval mode: it is no image of the data, and in training mode a BatchNorm
        tower would move its running statistics towards it, though its features are scaled by zero."""
        if batch.get("image_embeds") is not None:
            return batch["image_embeds"]
        pixels = batch.get("pixel_values")
        if pixels is not None and pixels.shape[0] > 0:
            return self._run_vision(pixels)
        size = self.image_spec.size
        with eval_mode(self.vision):
            return self._run_vision(torch.zeros(1, 3, size, size, device=batch["input_ids"].device))

    def _run_vision(self, pixels: torch.Tensor) -> torch.Tensor:
        if "vision" in self.frozen_parts:
            with torch.no_grad():
                return self.vision(pixels)
        return self.vision(pixels)

    def connect(self, features: torch.Tensor) -> ConnectorOutput:
        """The connector on vision features (the tower's, or cached ones), contiguous and of the connector's dtype.
        Contiguous as the feature cache's are: a tower's output is often a slice (the class token dropped), and under
        bf16 the connector's matmul kernel, whose order of summation follows the input's layout, gave tokens 1 ulp
        apart from cached features of the same values (the loss 6e-5 apart). Of its dtype: a tower loaded in bf16
        (``model.vision.dtype``) gave an fp32 connector bf16 features, a dtype error at the first step without
        autocast, and at the evaluation after a bf16 run had trained."""
        return self.connector(self.connector_input(features))

    def connector_input(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features as :meth:`connect` hands them to the connector (for its other entry points, V2L's
        ``words``): contiguous, in the dtype of the connector's first floating-point parameter."""
        dtype = next((p.dtype for p in self.connector.parameters() if p.is_floating_point()), features.dtype)
        return features.contiguous().to(dtype)

    def embed(self, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        """Input embeddings with visual tokens spliced in, plus the intermediate tensors objectives use."""
        input_ids = batch["input_ids"]
        features = self.encode_images(batch)
        conn = self.connect(features)
        visual = conn.tokens
        embeds = self.llm.get_input_embeddings()(input_ids)
        is_image = input_ids == self.image_token_id
        if has_images(batch):
            # slot positions from the collator (the CPU), else found here (a batch built by hand: a host sync). An
            # index_copy, not a masked_scatter: the latter's backward selects by mask, which waits for the device
            positions = batch.get("image_positions")
            positions = is_image.flatten().nonzero().squeeze(1) if positions is None else positions
            if positions.numel() != visual.shape[0] * visual.shape[1]:
                self._check_connector_count(visual.shape[1])
                raise ValueError(
                    f"the batch has {positions.numel()} image-token slots, not {visual.shape[0]} images x "
                    f"{visual.shape[1]} tokens; the data pipeline must expand each <image> to model.num_image_tokens "
                    "positions"
                )
            with torch.autocast(embeds.device.type, enabled=False):  # a copy: the CPU's bf16 autocast refused fp16
                flat = embeds.flatten(0, 1).index_copy(0, positions, visual.flatten(0, 1).to(embeds.dtype))
            embeds = flat.view_as(embeds)
        else:
            check(~is_image.any(), "the batch has image-token slots but no pixel_values or image_embeds")
            embeds = embeds + 0.0 * visual.sum().to(embeds.dtype)
            # the zero image only keeps ranks in step: its auxiliary losses must not train the connector
            conn.aux_losses = {k: 0.0 * v for k, v in conn.aux_losses.items()}
        if self.extras:
            embeds = self._write_slots(batch, embeds, visual if has_images(batch) else None, is_image)
        return embeds, {"features": features, "visual": visual, "is_image": is_image, "conn": conn}

    def _check_connector_count(self, returned: int) -> None:
        """Refuse a connector whose ``forward`` returns another number of tokens per image than its ``num_tokens``
        promised: the data pipeline made that many slots per ``<image>``, and the count of slots that followed named
        neither the connector nor the method to fix."""
        if returned != self.num_image_tokens:
            n = self.vision.num_patches
            raise ValueError(
                f"model.connector ({type(self.connector).__name__}) returned {returned} tokens per image, but its "
                f"num_tokens({n}) says {self.num_image_tokens}, the image-token slots the data pipeline makes for "
                "each <image>: num_tokens must return the number of tokens forward returns"
            )

    def index(self, batch: Batch) -> dict[str, Any]:
        """The batch's index (``INDEX_KEYS``: see ``data/collate.py``): the collator's (computed on the CPU), else
        computed here for a batch built by hand (one sample per row)."""
        if all(batch.get(k) is not None for k in INDEX_KEYS):
            return {k: batch[k] for k in INDEX_KEYS}
        input_ids = batch["input_ids"]
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(input_ids)
        mask = batch.get("attention_mask")
        sample_ids = rows if mask is None else torch.where(mask.bool(), rows, -1)
        is_image = input_ids == self.image_token_id
        fields = index_fields(batch["labels"], sample_ids, is_image, self.num_image_tokens, input_ids.shape[0])
        return {"sample_ids": sample_ids, "num_samples": input_ids.shape[0], **fields}

    def _write_slots(
        self, batch: Batch, embeds: torch.Tensor, visual: torch.Tensor | None, is_image: torch.Tensor
    ) -> torch.Tensor:
        """Each extra part's embedding at its one slot per sample (the data pipeline puts the slots after BOS)."""
        input_ids = batch["input_ids"]
        index = self.index(batch)
        # compared id by id: a tensor of the ids made here would be a blocking host-to-device copy on a GPU
        is_slot = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in self.slot_token_ids:
            is_slot |= input_ids == token_id
        sample_ids, n = index["sample_ids"], int(index["num_samples"])
        with_image = sample_counts(sample_ids, is_image, n) > 0
        for name, token_id in self.extras.items():
            here, part = input_ids == token_id, getattr(self, name)
            wanted = with_image.long() if part.with_images_only else 1
            check(
                (sample_counts(sample_ids, here, n) == wanted).all(),
                f"every sample{' with an image' if part.with_images_only else ''} needs exactly one "
                f"{part.slot_token} slot for model.extras.{name} (the data pipeline inserts it after BOS)"
                + (", and a sample without one none" if part.with_images_only else ""),
            )
            tokens = getattr(self, name)(batch, embeds, visual, is_image, is_slot, index)  # [n, D]
            # each token's sample's row, kept at the slots: a masked_scatter's backward would select by mask (a wait)
            embeds = torch.where(here.unsqueeze(-1), tokens.to(embeds.dtype)[sample_ids.clamp(min=0)], embeds)
        return embeds

    def forward(
        self,
        batch: Batch,
        output_hidden_states: bool = False,
        return_logits: bool = False,
        sample_logps: bool = False,
    ) -> AlignOutput:
        embeds, ex = self.embed(batch)
        index = self.index(batch)
        # The 4D mask from sample_ids for packed and padded rows alike: given a 2D mask (or none) transformers would
        # inspect it (or the position ids) on the host to choose a mask, a wait for the device in every step.
        # Flash-attention takes the samples from the collator's cumulative lengths instead: from position ids it finds
        # packed samples only in a single row (several rows ran plain causal attention across samples), and from a
        # 2D mask it unpads with reads of the device in every layer; transformers gives its kernel each layer's
        # sliding window, which it applies within each run.
        mask = self.sample_mask(index["sample_ids"], embeds.dtype)
        varlen = self.varlen_kwargs(batch)
        if mask is None and not varlen and batch.get("position_ids") is None:
            mask = batch["attention_mask"]
        out = self.llm.get_decoder()(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=batch.get("position_ids"),
            output_hidden_states=output_hidden_states,
            use_cache=False,
            **varlen,
        )
        hidden = out.last_hidden_state
        # The vocabulary projection runs only where a label exists, chunk by chunk: on a 32k-150k vocabulary the
        # logits are otherwise a large share of the step and of its memory (models/lm_loss.py).
        supervised = hidden.flatten(0, 1).index_select(0, index["lm_positions"])
        logps = None
        if sample_logps:  # one pass of the head per token serves both: each sample's log-probability and the LM loss
            token_nll = self.token_nll(supervised, index["lm_targets"])
            loss_sum = token_nll.sum()
            owner = index["sample_ids"].flatten().index_select(0, index["lm_positions"])
            logps = token_nll.new_zeros(int(index["num_samples"])).index_add(0, owner, -token_nll)
        else:
            loss_sum = self.lm_loss_sum(supervised, index["lm_targets"])
        local_items = torch.full((), index["lm_targets"].numel(), device=loss_sum.device)  # a fill: no host-device copy
        num_items = batch.get("num_items_in_batch")
        denom = torch.as_tensor(num_items if num_items is not None else local_items, device=loss_sum.device)
        return AlignOutput(
            # a global step's items shared by P ranks may be under one per rank (2 items, 4 ranks: 0.5); 0 is none
            lm_loss=loss_sum / torch.where(denom > 0, denom, 1),
            lm_loss_sum=loss_sum.detach(),
            num_items=local_items,
            logits=self.lm_logits(hidden) if return_logits else None,
            vision_features=ex["features"],
            visual_tokens=ex["visual"],
            image_positions=ex["is_image"],
            aux_losses=ex["conn"].aux_losses,
            metrics=ex["conn"].metrics,
            hidden_states=out.hidden_states if output_hidden_states else None,
            sample_logps=logps,
            inputs_embeds=embeds,
        )

    def varlen_kwargs(self, batch: Batch) -> dict[str, Any]:
        """flash-attention's cumulative run lengths for this batch (transformers passes them to every layer's
        kernel), where the LLM attends with a varlen kernel and the collator computed them; else none."""
        if self.llm.config._attn_implementation not in VARLEN_ATTENTION or batch.get("cu_seq_lens") is None:
            return {}
        cu, longest = batch["cu_seq_lens"], int(batch["max_seq_len"])
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}

    def sample_mask(
        self, sample_ids: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor | dict[str, torch.Tensor] | None:
        """The block-diagonal causal mask ``[rows, 1, T, T]``: a token sees the earlier tokens of its own sample only
        (padding sees padding, so no row is empty), in packed rows and in padded ones (one sample per row). Built on
        the device from ``sample_ids``; for attention kernels that take the samples from the position ids or a 2D
        mask instead (flash-attention), None.

        transformers uses a mask given to the decoder as it is in every layer, so a sliding-window layer gets the mask
        cut to its window here (``attention_windows``): one mask when every layer attends alike (Mistral's all
        slide), else one per layer type, which the decoder of a model with layer types (Gemma-3) looks up per layer.
        Without the cut those layers attended to the whole sample in training, and to their window in generation."""
        impl = self.llm.config._attn_implementation
        if impl not in ("sdpa", "eager"):
            return None
        length = sample_ids.shape[1]
        position = torch.arange(length, device=sample_ids.device)
        back = position[:, None] - position[None, :]  # how far a key is behind the query
        same = (sample_ids[:, :, None] == sample_ids[:, None, :])[:, None]

        def cut(window: int | None) -> torch.Tensor:
            seen = back >= 0 if window is None else (back >= 0) & (back < window)
            mask = same & seen
            if impl == "sdpa":
                return mask
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)

        windows = attention_windows(self.llm.config)
        if len(windows) == 1:
            return cut(next(iter(windows.values())))
        return {layer_type: cut(window) for layer_type, window in windows.items()}

    def lm_loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross-entropy of ``hidden`` ``[n, D]`` against ``targets`` ``[n]`` through the LM head."""
        weight = linear_weight(self.llm.get_output_embeddings())
        if weight is None:  # a head that does more than its matmul (a bias, a LoRA adapter) runs as a module
            return F.cross_entropy(self.lm_logits(hidden).float(), targets, reduction="sum")
        return linear_cross_entropy(hidden, weight, targets, head_transform(self.llm.config))

    def token_nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each position's next-token cross-entropy ``[n]`` (float32), chunked as ``lm_loss_sum``."""
        weight = linear_weight(self.llm.get_output_embeddings())
        if weight is None:
            return F.cross_entropy(self.lm_logits(hidden).float(), targets, reduction="none")
        return linear_token_nll(hidden, weight, targets, head_transform(self.llm.config))

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LLM's logits: its output head (the module, adapters included), then the transform its causal LM
        applies to the head's output (``head_transform``: Granite's scale, Gemma-2's soft-cap)."""
        return head_transform(self.llm.config)(self.llm.get_output_embeddings()(hidden))

    @torch.no_grad()
    def generate(
        self, batch: Batch, max_new_tokens: int = 16, stop: TurnEnd | None = None, **gen_kwargs: Any
    ) -> torch.Tensor | ModelOutput:
        """Decode continuations of left-padded prompts; returns only the new token ids ``[B, <=max_new_tokens]`` (with
        ``return_dict_in_generate``, transformers' output with its ``sequences`` cut to them).
        ``stop``: the template's end of turn, where decoding stops besides EOS (plain text through transformers' stop
        string criterion, built once per tokenizer: :func:`stop_string_criteria`, beside any ``stopping_criteria``
        given; the caller cuts the decoded text there too).

        The prompt's ids go in beside its embeddings (which the LLM decodes from; the ids are not embedded again):
        with embeddings alone, transformers' repetition penalty took each row's left padding as the prompt to skip in
        ids holding only the generated tokens, so a padded row left its first answer tokens unpenalised and batched
        answers differed from one-by-one ones. With the ids, the penalty and n-gram blocking cover the prompt, as in
        the exported Llava."""
        embeds, _ = self.embed(batch)
        tok = self.tokenizer
        ends = sorted({tok.eos_token_id, *(stop.ids if stop else ())} - {None})
        criteria = StoppingCriteriaList(gen_kwargs.pop("stopping_criteria", None) or [])
        if stop and stop.text:
            criteria.append(stop_string_criteria(tok, stop.text))
        prompt = batch["input_ids"]
        out = self.llm.generate(
            input_ids=prompt,
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=ends,
            stopping_criteria=criteria,
            **gen_kwargs,
        )
        if isinstance(out, torch.Tensor):
            return out[:, prompt.shape[1] :]
        out.sequences = out.sequences[:, prompt.shape[1] :]
        return out


# Per tokenizer, its stop-string criteria by stop text: built once, not at every generate() call (a plain template's
# "\n" made transformers read and sort the whole vocabulary per batch: 43 ms at SmolLM2's 49k tokens). Weak keys: a
# checkpoint's tokenizer goes with its model.
_STOP_CRITERIA: weakref.WeakKeyDictionary[Any, dict[tuple[int, str], StopStringCriteria]] = weakref.WeakKeyDictionary()


def stop_string_criteria(tokenizer: Any, text: str) -> StopStringCriteria:
    """transformers' criterion that stops a sequence once it ends in ``text``, as its ``stop_strings`` builds it, kept
    per tokenizer and vocabulary size (a token added since would change what the criterion matches)."""
    known = _STOP_CRITERIA.setdefault(tokenizer, {})
    key = (len(tokenizer), text)
    if key not in known:
        known[key] = StopStringCriteria(tokenizer, [text])
    return known[key]


def attention_windows(config: Any) -> dict[str, int | None]:
    """Each attention layer type's sliding window (None: the whole causal past), keyed as transformers'
    ``layer_types``; one entry where every layer attends alike. A token sees itself and the ``window - 1`` tokens
    before it, transformers' rule (``sliding_window_overlay``).

    A config without layer types slides every layer where it sets ``sliding_window`` (Mistral, Mixtral, Phi-3, as
    their decoders choose the mask); one with them slides its ``sliding_attention`` layers (Gemma-2/3, Qwen2 with
    ``use_sliding_window``). Other types beside a sliding one (a recurrent or chunked layer) have no mask here."""
    window = getattr(config, "sliding_window", None)
    types = set(getattr(config, "layer_types", None) or ())
    if not types:
        return {"full_attention": None} if window is None else {"sliding_attention": window}
    if "sliding_attention" not in types:
        return {"full_attention": None}
    other = sorted(types - set(MASKED_LAYER_TYPES))
    if other:
        raise ValueError(
            f"model.llm: the LLM has {other} layers beside sliding-window ones, and alignlm builds masks for "
            f"{list(MASKED_LAYER_TYPES)} only; choose model.llm.attn_implementation=flash_attention_2 (or "
            "flex_attention), where the model builds its own"
        )
    if window is None:
        raise ValueError("model.llm: the LLM has sliding_attention layers but its config sets no sliding_window")
    return {layer_type: window if layer_type == "sliding_attention" else None for layer_type in sorted(types)}


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` and everything in it in eval mode for the block, then each back in the mode it was in (a frozen
    part inside a trained one, a checkpointed layer's own flag: ``AlignLM.train`` sets them one by one)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def check(ok: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok``; on a GPU a device-side assert, so the step never waits for it."""
    if ok.device.type == "cpu":
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)
