"""Tiny configurations of the models people fine-tune, built in-process with random
weights (nothing is downloaded): Llama (tied and untied), Qwen2 (tied), GPT-2 (Conv1D,
tied), and the encoder-decoders T5 and BART, whose tie groups have four names."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the dev extra installs it
peft = pytest.importorskip("peft")

VOCAB = 61


def _llama_like(config_cls, model_cls, *, tied: bool, seed: int):
    """A tiny decoder of the Llama family (Llama, Qwen2: the same config fields)."""
    torch.manual_seed(seed)
    cfg = config_cls(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=tied)
    return model_cls(cfg).eval()


def llama(*, tied: bool, seed: int = 0):
    return _llama_like(transformers.LlamaConfig, transformers.LlamaForCausalLM, tied=tied, seed=seed)


def gpt2(*, tied: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=4,
                                  n_positions=32, tie_word_embeddings=tied,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def qwen2(*, seed: int = 0):
    return _llama_like(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, tied=True, seed=seed)


def t5(*, seed: int = 0):
    """T5 binds shared, encoder/decoder embed_tokens and lm_head to one tensor (whatever
    tie_word_embeddings says, in transformers 5)."""
    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=2,
                                num_heads=4, decoder_start_token_id=0, pad_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg).eval()


def bart(*, seed: int = 0, tied: bool = True):
    torch.manual_seed(seed)
    cfg = transformers.BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24,
        decoder_ffn_dim=24, max_position_embeddings=32, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, tie_word_embeddings=tied)
    return transformers.BartForConditionalGeneration(cfg).eval()


def bert_classifier(*, seed: int = 0):
    """A tiny BERT sequence classifier: its head, ``classifier``, is what PEFT puts in
    ``modules_to_save`` (task_type="SEQ_CLS")."""
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=24,
                                  max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def vit_classifier(*, seed: int = 0):
    """A tiny ViT image classifier (8x8 images, 4x4 patches; head ``classifier``)."""
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=24, num_labels=3)
    return transformers.ViTForImageClassification(cfg).eval()


def config_of(model) -> dict:
    """The config.json that save_pretrained would write (with ``architectures``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {**base.config.to_dict(), "architectures": [type(base).__name__]}


def with_lora(model, *, seed: int = 1, **config):
    """PEFT LoRA on ``model`` with every adapter factor random (so merges are not no-ops)."""
    config.setdefault("r", 4)
    config.setdefault("lora_alpha", 8)
    return randomize_lora(peft.get_peft_model(model, peft.LoraConfig(**config)), seed)


def randomize_lora(model, seed: int):
    """Every adapter tensor (``lora_`` in its name) random, so merges are not no-ops."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def write_tiny_llama(path) -> str:
    """A tiny Llama written with save_pretrained: a 4-bit model is built only by
    from_pretrained (:func:`qlora_llama`)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def qlora_llama(path, quant_type: str = "nf4", double_quant: bool = True, *, seed: int = 1,
                compute_dtype=torch.float32, targets=("q_proj", "v_proj", "down_proj")):
    """QLoRA as people build it: the model at ``path`` loaded in 4 bits (bitsandbytes),
    PEFT LoRA with random factors on ``targets``. bitsandbytes' in-place CPU repack
    (AVX512-BF16, eval forwards) is turned off: it rewrites the weights lossily."""
    import bitsandbytes as bnb

    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)
    base = transformers.LlamaForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="cpu", dtype=torch.float32)
    model = with_lora(base, seed=seed, target_modules=list(targets))
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def tokens(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(tokens()).logits.float()


@torch.no_grad()
def seq2seq_logits(model) -> torch.Tensor:
    """An encoder-decoder's logits (token ids above BART's specials)."""
    x = tokens() % (VOCAB - 3) + 3
    return model(input_ids=x, decoder_input_ids=x).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def fsdp_layers(model, world: int):
    """FSDP2 over ``world`` ranks, each decoder layer a unit, then the whole model (a PEFT
    model's layers are its base model's)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
