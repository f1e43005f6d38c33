from __future__ import annotations

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
