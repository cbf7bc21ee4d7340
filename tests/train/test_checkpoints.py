from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from four_m.train.checkpoints import AtomicCheckpointIO, PortableModelCheckpoint


def _saved_in(folder: Path) -> PortableModelCheckpoint:
    callback = PortableModelCheckpoint(dirpath=folder, every_n_train_steps=5, save_last=True)
    callback.last_model_path = str(folder / "last.ckpt")
    callback.best_model_path = str(folder / "epoch=0-step=10.ckpt")
    callback.best_k_models = {str(folder / "epoch=0-step=10.ckpt"): None}
    return callback


def test_the_same_run_in_two_folders_saves_the_same_state_and_resumes_in_its_own(tmp_path):
    first, second = _saved_in(tmp_path / "a").state_dict(), _saved_in(tmp_path / "b").state_dict()
    assert first == second
    assert (first["dirpath"], first["last_model_path"]) == (".", "last.ckpt")
    moved = PortableModelCheckpoint(dirpath=tmp_path / "c", every_n_train_steps=5, save_last=True)
    moved.load_state_dict(first)
    assert moved.last_model_path == str(tmp_path / "c/last.ckpt")
    assert moved.best_k_models == {str(tmp_path / "c/epoch=0-step=10.ckpt"): None}


def test_a_checkpoint_saved_by_lightnings_own_callback_still_resumes(tmp_path):
    own = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_last=True)
    own.last_model_path = str(tmp_path / "last.ckpt")
    portable = PortableModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_last=True)
    assert portable.state_key == own.state_key
    portable.load_state_dict(own.state_dict())
    assert portable.last_model_path == str(tmp_path / "last.ckpt")


def test_a_checkpoint_written_twice_has_the_same_bytes(tmp_path):
    state = {"state_dict": {"w": torch.arange(6.0)}, "global_step": 3}
    for name in ("a", "b"):
        AtomicCheckpointIO().save_checkpoint(state, tmp_path / name / "last.ckpt")
    assert (tmp_path / "a/last.ckpt").read_bytes() == (tmp_path / "b/last.ckpt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a/last.ckpt")["state_dict"]["w"], state["state_dict"]["w"])
