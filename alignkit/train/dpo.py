"""DPO-family stage: TRL's ``DPOTrainer`` with the loss taken from :mod:`alignkit.losses`.

``AlignkitDPOTrainer`` overrides ``_compute_loss``, the method of TRL 1.16's DPOTrainer that turns a
batch into per-sequence log-probs and then a loss: it computes the policy's per-sequence log-probs with
TRL's fused LM head, gets the reference log-probs from TRL (precomputed columns, or
``compute_ref_log_probs``: the explicit reference model, or the policy with its LoRA adapter disabled),
and hands the tensors to ``alignkit.losses.PREFERENCE_LOSSES[loss]`` with exactly the parameters that loss
declares. ``loss: trl`` keeps TRL's own ``loss_type``. Logged like TRL: rewards/chosen|rejected|accuracies|
margins, logps/chosen|rejected.

Speed (issue #16): ``train.padding_free`` lays each batch's chosen and rejected sequences end to end in one row
without pads (:class:`alignkit.data.dpo_packing.PaddingFreePreferenceCollator`), attention per sequence (sdpa ->
sdpa_varlen, :func:`alignkit.train.common.per_document_attention`); on sdpa_varlen each pair's prompt runs once
(the rejected sequence reads the chosen one's prompt keys, ``shared_prefix_lens``, probed per model by
:func:`shares_prompt`), and the LM head runs on the scored completion positions only, inside
:func:`alignkit.losses.lm_head_log_probs` (:mod:`alignkit.train.compact_head`); loss and gradients equal TRL's padded
path (tests/test_train_dpo.py). With ``precompute_ref_log_probs`` the reference values are cached on disk
(``train.ref_cache_dir``, :mod:`alignkit.train.ref_cache`) and reused by later runs (another beta, loss or
learning rate).

Which loss runs (:func:`resolve_loss`): ``train.loss`` when set; otherwise TRL's ``loss_type`` as TRL users
write it: mapped onto the alignkit loss with the same definition (sigmoid -> dpo, robust, hinge, ipo) unless
a TRL-only knob is in use, else TRL's own loss (``trl``). Settings the chosen loss does not read are refused
(:func:`unread_settings`, :func:`ignored_keys`), never dropped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import is_peft_model
from datasets import IterableDataset
from transformers import set_seed
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from alignkit import losses as L
from alignkit.attention import VARLEN_SDPA, honours_shared_prefix
from alignkit.data.dpo_packing import PACKED_ONLY_KEYS, PaddingFreePreferenceCollator, sequence_sums
from alignkit.data.preference import to_trl_dataset
from alignkit.train import common, ref_cache, task_eval
from alignkit.train.compact_head import add_compact_lm_head, has_compact_lm_head

logger = logging.getLogger("alignkit.train")
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}

#: LossSpec parameter -> the DPOArgs field that holds its value
LOSS_PARAM_FIELDS = {"beta": "beta", "label_smoothing": "label_smoothing", "gamma": "simpo_gamma"}
#: TRL loss_type -> the alignkit loss with the same definition (from the loss table)
TRL_EQUIVALENT = {spec.trl_loss_type: name for name, spec in L.PREFERENCE_LOSSES.items() if spec.trl_loss_type}
#: DPOConfig fields only TRL's own loss computation reads (bypassed by an alignkit loss)
TRL_LOSS_FIELDS = ("loss_type", "loss_weights", "ld_alpha", "f_divergence_type", "f_alpha_divergence_coef",
                   "use_weighting", "discopop_tau")
#: TRL loss_types that read label_smoothing (TRL 1.16 DPOTrainer._compute_loss)
TRL_SMOOTHED = ("robust", "exo_pair", "aot", "aot_unpaired")
#: settings of the reference model, unread by a reference-free loss
REFERENCE_FIELDS = ("precompute_ref_log_probs", "precompute_ref_batch_size", "sync_ref_model",
                    "ref_model_mixup_alpha", "ref_model_sync_steps", "ref_cache_dir")
#: the data.* keys this stage reads (common.load_split + preference_loader); others are refused
DATA_KEYS = frozenset({"path", "split", "format", "columns", "eval_path", "eval_split", "val_size", "max_rows",
                       "max_eval_rows", "max_length", "template", "on_error", "decontaminate"})


@dataclass
class DPOArgs(DPOConfig, task_eval.TaskEvalArgs):
    """``trl.DPOConfig`` (fields 1:1) plus alignkit's loss choice.

    Reference settings (CS336 A5 supplement, section 5.4): beta 0.1, lr 1e-6, effective batch 64,
    RMSprop (``optim: rmsprop``). Best checkpoint: ``load_best_model_at_end: true`` with
    ``metric_for_best_model: eval_rewards/accuracies`` (and ``greater_is_better: true``).
    """

    loss: str | None = field(default=None, metadata={
        "help": "Preference loss from alignkit.losses: dpo (Rafailov et al. 2023), cdpo (conservative, uses "
                "label_smoothing), robust, hinge, ipo (Azar et al. 2023; beta is tau), simpo (Meng et al. "
                "2024; reference-free, margin simpo_gamma), orpo (Hong et al. 2024; beta is lambda, adds the "
                "chosen NLL); or 'trl' for TRL's own loss_type. Unset: from loss_type (sigmoid -> dpo, robust, "
                "hinge, ipo; other TRL losses or TRL-only knobs -> trl).",
        "choices": [None, *L.PREFERENCE_LOSSES, "trl"]})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target reward margin gamma."})
    padding_free: bool = field(default=False, metadata={
        "help": "alignkit: lay each batch's chosen and rejected sequences end to end in one row without pads "
                "(alignkit.data.dpo_packing), attention per sequence (sdpa is switched to sdpa_varlen). Same "
                "loss and gradients as the padded batch, less compute. Read by alignkit's losses (TRL 1.16's "
                "own loss, loss: trl, turns it off)."})
    ref_cache_dir: str | None = field(default=None, metadata={
        "help": "With precompute_ref_log_probs: folder of the on-disk cache of the reference log-probs, keyed "
                "by the reference weights, tokenizer, tokenized data, max_length/truncation and precision, so "
                "later runs (another beta, lr, loss) skip the reference pass. Unset: "
                "$XDG_CACHE_HOME/alignkit/ref_logps (~/.cache/alignkit/ref_logps); 'off': no cache."})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={
        "help": "Loggers: tensorboard (default), wandb, mlflow (when installed), none, or a list."})

    def __post_init__(self):
        super().__post_init__()  # TRL turns a loss_type string into a list
        self.check_task_eval()
        self.loss = resolve_loss(self)
        changed = {name: reason for name, reason in unread_settings(self).items()
                   if getattr(self, name) != _default(name)}
        if changed:
            raise ValueError(changed[min(changed)])


ARGS_CLASS = DPOArgs


def _default(name: str):
    f = next(f for f in dataclasses.fields(DPOArgs) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _trl_knobs_in_use(args) -> list[str]:
    """TRL-only loss knobs (other than loss_type) holding a value other than TRL's default."""
    return [n for n in TRL_LOSS_FIELDS if n != "loss_type" and getattr(args, n) != _default(n)]


def resolve_loss(args) -> str:
    """The loss that runs: ``args.loss`` when set (checked against ``loss_type``), else from ``loss_type``."""
    types = list(args.loss_type)
    if args.loss is None:
        mapped = TRL_EQUIVALENT.get(types[0]) if len(types) == 1 else None
        return mapped if mapped and not _trl_knobs_in_use(args) else "trl"
    if args.loss != "trl":
        spec = L.get_loss_spec(args.loss)  # raises listing the valid names
        if types not in (_default("loss_type"), [spec.trl_loss_type]):
            raise ValueError(f"loss={args.loss!r} and loss_type={types} name different losses: set one of them "
                             f"(loss: trl runs TRL's loss_type)")
    return args.loss


def unread_settings(args) -> dict[str, str]:
    """``{field: message}`` for every DPOArgs loss setting the resolved ``args.loss`` does not read; the
    message is one line, ``train.label_smoothing is read by losses ...; this recipe's loss is dpo``."""
    name, types = args.loss, list(args.loss_type)
    trl_path = f"trl with loss_type {', '.join(types)}"
    out = {}
    if name == "trl":
        if not set(types) & set(TRL_SMOOTHED):
            out["label_smoothing"] = _readers("label_smoothing", trl_path)
        if "discopop" not in types:
            out["discopop_tau"] = f"read by loss trl with loss_type discopop; this recipe's loss is {trl_path}"
        if args.f_divergence_type != "alpha_divergence":
            out["f_alpha_divergence_coef"] = ("read by loss trl with f_divergence_type alpha_divergence; this "
                                              f"recipe's f_divergence_type is {args.f_divergence_type}")
        out["simpo_gamma"] = _readers("gamma", trl_path)
        out["padding_free"] = (f"read by alignkit's losses (padding-free pairs); this recipe's loss is {trl_path} "
                               "(TRL 1.16's DPOTrainer turns padding_free off)")
    else:
        spec = L.get_loss_spec(name)
        for param, attr in LOSS_PARAM_FIELDS.items():
            if param not in spec.params:
                out[attr] = _readers(param, name)
        for attr in TRL_LOSS_FIELDS:
            if attr != "loss_type" or types != [spec.trl_loss_type]:  # a loss_type naming this very loss is read
                out[attr] = (f"read by loss trl; this recipe's loss is {name} (alignkit.losses; set loss: trl "
                             f"for TRL's loss_type)")
        if spec.reference_free:
            for attr in REFERENCE_FIELDS:
                out[attr] = f"read by reference-based losses; this recipe's loss {name} is reference-free"
    if not args.precompute_ref_log_probs:
        out.setdefault("ref_cache_dir", "read with train.precompute_ref_log_probs: true; this recipe runs the "
                                        "reference forward live")
    return {attr: f"train.{attr} is {reason}" for attr, reason in out.items()}


def _readers(param: str, current: str) -> str:
    """``read by losses cdpo, robust, simpo and trl (...); this recipe's loss is dpo`` for one loss parameter."""
    names = L.losses_reading(param)
    if param == "label_smoothing":
        names.append(f"trl (loss_type {', '.join(TRL_SMOOTHED)})")
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return f"read by {'losses' if len(names) > 1 else 'loss'} {listed}; this recipe's loss is {current}"


def ignored_keys(stage) -> dict[str, str]:
    """Stage-module strictness hook (contract in alignkit/train/__init__.py): the recipe keys the selected
    loss does not read, ``{"train.label_smoothing": "train.label_smoothing is read by ...; ..."}``."""
    return {**{f"train.{name}": message for name, message in unread_settings(stage.train).items()},
            **task_eval.ignored_keys(stage.train)}


def shares_prompt(model) -> bool:
    """Whether padding-free rows may share each pair's prompt for ``model``: its attention is ``sdpa_varlen``
    and a probe shows it reads ``shared_prefix_lens`` (:func:`alignkit.attention.honours_shared_prefix`)."""
    base = model.get_base_model() if is_peft_model(model) else model
    return base.config._attn_implementation == VARLEN_SDPA and honours_shared_prefix(model)


class AlignkitDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer whose loss comes from :data:`alignkit.losses.PREFERENCE_LOSSES` (``args.loss``).

    ``args.padding_free`` (alignkit losses): batches from
    :class:`alignkit.data.dpo_packing.PaddingFreePreferenceCollator` (one row, no pads) instead of TRL's padded
    collator (TRL 1.16 turns padding_free off); the model (and reference) attend per sequence
    (:func:`alignkit.train.common.per_document_attention`; ``pinned_attention``: the recipe's
    ``model.attn_implementation``, which is then kept). ``args.ref_cache_dir``: TRL's precomputed reference log-probs are kept
    on disk (:mod:`alignkit.train.ref_cache`) and reused by later runs."""

    def __init__(self, model=None, ref_model=None, args=None, data_collator=None, *rest,
                 pinned_attention: str | None = None, **kwargs):
        packed = bool(getattr(args, "padding_free", False)) and getattr(args, "loss", "trl") != "trl"
        if not packed:
            super().__init__(model, ref_model, args, data_collator, *rest, **kwargs)
            return
        if isinstance(model, str):
            raise TypeError("train.padding_free: AlignkitDPOTrainer needs a loaded model, not a name, to set its "
                            "attention")
        given = [m for m in (model, ref_model) if m is not None]
        for m in given:
            common.per_document_attention(m, setting="train.padding_free", pinned=pinned_attention)
            add_compact_lm_head(m)
        if data_collator is None:
            data_collator = PaddingFreePreferenceCollator(args.max_length, args.truncation_mode,
                                                          share_prompt=all(map(shares_prompt, given)))
        args.padding_free = False  # TRL 1.16 would warn and pad; alignkit's collator and loss read it
        try:
            super().__init__(model, ref_model, args, data_collator, *rest, **kwargs)
        finally:
            args.padding_free = True
        self.padding_free = True
        if self.ref_model is not None and not has_compact_lm_head(self.accelerator.unwrap_model(self.ref_model)):
            ref = self.accelerator.unwrap_model(self.ref_model)  # built by TRL from the policy's path
            common.per_document_attention(ref, setting="train.padding_free", pinned=pinned_attention)
            add_compact_lm_head(ref)
            if getattr(self.data_collator, "share_prompt", False) and not shares_prompt(ref):
                raise RuntimeError(f"train.padding_free: the reference model TRL built runs "
                                   f"{ref.config._attn_implementation!r}, which does not read shared prompts")
        logger.info("padding-free DPO: %s", "prompt shared by chosen and rejected (one prompt pass per pair)"
                    if getattr(self.data_collator, "share_prompt", False) else "prompt run per sequence")

    # -- per-sequence log-probs ----------------------------------------------------------------------

    def _sequence_logps(self, model, inputs, **extra):
        """``(summed completion log-probs (2B,), completion lengths (2B,), model outputs)`` of a padded
        ``[chosen; rejected]`` batch or a padding-free row (``segment_ids`` present)."""
        completion_mask = inputs["completion_mask"]
        if "segment_ids" in inputs:  # one row: shift_labels never cross a sequence boundary
            n = inputs["cu_seq_lens_q"].numel() - 1 if "cu_seq_lens_q" in inputs else int(inputs["segment_ids"].max()) + 1
            model_kwargs = {k: v for k, v in inputs.items() if k not in PACKED_ONLY_KEYS}
            compact = not extra and has_compact_lm_head(self.accelerator.unwrap_model(model))
            head = {"compact_lm_head": True} if compact else {"fused_lm_head": True}
            outputs = model(**model_kwargs, **extra, shift_labels=inputs["shift_labels"], use_cache=False, **head)
            segments = inputs["segment_ids"]
            return (sequence_sums(outputs.log_probs, segments, n), sequence_sums(completion_mask, segments, n),
                    outputs)
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)  # (2B, T)
        outputs = model(**model_kwargs, **extra, labels=labels, use_cache=False, fused_lm_head=True)
        per_token = outputs.log_probs[:, -(completion_mask.size(1) - 1):]  # (2B, T-1), 0 where label -100
        return per_token.sum(dim=1), completion_mask.sum(dim=1), outputs

    def compute_ref_log_probs(self, model, inputs):
        """TRL's reference log-probs, for a padding-free row too (the precompute pass uses this trainer's
        collator, so it sees the same rows as training)."""
        if "segment_ids" not in inputs:
            return super().compute_ref_log_probs(model, inputs)
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                adapter, self.accelerator.autocast():
            logps, _, _ = self._sequence_logps(model, inputs)
        return logps.chunk(2)

    # -- reference cache -----------------------------------------------------------------------------

    def _ref_cache_settings(self) -> dict:
        """What the reference values depend on besides weights, tokenizer and data (ref_cache.cache_key)."""
        ref = self.ref_model or self.model
        dtype = next(ref.parameters()).dtype
        return {"max_length": self.args.max_length, "truncation_mode": self.args.truncation_mode,
                "ld_alpha": self.args.ld_alpha, "dtype": str(dtype), "bf16": bool(self.args.bf16),
                "fp16": bool(self.args.fp16)}

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """TRL's precompute pass behind the on-disk cache of ``args.ref_cache_dir`` (hit: no reference
        forward; miss: TRL's pass, then saved)."""
        folder = ref_cache.resolve_dir(getattr(self.args, "ref_cache_dir", None))
        if folder is None or isinstance(dataset, IterableDataset) or "ref_chosen_logps" in dataset.column_names:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        key = ref_cache.cache_key(model_hash=self._precompute_model_hash, tokenizer=self._tokenizer,
                                  dataset=dataset, settings=self._ref_cache_settings())
        cached = ref_cache.load(folder, key, len(dataset))
        if cached is not None:
            logger.info("reference log-probs (%s, %d pairs): cache hit %s/%s.json", name, len(dataset), folder, key)
            return dataset.add_column("ref_chosen_logps", cached[0]).add_column("ref_rejected_logps", cached[1])
        logger.info("reference log-probs (%s, %d pairs): cache miss in %s, computing", name, len(dataset), folder)
        out = super()._precompute_ref_logps(dataset, name, batch_size)
        if self.accelerator.is_main_process:
            path = ref_cache.save(folder, key, [float(x) for x in out["ref_chosen_logps"]],
                                  [float(x) for x in out["ref_rejected_logps"]],
                                  {"split": name, "pairs": len(dataset), **self._ref_cache_settings()})
            logger.info("reference log-probs (%s) cached in %s", name, path)
        return out

    # -- the loss ------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs, return_outputs):
        name = getattr(self.args, "loss", "trl")
        if name == "trl":
            return super()._compute_loss(model, inputs, return_outputs)
        if return_outputs:
            raise ValueError("AlignkitDPOTrainer does not return logits (set prediction_loss_only=True)")
        mode = "train" if self.model.training else "eval"
        # 1. policy per-sequence log-probs of the completion tokens (TRL's fused head: no (2B, T, V) logits)
        extra = {"output_router_logits": True} if self.aux_loss_enabled else {}  # MoE: TRL's router aux loss
        logps, lengths, outputs = self._sequence_logps(model, inputs, **extra)
        chosen_logps, rejected_logps = logps.chunk(2)  # (B,), (B,)
        chosen_len, rejected_len = lengths.chunk(2)  # (B,), (B,) completion tokens
        # 2. reference log-probs (skipped for reference-free losses)
        spec = L.get_loss_spec(name)
        ref_chosen = ref_rejected = None
        if not spec.reference_free:
            if self.precompute_ref_logps:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model or self.model, inputs)
        # 3. the loss from the table (+ the chosen NLL for ORPO)
        values = {param: getattr(self.args, attr) for param, attr in LOSS_PARAM_FIELDS.items()}
        values.update(beta=self.beta, chosen_lengths=chosen_len, rejected_lengths=rejected_len)
        losses, chosen_rewards, rejected_rewards = spec.fn(chosen_logps, rejected_logps, ref_chosen, ref_rejected,
                                                           **spec.kwargs(values))
        loss = losses.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
        if name == "orpo":
            nll = -chosen_logps.sum() / chosen_len.sum().clamp(min=1)
            loss = loss + nll
            self._metrics[mode]["nll_loss"].append(self.accelerator.gather(nll.detach()).mean().item())
        self._log_preference_metrics(mode, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)
        return loss

    def _log_preference_metrics(self, mode, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
        gather = self.accelerator.gather
        metrics = {
            "rewards/chosen": gather(chosen_rewards).mean(),
            "rewards/rejected": gather(rejected_rewards).mean(),
            "rewards/accuracies": gather((chosen_rewards > rejected_rewards).float()).mean(),
            "rewards/margins": gather(chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": gather(chosen_logps.detach()).mean(),
            "logps/rejected": gather(rejected_logps.detach()).mean(),
        }
        for key, value in metrics.items():
            self._metrics[mode][key].append(value.item())


def to_trl_pairs(pairs: list, template: str | None):
    """Preference pairs -> a TRL dataset, with ``data.template`` applied ("chat": user/assistant messages)."""
    return to_trl_dataset([common.templated(p, template, ("chosen", "rejected")) for p in pairs], metadata=False)


def preference_loader(recipe, tokenizer, stage_dir: Path):
    """``load_fn`` for :func:`common.load_split`: read, check (report saved), keep the clean pairs."""
    return common.stage_loader(recipe, "preference", tokenizer, stage_dir)


def run(recipe, stage_dir, model_path=None) -> dict:
    """Preference optimisation; returns the stage result (model_dir, metrics, model_source)."""
    stage_dir = Path(stage_dir)
    args = recipe.train
    set_seed(recipe.seed)
    # 1. policy (+ explicit reference for full fine-tuning, loaded from a path like the policy)
    model, tokenizer, source, peft_config, ref_model = common.policy_and_reference(
        recipe, model_path, needs_reference=not args.precompute_ref_log_probs and args.loss not in L.REFERENCE_FREE)
    # 2. checked data; 3. trainer; 4. train and save
    train_pairs, val_pairs = common.load_split(recipe.data, preference_loader(recipe, tokenizer, stage_dir),
                                               recipe.seed)
    train_ds = to_trl_pairs(train_pairs, recipe.data.template)
    eval_ds = to_trl_pairs(val_pairs, recipe.data.template) if val_pairs else None
    trainer = AlignkitDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_ds,
                                 eval_dataset=eval_ds, processing_class=tokenizer, peft_config=peft_config,
                                 callbacks=common.stage_callbacks(stage_dir),
                                 pinned_attention=recipe.model.attn_implementation)
    logger.info("DPO loss %s (beta=%g, %s), reference: %s", args.loss, args.beta,
                "padding-free pairs" if trainer.padding_free else "padded pairs",
                "none (reference-free)" if args.loss in L.REFERENCE_FREE else
                "precomputed" if args.precompute_ref_log_probs else
                "policy with adapter disabled" if peft_config else "explicit copy")
    return common.train_and_save(trainer, recipe, stage_dir, tokenizer, source)

