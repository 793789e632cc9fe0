"""Bad configs and paths stop the run before any training, with one paragraph naming the cause."""

import numpy as np
import pytest

from conftest import PRETRAIN, TINY_RUN, launch
from optimlib.data import DataError
from optimlib.train.config import ConfigError, load_config
from optimlib.train.loop import pretrain


def _cli_error(tmp_path, *args, launcher="python") -> str:
    with pytest.raises(AssertionError) as info:
        launch(PRETRAIN, [*TINY_RUN, f"out_dir={tmp_path}", *args], launcher=launcher, timeout=180)
    text = str(info.value)
    if launcher == "python":                                  # torchrun's agent prints its own traceback
        assert "Traceback" not in text, text
    assert not (tmp_path / "checkpoints").exists()           # nothing ran
    return text


def test_missing_corpus(tmp_path):
    assert "data.source: no such file or folder" in _cli_error(tmp_path, "data.source=/nowhere/corpus.txt")


def test_unreadable_token_file(tmp_path):
    bad = tmp_path / "tokens.bin"
    bad.write_bytes(b"\x01\x02\x03")                        # 3 bytes: not a whole number of uint16 tokens
    text = _cli_error(tmp_path, f"data.source={bad}", "data.vocab_size=300")
    assert "not a multiple of 2" in text


def test_token_ids_outside_the_vocabulary(tmp_path):
    bad = tmp_path / "tokens.bin"
    np.full(10_000, 999, dtype=np.uint16).tofile(bad)
    text = _cli_error(tmp_path, f"data.source={bad}", "data.vocab_size=300")
    assert "outside data.vocab_size" in text


def test_deepspeed_section_without_the_deepspeed_launcher(tmp_path):
    text = _cli_error(tmp_path, "deepspeed.zero_stage=2")
    assert "config section 'deepspeed'" in text and "engine is single" in text


def test_deepspeed_engine_without_its_launcher(tmp_path):
    assert "needs the deepspeed launcher" in _cli_error(tmp_path, "engine=deepspeed")


def test_unknown_reparam_method_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"reparam.*unknown reparameterization 'nope'"):
        pretrain(load_config(None, [*TINY_RUN, f"out_dir={tmp_path}", "reparam.method=nope"]))


def test_unknown_nonfinite_policy():
    with pytest.raises(ConfigError, match="train.on_nonfinite"):
        load_config(None, ["train.on_nonfinite=ignore"])


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


@pytest.mark.slow
@pytest.mark.distributed
def test_world_size_that_does_not_divide_the_batch(tmp_path):
    text = _cli_error(tmp_path, "train.batch_size=6", "train.micro_batch=2", launcher="torchrun")
    assert "'train.batch_size' (6) must be a multiple of train.micro_batch x world size (2 x 2)" in text


def test_optimizer_keyword_it_does_not_take(tmp_path):
    text = _cli_error(tmp_path, "optim.name=adamp", "optim.kwargs={momentum_typo: 0.9}")
    assert "config section 'optim' (optim.kwargs) does not fit optimizer 'adamp'" in text
    assert "momentum_typo" in text
