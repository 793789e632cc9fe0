"""Layer-wise (optimizer-in-backward) training under Hugging Face's ``Trainer`` with gradient
accumulation (:mod:`optimlib.integrations.transformers_layerwise`).

Oracle: the ordinary Trainer run -- the same model, data, arguments and optimizer, handed over as
``optimizers=(optimlib.create_optimizer(...), None)``.  Tiny random ``LlamaForCausalLM``, one
epoch of 5 micro-batches with ``gradient_accumulation_steps=2`` (windows of 2, 2 and 1: the
epoch's short last window too), linear LR with warmup, in one process on CPU.  Each parameter's
update reads only its own gradient, state and group, so stepping it in the backward pass instead
of after it is the same arithmetic in the same order: logged losses, logged learning rates and
final parameters must be bit-identical.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from optimlib.integrations.transformers import (LayerwiseTrainerOptimizer, layerwise_optimizers,  # noqa: E402
                                                optimizer_cls_and_kwargs)
from optimlib.optim.factory import create_optimizer  # noqa: E402

SEQ, VOCAB, SAMPLES = 12, 53, 10
# GaLore refreshes its bases every 2 steps, so the 3 steps use two bases per matrix.
CASES = {
    "galore_adamw": {"target_modules": ["attn", "mlp"], "rank": 4, "update_proj_gap": 2, "scale": 0.5},
    "adamw": {},
}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0))


def dataset() -> list[dict]:
    tokens = torch.randint(1, VOCAB, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": t, "labels": t} for t in tokens]


def training_args(out, **overrides) -> TrainingArguments:
    options = dict(output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=2,
                   gradient_accumulation_steps=2, max_grad_norm=0.0, learning_rate=1e-2, weight_decay=0.1,
                   lr_scheduler_type="linear", warmup_steps=1, logging_steps=1, save_strategy="no",
                   report_to=[], disable_tqdm=True, use_cpu=True, seed=3)
    return TrainingArguments(**{**options, **overrides})


class GradsSeen(TrainerCallback):
    """Whether any parameter holds a gradient after a non-final micro-batch and right before
    ``optimizer.step()``."""

    def __init__(self, model):
        self.model, self.substep, self.pre_step = model, [], []

    def _any(self) -> bool:
        return any(p.grad is not None for p in self.model.parameters())

    def on_substep_end(self, args, state, control, **kwargs):
        self.substep.append(self._any())

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.pre_step.append(self._any())


def train(name: str, layerwise: bool, out, resume: str | None = None, **arg_overrides):
    model = tiny_llama()
    args = training_args(out, **arg_overrides)
    if layerwise:
        optimizers = layerwise_optimizers(model, name, args, **CASES[name])
    else:
        _, options = optimizer_cls_and_kwargs(name, args, **CASES[name])
        optimizers = (create_optimizer(model, **options), None)
    seen = GradsSeen(model)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), optimizers=optimizers, callbacks=[seen])
    trainer.train(resume_from_checkpoint=resume)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return {"loss": [e["loss"] for e in logs], "lr": [e["learning_rate"] for e in logs],
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "optimizer": optimizers[0], "seen": seen, "steps": trainer.state.global_step}


def assert_same_params(ref: dict, got: dict) -> None:
    assert ref.keys() == got.keys()
    differ = [n for n in ref if not torch.equal(ref[n], got[n])]
    assert not differ, f"parameters differ from the ordinary run: {differ}"


@pytest.mark.parametrize("name", list(CASES))
def test_layerwise_trainer_equals_the_ordinary_trainer_bit_for_bit(name, tmp_path):
    ordinary = train(name, False, tmp_path / "ordinary")
    layerwise = train(name, True, tmp_path / "layerwise")
    assert ordinary["steps"] == layerwise["steps"] == 3
    assert len(ordinary["loss"]) == 3
    assert layerwise["loss"] == ordinary["loss"]
    assert layerwise["lr"] == ordinary["lr"] and len(set(ordinary["lr"])) == 3  # warmup, then decay
    assert_same_params(ordinary["params"], layerwise["params"])
    init = dict(tiny_llama().named_parameters())
    assert all(not torch.equal(init[n], p) for n, p in layerwise["params"].items())  # every weight trained
    # The layer-wise steps happened in the backward passes: the gradients of the first micro-batch
    # of a window are kept (accumulated), and none is left when the Trainer calls optimizer.step().
    assert layerwise["seen"].substep == [True, True] and layerwise["seen"].pre_step == [False] * 3
    assert ordinary["seen"].pre_step == [True] * 3
    optimizer = layerwise["optimizer"]
    assert isinstance(optimizer, LayerwiseTrainerOptimizer)
    if name == "galore_adamw":
        assert sum(len(g["params"]) for g in optimizer.param_groups if g.get("rank")) == 2 * 7


def test_layerwise_trainer_resumes_from_its_checkpoint(tmp_path):
    """``state_dict``/``load_state_dict`` reach the real optimizer: a run resumed from the
    checkpoint of step 2 ends where the uninterrupted run ends, bit for bit."""
    full = train("galore_adamw", True, tmp_path / "full", save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists()
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    assert saved["state"], "the checkpoint holds the real optimizer's state"
    resumed = train("galore_adamw", True, tmp_path / "resumed", resume=str(checkpoint), save_strategy="steps",
                    save_steps=2)
    # (the resumed log history starts with the checkpoint's two entries)
    assert resumed["steps"] == 3 and resumed["loss"] == full["loss"] and resumed["lr"] == full["lr"]
    assert_same_params(full["params"], resumed["params"])


def test_gradient_clipping_is_refused_by_name(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"max_grad_norm=1\.0"):
        layerwise_optimizers(model, "adamw", training_args(tmp_path, max_grad_norm=1.0))
    with pytest.raises(ValueError, match="fp16=True: the fp16 loss scaler"):
        layerwise_optimizers(model, "adamw", training_args(tmp_path, fp16=True, use_cpu=False))
    # Arguments changed after the pair was built: refused before the first parameter steps.
    args = training_args(tmp_path)
    optimizers = layerwise_optimizers(model, "adamw", args)
    args.max_grad_norm = 1.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), optimizers=optimizers)
    with pytest.raises(ValueError, match=r"max_grad_norm=1\.0"):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
