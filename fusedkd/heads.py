"""The head transform of a Hugging Face causal LM: how its logits follow from its lm_head's ``W h + b``.

Some heads scale or soft-cap their logits: Cohere multiplies them by ``logit_scale``, Granite divides
them by ``logits_scaling``, Gemma 2/3 cap them as ``c * tanh(logits / c)`` with ``c =
final_logit_softcapping``. `head_transform` reads these from a model's config, and the losses take the
result as their ``student_*`` / ``teacher_*`` options (`HeadTransform.options`), so that the fused loss
distills the distribution the model actually predicts.
"""

from __future__ import annotations

from collections.abc import Mapping

from fusedkd._options import HeadTransform, check_logit_scale, check_softcap

__all__ = ["HeadTransform", "head_transform"]

# Config attributes that change a head's logits in ways `head_transform` does not model (multipliers of
# other architectures): refused, rather than distilling the wrong distribution.
UNSUPPORTED_HEAD_ATTRIBUTES = ("output_multiplier", "lm_head_multiplier")


def head_transform(config) -> HeadTransform:
    """The head transform of a transformers config (or a multimodal config's text config).

    Reads ``logit_scale`` (Cohere: a multiplier), ``logits_scaling`` (Granite: a divisor) and
    ``final_logit_softcapping`` (Gemma 2/3: the cap); absent or None means none. Raises ValueError for
    invalid values and for head multipliers it does not model (`UNSUPPORTED_HEAD_ATTRIBUTES`).

    Example:
        >>> from transformers import GraniteConfig
        >>> head_transform(GraniteConfig(logits_scaling=8.0))
        HeadTransform(logit_scale=0.125, softcap=None)
    """
    if isinstance(config, Mapping):
        raise TypeError(
            "head_transform takes a model's config object (model.config, or transformers.AutoConfig."
            "from_pretrained(...)), not a dict: a dict's keys are not read, and a soft cap in it would be "
            "silently lost (make one with transformers.AutoConfig.for_model(**config_dict))"
        )
    if isinstance(config, type):
        raise TypeError(
            f"head_transform takes a model's config object (model.config), not the class {config.__name__}: "
            f"make one, e.g. {config.__name__}(), or transformers.AutoConfig.from_pretrained(...)"
        )
    if not hasattr(config, "to_dict"):
        raise TypeError(
            f"head_transform takes a model's config object (model.config, a transformers.PretrainedConfig), "
            f"got {type(config).__name__}"
        )
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in UNSUPPORTED_HEAD_ATTRIBUTES:
        value = getattr(config, name, None)
        if value is not None and value != 1:
            raise ValueError(
                f"the model's logits use {name}={value}, a head multiplier fusedkd does not apply "
                "(it applies logit_scale, logits_scaling and final_logit_softcapping)"
            )
    scale = 1.0
    multiplier = getattr(config, "logit_scale", None)
    if multiplier is not None:
        scale *= check_logit_scale("config.logit_scale", multiplier)
    divisor = getattr(config, "logits_scaling", None)
    if divisor is not None:
        scale /= check_logit_scale("config.logits_scaling", divisor)
    softcap = getattr(config, "final_logit_softcapping", None)
    return HeadTransform(scale, check_softcap("config.final_logit_softcapping", softcap))
