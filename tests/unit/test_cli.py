from __future__ import annotations

import json

import torch

import tiny
from dcp_universal import save_model
from dcp_universal.cli import main


def test_inspect_lists_every_key_with_shape_dtype_bytes_and_totals(tmp_path, capsys):
    model = tiny.make("lora4")
    save_model(model, str(tmp_path / "m"))
    assert main(["inspect", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    plain = tiny.make("plain").state_dict()
    for key, t in plain.items():
        line = next(l for l in out.splitlines() if l.startswith(key + " "))
        assert line.split()[1:] == ["x".join(map(str, t.shape)), "float32", str(t.numel() * 4)]
    total = sum(t.numel() * 4 for t in plain.values())
    assert f"{len(plain)} keys, {sum(t.numel() for t in plain.values()):,} elements, {total:,} bytes" in out
    assert "lora" not in out


def test_inspect_bad_path_exits_2_with_message(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "is not a model checkpoint" in capsys.readouterr().err


# ---- every format load_model reads; errors a user can act on ------------------------

def _lora_root(tmp_path):
    from hf_models import llama, with_lora
    from dcp_universal import CheckpointManager

    model = with_lora(llama(tied=False), target_modules=["q_proj"])
    with CheckpointManager(str(tmp_path / "root")) as mgr:
        for step in (1, 2):
            mgr.save(step, model, metrics={"loss": 3.0 - step})
    return model, str(tmp_path / "root")


def test_inspect_reads_every_format_load_model_reads(tmp_path, capsys):
    import torch
    from hf_models import llama
    from dcp_universal import export_peft

    model, root = _lora_root(tmp_path)
    assert main(["inspect", root]) == 0
    out = capsys.readouterr().out
    assert f"{root}: 2 committed steps, latest 2" in out
    rows = {l.split()[0]: l for l in out.splitlines() if l[:1].isdigit()}
    assert "(latest)" in rows["2"] and "adapters " in rows["2"] and "loss=1" in rows["2"]
    assert "saved" in out and ("s ago" in rows["2"] or "just now" in rows["2"])  # its age
    assert "the frozen base of steps [1, 2]" in out

    save_model(model, str(tmp_path / "model"))
    export_peft(f"{root}/step-00000002", str(tmp_path / "adapter"))
    llama(tied=False).save_pretrained(str(tmp_path / "hf"))
    torch.save({"model": llama(tied=False).state_dict(), "iter_num": 5}, tmp_path / "ckpt.pt")
    weight = "model.layers.0.self_attn.q_proj.weight"
    for path, key in [(f"{root}/step-00000002", weight), (tmp_path / "model", weight),
                      (tmp_path / "hf", weight), (tmp_path / "ckpt.pt", weight),
                      (tmp_path / "adapter", "model.layers.0.self_attn.q_proj.lora_A.weight")]:
        assert main(["inspect", str(path)]) == 0, path
        out = capsys.readouterr().out
        assert any(l.startswith(key + " ") for l in out.splitlines()), (path, out)
        assert "base_model" not in out and "base_layer" not in out


def test_verify_checks_steps_and_roots_and_says_what_has_no_checksums(tmp_path, capsys):
    _, root = _lora_root(tmp_path)
    assert main(["verify", root, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"{root}: steps [1, 2]: OK (" in out and "sizes and CRC-32C block checksums" in out
    model_dir = tmp_path / "model"  # a save_model directory records its files' sums
    save_model(tiny.make(), str(model_dir))
    assert main(["verify", str(model_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "OK (save_model directory, " in out and "CRC-32C block checksums" in out
    data = next(f for f in sorted(__import__("os").listdir(model_dir)) if f.endswith(".distcp"))
    with open(model_dir / data, "r+b") as f:
        f.seek(5)
        byte = f.read(1)
        f.seek(5)
        f.write(bytes([byte[0] ^ 1]))
    assert main(["verify", str(model_dir), "--quiet"]) == 2
    assert data in capsys.readouterr().err
    info = json.loads((model_dir / "dcp_universal.json").read_text())
    (model_dir / "dcp_universal.json").write_text(json.dumps({**info, "files": {}}))
    assert main(["verify", str(model_dir), "--quiet"]) == 2
    assert "records no files" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    torch.save(tiny.make().state_dict(), tmp_path / "plain" / "model.pt")
    assert main(["verify", str(tmp_path / "plain" / "model.pt")]) == 2
    assert "carries no checksums" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    step = f"{root}/step-00000002/adapters"
    victim = next(f for f in sorted(__import__("os").listdir(step)) if f.endswith(".distcp"))
    with open(f"{step}/{victim}", "r+b") as f:
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 1]))
    assert main(["verify", f"{root}/step-00000002", "--quiet"]) == 2
    assert victim in capsys.readouterr().err


def test_prune_refuses_what_is_no_checkpoint_root_and_errors_name_flags(tmp_path, capsys):
    assert main(["prune", str(tmp_path / "missing"), "--keep-last", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["prune", str(tmp_path / "empty"), "--keep-last", "1"]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    _, root = _lora_root(tmp_path)
    assert main(["prune", root, "--keep-last", "0"]) == 2
    err = capsys.readouterr().err
    assert "--keep-last 0: expected a positive whole number" in err and "keep_last=" not in err
    assert "None" not in err and "leave the flag out" in err  # a hint a user can type
    assert main(["export", root + "/step-00000002", str(tmp_path / "o"), "--dtype", "bf17"]) == 2
    assert "--dtype 'bf17'" in capsys.readouterr().err


def test_version_help_storage_options_and_debug(tmp_path, capsys, monkeypatch):
    import pytest
    import dcp_universal

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and f"dcp-universal {dcp_universal.__version__}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "Inspect, verify, prune, convert and export" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["inspect", "x", "--storage-options", "{endpoint"])
    assert e.value.code == 2 and "argument --storage-options: not JSON" in capsys.readouterr().err

    save_model(tiny.make(), str(tmp_path / "m"))
    from dcp_universal import sources

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(sources, "open_source", broken)
    assert main(["inspect", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "error: RuntimeError: boom" in err and "--debug" in err and "Traceback" not in err
    with pytest.raises(RuntimeError, match="boom"):
        main(["inspect", str(tmp_path / "m"), "--debug"])


def test_storage_options_reach_s3(s3, capsys):
    import json
    from s3server import fresh_prefix

    url, options = s3
    path = fresh_prefix(url) + "/m"
    save_model(tiny.make(), path, storage_options=options)
    assert main(["inspect", path, "--storage-options", json.dumps(options)]) == 0
    assert "total: " in capsys.readouterr().out
    assert main(["inspect", path]) == 2  # no endpoint: an error, not a traceback
    err = capsys.readouterr().err
    assert err.startswith("dcp-universal: error: ") and "Traceback" not in err


def test_convert_says_when_the_file_has_no_step_number(tmp_path, capsys):
    import torch

    torch.save({"model": tiny.make().state_dict()}, tmp_path / "ckpt.pt")
    assert main(["convert", str(tmp_path / "ckpt.pt"), str(tmp_path / "root")]) == 0
    assert "records no step number" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "ckpt.pt"), str(tmp_path / "root"), "--step", "7"]) == 0
    assert "records no step number" not in capsys.readouterr().err


def test_a_reader_that_leaves_early_gets_no_broken_pipe_traceback(tmp_path):
    import subprocess
    import sys

    model = torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(1500)])
    save_model(model, str(tmp_path / "m"))  # its listing is larger than a pipe's buffer
    cli = "import sys; from dcp_universal.cli import main; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", cli, "inspect", str(tmp_path / "m")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline()  # `| head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Broken pipe" not in err and "Traceback" not in err, err


def test_a_hint_to_overwrite_is_the_flag_itself(tmp_path, capsys):
    save_model(tiny.make(), str(tmp_path / "m"))
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "hf"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "hf"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite to replace it" in err and "True" not in err, err
