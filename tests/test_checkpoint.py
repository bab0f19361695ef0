"""Checkpoints: round trip, atomic writes, and clear reports of corrupt or mismatched files."""

import json
import os

import pytest
import torch

from nexus.checkpoint import CONFIG, WEIGHTS, load_checkpoint, read_checkpoint_config, save_checkpoint
from nexus.config import tiny
from nexus.errors import CheckpointError
from nexus.model.transformer import Transformer
from nexus.upcycling import upcycle


def _same(a: Transformer, b: Transformer) -> None:
    assert a.config == b.config
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


@pytest.mark.parametrize("kind", ["dense", "tied", "nexus", "linear"])
def test_round_trip(tmp_path, kind):
    if kind in ("dense", "tied"):
        model = Transformer(tiny(tie_embeddings=kind == "tied"))
    else:
        model = upcycle(
            Transformer(tiny()),
            [Transformer(tiny()) for _ in range(2)],
            domain_embeddings=torch.randn(2, 8),
            router=kind,
            expert_names=["x", "y"],
        )
    save_checkpoint(model, tmp_path / "ckpt", metadata={"stage": kind})
    loaded = load_checkpoint(tmp_path / "ckpt")
    _same(model, loaded)
    if kind == "tied":
        assert loaded.lm_head.weight is loaded.tok_emb.weight
    assert read_checkpoint_config(tmp_path / "ckpt")["metadata"] == {"stage": kind}
    idx = torch.randint(0, 96, (1, 10))
    torch.testing.assert_close(loaded.eval()(idx).logits, model.eval()(idx).logits)


def test_overwrite_replaces_atomically_and_leaves_no_temp_dirs(tmp_path):
    first, second = Transformer(tiny()), Transformer(tiny())
    save_checkpoint(first, tmp_path / "ckpt")
    save_checkpoint(second, tmp_path / "ckpt")
    _same(second, load_checkpoint(tmp_path / "ckpt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_save_writes_nothing_and_keeps_the_previous_checkpoint(tmp_path):
    model = Transformer(tiny())
    with pytest.raises(FileNotFoundError):
        save_checkpoint(model, tmp_path / "new", extra_files={"tokenizer.json": tmp_path / "missing.json"})
    assert list(tmp_path.iterdir()) == []
    save_checkpoint(model, tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError):
        save_checkpoint(Transformer(tiny()), tmp_path / "ckpt", extra_files={"t.json": tmp_path / "missing"})
    _same(model, load_checkpoint(tmp_path / "ckpt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_extra_files_travel_with_the_checkpoint(tmp_path):
    (tmp_path / "tok.json").write_text('{"vocab": 1}')
    save_checkpoint(
        Transformer(tiny()), tmp_path / "ckpt", extra_files={"tokenizer.json": tmp_path / "tok.json"}
    )
    assert (tmp_path / "ckpt" / "tokenizer.json").read_text() == '{"vocab": 1}'


def test_truncated_file_is_reported_corrupt(tmp_path):
    save_checkpoint(Transformer(tiny()), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt"):
        load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="corrupt or unreadable safetensors"):
        load_checkpoint(tmp_path / "ckpt", verify_checksum=False)


def test_bit_flip_is_reported_corrupt(tmp_path):
    save_checkpoint(Transformer(tiny()), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 does not match"):
        load_checkpoint(tmp_path / "ckpt")


def test_config_errors_name_the_file_and_key(tmp_path):
    save_checkpoint(Transformer(tiny()), tmp_path / "ckpt")
    cfg_file = tmp_path / "ckpt" / CONFIG
    cfg = json.loads(cfg_file.read_text())
    cfg["model"]["d_modle"] = 3
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: model: unknown key\(s\) \['d_modle'\]"):
        load_checkpoint(tmp_path / "ckpt")
    cfg_file.write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: corrupt JSON"):
        load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_weights_that_do_not_match_the_config_are_named(tmp_path):
    save_checkpoint(Transformer(tiny()), tmp_path / "ckpt")
    cfg_file = tmp_path / "ckpt" / CONFIG
    cfg = json.loads(cfg_file.read_text())
    cfg["model"]["ffn_hidden"] = 32
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"wrong shapes \['blocks.0.ffn.w_in.weight: file \(128, 32\) vs config \(64, 32\)",
    ):
        load_checkpoint(tmp_path / "ckpt")


def test_leftovers_of_a_killed_writer_are_cleaned_by_the_next_write(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout.strip()  # a pid that no longer runs
    model = Transformer(tiny())
    save_checkpoint(model, tmp_path / "ckpt")
    (tmp_path / f".ckpt.tmp-{dead}-abc").mkdir()  # killed while writing
    (tmp_path / f".ckpt.tmp-{os.getpid()}-live").mkdir()  # a live writer's (this process): kept
    save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".ckpt.tmp-{os.getpid()}-live", "ckpt"]
    # killed between the renames: the checkpoint was moved aside and the new one never arrived
    (tmp_path / "ckpt").rename(tmp_path / f".ckpt.old-{dead}-abc")
    save_checkpoint(Transformer(tiny()), tmp_path / "other")  # unrelated writes leave it alone
    from nexus.io import recover

    recover(tmp_path / "ckpt")
    _same(model, load_checkpoint(tmp_path / "ckpt"))
