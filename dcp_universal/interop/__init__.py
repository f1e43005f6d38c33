"""Other tools' formats: Hugging Face safetensors (:mod:`.safetensors` reads,
:mod:`.hf` exports), PEFT (:mod:`.peft`: its LoRA kind, factors, adapter directories,
export) and legacy ``torch.save`` files (:mod:`.legacy`). Each input format
registers itself with :mod:`dcp_universal.sources`."""
