"""PEFT, in one place: its LoRA layers as an adapter kind, its factors inside other
tools' DCP checkpoints, its adapter directories (``adapter_model.safetensors`` and
``adapter_config.json``) as an input format, and :func:`export_peft`.

PEFT is never imported here: its classes are recognised by name, so this module costs
nothing where PEFT is not installed.

* **The kind** (:class:`PeftLoRAKind`, :mod:`.kind`): LoRA on Linear (and transformers' Conv1D, with
  ``fan_in_fan_out``) and Embedding. The scale is the layer's own ``scaling`` (so
  rsLoRA's ``alpha / sqrt(r)`` is honoured); adapters merged into the base
  (``merge_adapter``) or disabled add nothing; DoRA and other variants are refused.
* **Factors in a plain DCP of a PEFT model** (:func:`peft_factors`, :mod:`.factors`: the
  factor rule
  registered with :mod:`dcp_universal.sources.dcp`): read as they are into a target with
  the same adapters, otherwise merged into the base weight on load with the scale from
  the ``adapter_config.json`` PEFT writes beside them.
* **An adapter directory** as a source (:class:`PeftAdapterFormat`, :mod:`.adapter_dir`): loading it into a
  LoRA model sets the adapters from the files and keeps the base.
* **Export** (:func:`export_peft`, :mod:`.export`) from any LoRA step, PEFT-made or the library's own
  ``LoRALinear`` / ``LoRAEmbedding``: the manifest records every update as
  ``scale * L @ R`` with ``L`` lined up with the base weight's rows, and PEFT's layouts
  are fixed functions of ``L`` and ``R``:

  * Linear, weight ``(out, in)``: ``lora_A.weight = R`` ``(r, in)``, ``lora_B.weight = L``;
  * Conv1D (``fan_in_fan_out``), weight ``(in, out)``: ``lora_A.weight = L.T``,
    ``lora_B.weight = R.T``;
  * Embedding, weight ``(num, dim)``: ``lora_embedding_A = L.T`` ``(r, num)``,
    ``lora_embedding_B = R.T`` ``(dim, r)``.

  The scale goes into the config as ``lora_alpha = scale * r`` (``use_rslora`` off), with
  ``rank_pattern`` / ``alpha_pattern`` for modules whose rank or scale differ from the
  most common one. What PEFT cannot represent is refused: more than one update on a
  module, or trained weights outside the adapters (a step whose ``adapters/`` also holds
  unfrozen base parameters).
"""

from dcp_universal.interop.peft.kind import PeftLoRAKind  # registers the kind
from dcp_universal.interop.peft.factors import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PeftFactors,
                                                merge_terms, peft_factors, peft_scale,
                                                peft_transposed, read_peft_config)
from dcp_universal.interop.peft.export import export_peft
from dcp_universal.interop.peft.adapter_dir import PeftAdapterFormat, stage_adapter

__all__ = ["PeftLoRAKind", "PeftFactors", "peft_factors", "read_peft_config", "peft_scale",
           "peft_transposed", "merge_terms", "PeftAdapterFormat", "export_peft",
           "stage_adapter", "ADAPTER_WEIGHTS", "ADAPTER_CONFIG"]
