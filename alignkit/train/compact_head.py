"""The compact LM head the SFT and DPO stages give their models: the head runs inside
:func:`alignkit.losses.lm_head_log_probs` on the scored positions only.

TRL 1.16's fused head (``trl.trainer.utils.add_fused_lm_head``) never builds the ``(N, V)`` logits either, but off
CUDA it scores every position (prompt and pad tokens included, so that tile shapes stay fixed for compilers), in
its own tiles, with an extra pass for each metric. The compact head drops the positions whose label is -100 before
the head, computes the entropy and token accuracy (``is_top1``) inside the same tiles, and returns TRL's
``FusedCausalLMOutput``, so TRL's trainers read it unchanged (loss, ``entropy`` and ``mean_token_accuracy``).

It runs where :func:`alignkit.models.plain_lm_head` says the head's output is the model's logits (checked on
every call: PEFT may wrap the head after installation). A plain ``nn.Linear`` head that is sharded (FSDP, ZeRO-3)
or placed by a ``device_map`` hook goes to TRL's fused head (SFT), which gathers it; a wrapped head (LoRA or
``modules_to_save`` on ``lm_head``, a quantised head) is scored from the model's own logits: TRL's fused head
reads ``lm_head.weight`` and would drop the adapter. Models that route experts or rescale their logits keep
TRL's path (nothing is installed).
"""
from __future__ import annotations

import functools
import types

import torch
from accelerate.utils import is_peft_model
from trl.trainer.utils import FusedCausalLMOutput

from alignkit.losses import IGNORE_INDEX, lm_head_log_probs
from alignkit.models import plain_lm_head, rescales_logits

#: the per-token fields of ``FusedCausalLMOutput`` the compact head can fill besides ``log_probs``
EXTRA_OUTPUTS = ("entropy", "is_top1")
#: the keywords a patched forward answers: DPO asks by name; SFT takes over TRL's ``fused_lm_head`` calls
KEYWORDS = ("compact_lm_head", "fused_lm_head")
_MARK = "_alignkit_compact_head"


def add_compact_lm_head(model, *, keyword: str = "compact_lm_head", outputs: tuple[str, ...] = ()) -> bool:
    """Patch ``model.forward`` so that ``model(..., labels=ids | shift_labels=ids, <keyword>=True)`` runs the
    backbone, then the compact head, and returns ``FusedCausalLMOutput(loss, log_probs, entropy, is_top1,
    label_mask)`` (``outputs`` names the extra fields, others None; per-token fields are 0 / False where the
    label is -100). ``labels`` are shifted as the model's own loss does (position t predicts ``labels[t+1]``);
    ``shift_labels`` are taken as aligned. ``loss`` is TRL's: ``-sum(log_probs) / num_items_in_batch`` (or the
    number of scored tokens).

    ``keyword="compact_lm_head"`` (DPO): install before TRL wraps the model. ``keyword="fused_lm_head"``
    (SFT): install over TRL's ``add_fused_lm_head``. A head that cannot run outside the model is scored from
    the model's own logits, or by TRL's fused forward for a sharded or hooked ``nn.Linear`` (SFT). Calls
    without the keyword (generation, TRL's other forwards) reach the original forward. Returns False (nothing installed) for a PEFT wrapper
    (patch its base model), a model that routes experts or one whose config rescales the logits."""
    if keyword not in KEYWORDS or not set(outputs) <= set(EXTRA_OUTPUTS):
        raise ValueError(f"add_compact_lm_head: keyword in {KEYWORDS}, outputs among {EXTRA_OUTPUTS}; got "
                         f"{keyword!r}, {outputs!r}")
    if (is_peft_model(model) or getattr(model.config.get_text_config(), "output_router_logits", False)
            or rescales_logits(model.config)):
        return False
    original = model.forward

    @functools.wraps(type(model).forward)  # generate() checks its keyword arguments against this signature
    def forward(self, *args, **kwargs):
        if not kwargs.get(keyword):
            return original(*args, **kwargs)
        head = plain_lm_head(self)
        if head is None and keyword == "fused_lm_head" and type(self.get_output_embeddings()) is torch.nn.Linear:
            return original(*args, **kwargs)  # TRL's fused head gathers a sharded or device-mapped Linear
        kwargs.pop(keyword)
        labels, shift_labels = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        if head is None:  # the model's own (B, T, V) logits
            states, score = original(*args, **kwargs).logits, _from_logits
        else:  # the backbone's (B, T, H) hidden states
            states, score = self.base_model(*args, **kwargs).last_hidden_state, functools.partial(_from_head, head)
        if shift_labels is None:
            states, shift_labels = states[:, :-1], labels[:, 1:]  # (B, T-1, .), (B, T-1)
        per_token = score(states, shift_labels, outputs)  # {field: (B, T-1)}
        mask = shift_labels.to(per_token["log_probs"].device) != IGNORE_INDEX
        denominator = mask.sum().clamp(min=1) if num_items is None else num_items
        return FusedCausalLMOutput(loss=-per_token["log_probs"].sum() / denominator, label_mask=mask, **per_token)

    model.forward = types.MethodType(forward, model)
    setattr(model, _MARK, keyword)
    return True


def has_compact_lm_head(model, keyword: str = "compact_lm_head") -> bool:
    """Whether ``model`` (PEFT-wrapped or not) got :func:`add_compact_lm_head` for ``keyword``."""
    base = model.get_base_model() if is_peft_model(model) else model
    return getattr(base, _MARK, None) == keyword


def _from_head(head: torch.nn.Linear, hidden: torch.Tensor, labels: torch.Tensor, outputs) -> dict:
    """The compact head's fields: the LM head inside ``lm_head_log_probs``, scored positions only."""
    device = head.weight.device  # under a device_map the backbone can end elsewhere
    got = lm_head_log_probs(hidden.to(device), head.weight, labels.to(device), bias=head.bias,
                            return_entropy="entropy" in outputs, return_top1="is_top1" in outputs)
    got = got if isinstance(got, tuple) else (got,)
    fields = ["log_probs"] + [name for name in EXTRA_OUTPUTS if name in outputs]
    return dict(zip(fields, got))


def _from_logits(logits: torch.Tensor, labels: torch.Tensor, outputs) -> dict:
    """The same fields from the model's own ``(B, T, V)`` logits (a head that cannot run outside the model)."""
    labels = labels.to(logits.device)
    mask = labels != IGNORE_INDEX
    logp_all = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    fields = {"log_probs": logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask}
    if "entropy" in outputs:
        fields["entropy"] = (-(logp_all.exp() * logp_all).sum(-1) * mask).detach()
    if "is_top1" in outputs:
        fields["is_top1"] = (logits.argmax(-1) == labels) & mask
    return fields
