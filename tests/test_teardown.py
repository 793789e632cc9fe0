"""optimlib.distributed.teardown: the DeepSpeed CPU shared-memory buffer is found and unlinked."""

import os
from pathlib import Path

import pytest

from optimlib.distributed import teardown


@pytest.mark.skipif(not Path("/dev/shm").is_dir() or not hasattr(os, "getuid"), reason="needs POSIX /dev/shm")
def test_release_deepspeed_shm_unlinks_only_this_ranks_buffer(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # a port no real run uses: no clash with live buffers
    mine, peer = teardown.deepspeed_shm_path(0), teardown.deepspeed_shm_path(1)
    assert mine.name == f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_1_0"
    try:
        mine.write_bytes(b"x")
        peer.write_bytes(b"x")
        assert teardown.release_deepspeed_shm(0) is True
        assert not mine.exists() and peer.exists()
        assert teardown.release_deepspeed_shm(0) is False  # already gone: no error
    finally:
        for p in (mine, peer):
            p.unlink(missing_ok=True)
