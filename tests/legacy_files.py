"""Checkpoints saved the old way, for the legacy-optimizer tests: a LoRA run of the tiny
model in the main_weight layout with its optimizer.state_dict() keyed by position."""

from __future__ import annotations

import torch

import tiny


def batch(i: int) -> torch.Tensor:
    return torch.randint(0, tiny.VOCAB, (4, 7), generator=torch.Generator().manual_seed(i))


def step(model, opt, i: int) -> None:
    model(batch(i)).logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad()


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def main_weight_layout(model) -> dict[str, torch.Tensor]:
    """``model``'s state (the library's own LoRA) in the main_weight layout, with the
    compile prefix, as nanoGPT-style LoRA runs saved it."""
    out = {}
    for k, v in model.state_dict().items():
        stem, _, leaf = k.rpartition(".")
        if ".base_layer." in k:
            k = k.replace(".base_layer.", ".main_weight.")
        elif leaf in ("lora_A", "lora_B"):
            embedding = isinstance(model.get_submodule(stem).base_layer, torch.nn.Embedding)
            v = v.T if leaf == "lora_B" and embedding else v  # the layout's B: (dim, r)
            k = f"{k}.weight"
        out[f"_orig_mod.{k}"] = v.clone()
    return out


def old_optimizer_state(model, opt) -> dict:
    """``opt.state_dict()`` as the old layout stores it: the embedding's B transposed."""
    sd = opt.state_dict()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for pos, name in enumerate(names):
        if name == "wte.lora_B":
            sd["state"][pos] = {k: (v.T.clone() if v.dim() else v) for k, v in sd["state"][pos].items()}
    return sd


def lora_run(tmp_path, *, named: bool = False):
    """A LoRA run trained 3 steps with AdamW over its trainable parameters in two groups
    (the second empty), saved the old way; then trained one more step (the reference)."""
    src = tiny.make("lora4", seed=1)
    if named:
        opt = torch.optim.AdamW([(n, p) for n, p in src.named_parameters() if p.requires_grad],
                                lr=1e-2)
    else:
        opt = torch.optim.AdamW([{"params": trainable(src)}, {"params": [], "lr": 0.0}], lr=1e-2)
    for i in range(3):
        step(src, opt, i)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": main_weight_layout(src), "optimizer": old_optimizer_state(src, opt),
                "model_args": {"lora_alpha": 8.0}, "iter_num": 3}, path)
    step(src, opt, 3)
    return src, str(path)
