"""Tiny mixture-of-experts models as transformers 5 builds them (fused 3-D experts:
Qwen3-MoE and Mixtral ``(E, out, in)``, GPT-OSS ``(E, in, out)`` with biases), with PEFT
LoRA on the expert parameters (``target_parameters``). Random weights, nothing
downloaded."""

from __future__ import annotations

import pytest
import torch

from hf_models import randomize_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 61
EXPERTS = 4
BOTH = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def qwen3_moe(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=EXPERTS, num_experts_per_tok=2, tie_word_embeddings=False)
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


def mixtral(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=EXPERTS,
        num_experts_per_tok=2, tie_word_embeddings=False)
    return transformers.MixtralForCausalLM(cfg).eval()


def gpt_oss(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=EXPERTS,
        num_experts_per_tok=2, tie_word_embeddings=False, layer_types=["full_attention"] * 2)
    return transformers.GptOssForCausalLM(cfg).eval()


BUILDERS = {"qwen3_moe": qwen3_moe, "mixtral": mixtral, "gpt_oss": gpt_oss}


def with_expert_lora(model, *, params=BOTH, modules=("q_proj",), r: int = 2, alpha: float = 6,
                     seed: int = 1):
    """PEFT LoRA on the expert ``params`` (and attention ``modules``), every factor random."""
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(modules) or None,
                          target_parameters=list(params))
    return randomize_lora(peft.get_peft_model(model, cfg), seed)
