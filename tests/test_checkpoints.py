"""Checkpoint loading through mmcv with akd's patches: old file formats, URLs, refusals."""
import collections
import functools
import http.server
import threading

import pytest
import torch

from akd_cli.mm import checkpoints, compat


@pytest.fixture(autouse=True)
def patched_stack():
    compat.apply()


def _zoo_like_checkpoint(path, legacy: bool):
    """What an open-mmlab model-zoo file holds: an OrderedDict of tensors and plain-typed meta."""
    state = collections.OrderedDict([("backbone.conv1.weight", torch.randn(4, 3, 3, 3)), ("neck.bias", torch.zeros(4))])
    meta = {"mmcv_version": "1.3.17", "mmdet_version": "2.18.0", "CLASSES": ("person", "car"), "epoch": 12,
            "config": "model = dict(type='FCOS')", "time": "Tue Nov 30 12:00:00 2021"}
    torch.save({"state_dict": state, "meta": meta}, path, _use_new_zipfile_serialization=not legacy)
    return state


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy-format", "zip-format"])
def test_plain_checkpoints_load_with_weights_only(tmp_path, legacy):
    from mmcv.runner.checkpoint import CheckpointLoader

    path = tmp_path / "model.pth"
    state = _zoo_like_checkpoint(path, legacy)
    loaded = CheckpointLoader.load_checkpoint(str(path), map_location="cpu")
    assert loaded["meta"]["CLASSES"] == ("person", "car")
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in state.items())


def test_a_checkpoint_url_is_downloaded_once_into_the_torch_hub_cache(tmp_path, monkeypatch):
    from mmcv.runner.checkpoint import CheckpointLoader

    served = tmp_path / "served"
    served.mkdir()
    state = _zoo_like_checkpoint(served / "fcos_r50.pth", legacy=True)
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    url = f"http://127.0.0.1:{server.server_address[1]}/fcos_r50.pth"
    try:
        first = CheckpointLoader.load_checkpoint(url, map_location="cpu")
        (served / "fcos_r50.pth").unlink()  # a second load must come from the cache
        second = CheckpointLoader.load_checkpoint(url, map_location="cpu")
    finally:
        server.shutdown()
    cached = list((tmp_path / "torch-home" / "hub" / "checkpoints").iterdir())
    assert [p.name for p in cached] == ["fcos_r50.pth"], "one complete file, no partial download left"
    for loaded in (first, second):
        assert torch.equal(loaded["state_dict"]["backbone.conv1.weight"], state["backbone.conv1.weight"])


def test_truncated_and_foreign_files_are_reported_as_such(tmp_path):
    path = tmp_path / "model.pth"
    _zoo_like_checkpoint(path, legacy=False)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:2000])
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    for bad in (truncated, text):
        with pytest.raises(checkpoints.CorruptCheckpointError, match="corrupt, truncated or not a torch file"):
            checkpoints.load_checkpoint_file(str(bad))


class _Opaque:
    pass


def test_pickled_code_needs_the_users_trust(tmp_path, monkeypatch):
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": {}, "meta": {"thing": _Opaque()}}, path)
    with pytest.raises(checkpoints.UnsafeCheckpointError, match="_Opaque"):
        checkpoints.load_checkpoint_file(str(path))
    monkeypatch.setenv(checkpoints.TRUST_ENV, "1")
    assert isinstance(checkpoints.load_checkpoint_file(str(path))["meta"]["thing"], _Opaque)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
