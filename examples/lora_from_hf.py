"""A LoRA fine-tune that starts from a Hugging Face model directory, resumes after a
pre-emption, and ships the merged model and the adapter.
torchrun --nproc_per_node=2 examples/lora_from_hf.py HF_DIR CKPT_ROOT OUT_DIR"""
import os
import sys

import peft
import torch
import torch.distributed as dist
import transformers
from torch.distributed.fsdp import fully_shard

from dcp_universal import CheckpointManager, export_hf, export_peft

hf_dir, root, out = sys.argv[1:4]
if "RANK" in os.environ:
    dist.init_process_group("gloo")  # "nccl" on GPUs
config = transformers.AutoConfig.from_pretrained(hf_dir)
model = transformers.AutoModelForCausalLM.from_config(config)  # weights: from init_from below
model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16,
                                                   target_modules=["q_proj", "v_proj"]))
if dist.is_initialized():
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

with CheckpointManager(root, keep_last=2) as mgr:
    report = mgr.load(model, optimizer, init_from=hf_dir)  # HF weights on the first start
    start = mgr.latest_step() or 0
    for step in range(start + 1, start + 6):
        ids = torch.randint(0, config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(step))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    mgr.save(start + 5, model, optimizer)
    path = mgr.step_path(start + 5)
rank0 = not dist.is_initialized() or dist.get_rank() == 0
if rank0:
    print(f"step {start + 5}: loss {loss.item():.4f}")
    export_peft(path, f"{out}/adapter", overwrite=True)  # for PeftModel.from_pretrained(base, ...)
# every process writes its share of the merged model's safetensors files
export_hf(path, f"{out}/merged", config=f"{hf_dir}/config.json", overwrite=True)
if dist.is_initialized():
    dist.barrier()  # every process done before any tears its connections down
    dist.destroy_process_group()
