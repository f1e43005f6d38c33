"""What one extra exists for, run in a venv that holds the package with that extra alone
(launch/check_extras.sh): the feature works, and without the extra the error names it.

    python launch/smoke_extra.py EXTRA WORKDIR [S3_ENDPOINT]
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import torch

import dcp_universal
from dcp_universal import CheckpointError, CheckpointManager, export_hf, load_model, save_model


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 8))


def same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


def refused_naming(extra: str, fn) -> None:
    try:
        fn()
    except CheckpointError as e:
        assert f"[{extra}]" in str(e), f"the error does not name the {extra} extra: {e}"
        return
    raise AssertionError(f"ran without the {extra} extra")


def main(extra: str, work: str, endpoint: str | None = None) -> None:
    src = model()
    save_model(src, f"{work}/m")
    has = {name: importlib.util.find_spec(name) is not None
           for name in ("safetensors", "s3fs", "peft", "tqdm", "matplotlib")}
    if extra == "core":
        assert not any(has.values()), f"the core install pulled optional packages: {has}"
        refused_naming("hf", lambda: export_hf(f"{work}/m", f"{work}/hf"))
        refused_naming("s3", lambda: save_model(src, "s3://bucket/m"))
    elif extra == "hf":
        import safetensors.torch
        export_hf(f"{work}/m", f"{work}/hf")
        saved = safetensors.torch.load_file(f"{work}/hf/model.safetensors")
        assert torch.equal(saved["1.weight"], src[1].weight.detach())
        back = model(seed=1)
        load_model(back, f"{work}/hf")
        same(back, src)
    elif extra == "s3":
        import s3fs
        options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        s3fs.S3FileSystem(**options).mkdir("extras")
        with CheckpointManager("s3://extras/run", storage_options=options) as mgr:
            mgr.save(1, src)
            back = model(seed=1)
            mgr.load(back)
        same(back, src)
    elif extra == "peft":
        import peft
        base = torch.nn.Sequential(torch.nn.Linear(8, 8))
        lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0"]))
        save_model(lora, f"{work}/lora")
        plain = torch.nn.Sequential(torch.nn.Linear(8, 8))
        load_model(plain, f"{work}/lora")
        x = torch.randn(3, 8)
        assert torch.allclose(plain(x), lora(x), atol=1e-6)
    elif extra == "progress":
        assert has["tqdm"]
        cli = os.path.join(os.path.dirname(sys.executable), "dcp-universal")
        out = subprocess.run([cli, "inspect", f"{work}/m"], capture_output=True, text=True)
        assert out.returncode == 0 and "1.weight" in out.stdout, out.stderr
    elif extra == "bench":
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        plt.plot([1, 2], [3, 4])
        plt.savefig(f"{work}/plot.png")
    else:
        raise SystemExit(f"unknown extra {extra!r}")
    print(f"extra {extra}: ok (dcp_universal {dcp_universal.__version__})")


if __name__ == "__main__":
    main(*sys.argv[1:])
