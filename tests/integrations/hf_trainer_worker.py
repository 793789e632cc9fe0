"""Worker for test_hf_trainer.py: Hugging Face ``Trainer`` with optimlib's optimizer factory.

``python hf_trainer_worker.py single OUT`` trains in one process; ``torchrun --nproc_per_node 2
hf_trainer_worker.py ddp|fsdp2|ds2|ds3 OUT`` through accelerate with DDP, FSDP2 or DeepSpeed
ZeRO-2/3 on 2 CPU ranks, each rank on half of every global batch of 4 sequences (sequential
sampling, so every run sees the same global batches).  The optimizer reaches the Trainer as
``optimizer_cls_and_kwargs`` (the way in that works under every engine); the one-process run also
trains the GPT-2 GaLore case with ``optimizers=(optimlib.create_optimizer(...), None)``.  The
Trainer's defaults stay on (linear LR decay, gradient clipping at 1.0).

Cases (:data:`CASES`): tiny random ``LlamaForCausalLM`` (GQA, untied head) with GaLore on
``"all-linear"`` (SVD bases); ``GPT2LMHeadModel`` (``Conv1D`` projections, tied head) with GaLore
on the default attention and MLP targets (seeded random bases: SVD bases of this model's
near-degenerate gradient spectra turn the reduction order's rounding into up to 1e-4 relative
parameter differences), with SMMF, and with torch AdamW as the control.  Results, saved by rank 0:
per case the logged training loss of every step, the final evaluation loss, the final full
parameters, and the targeted-matrix groups' parameter names and ``proj_type``.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

from worker_common import finish, full_params

STEPS, GLOBAL_BATCH, SEQ, VOCAB = 6, 4, 16, 61
GALORE = {"rank": 4, "update_proj_gap": 2, "scale": 0.5}


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0))


def gpt2():
    """GPT-2 with its fused QKV biases frozen: the key third of ``attn.c_attn.bias`` has a gradient
    that is zero in exact arithmetic (softmax ignores a shift shared by all keys), so an Adam-type
    rule turns its rounding noise, which differs with the reduction order, into updates (torch
    AdamW: 3e-4 relative between one process and 2 ranks on that bias alone)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=24, n_layer=2, n_head=2, n_positions=SEQ,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       bos_token_id=0, eos_token_id=0))
    for block in model.transformer.h:
        block.attn.c_attn.bias.requires_grad_(False)
    return model


# case -> (model builder, optimizer name, options of create_optimizer)
CASES = {
    "llama_galore": (llama, "galore_adamw", {"lr": 1e-2, "weight_decay": 0.1, "target_modules": "all-linear",
                                             **GALORE}),
    "gpt2_galore": (gpt2, "galore_adamw", {"lr": 1e-2, "weight_decay": 0.1, "projection": "random", **GALORE}),
    "gpt2_smmf": (gpt2, "smmf", {"lr": 1e-2}),
    "gpt2_adamw": (gpt2, "adamw", {"lr": 1e-2, "weight_decay": 0.1}),  # the control: torch.optim.AdamW
}


class Tokens(torch.utils.data.Dataset):
    """``n`` random sequences of ``SEQ`` tokens; the labels are the inputs (causal LM)."""

    def __init__(self, n: int, seed: int):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def engine_args(engine: str) -> dict:
    if engine in ("single", "ddp"):
        return {}
    if engine == "fsdp2":
        return {"fsdp": True, "fsdp_config": {"version": 2}}
    stage = int(engine[2:])
    zero = {"stage": stage, **({"stage3_gather_16bit_weights_on_model_save": True} if stage == 3 else {})}
    return {"deepspeed": {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                          "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
                          "zero_optimization": zero, "steps_per_print": 10 ** 9}}


def fsdp_on_cpu() -> None:
    """accelerate turns on FSDP only for accelerator devices: on CPU ranks (``MULTI_CPU``) it
    drops the FSDP plugin and trains with DDP, silently.  Keep the plugin, as it would on GPUs."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    AcceleratorState.__init__ = patched


def run(engine: str, case: str, world: int, way: str = "factory") -> dict:
    from transformers import Trainer, TrainingArguments

    import optimlib
    from optimlib.integrations.transformers import optimizer_cls_and_kwargs

    build, name, options = CASES[case]
    torch.manual_seed(0)
    model = build()
    if way == "factory":
        optimizer = {"optimizer_cls_and_kwargs": optimizer_cls_and_kwargs(name, **options)}
    else:
        optimizer = {"optimizers": (optimlib.create_optimizer(model, name, **options), None)}
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=GLOBAL_BATCH // world,
                             per_device_eval_batch_size=GLOBAL_BATCH // world, max_steps=STEPS, logging_steps=1,
                             save_strategy="no", report_to=[], train_sampling_strategy="sequential", seed=0,
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
                             **engine_args(engine))
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(STEPS * GLOBAL_BATCH, seed=1),
                      eval_dataset=Tokens(2 * GLOBAL_BATCH, seed=2), **optimizer)
    trainer.train()
    groups = [(list(g["names"]), g.get("proj_type")) for g in unwrap(trainer.optimizer).param_groups
              if g.get("rank") is not None]
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    eval_loss = trainer.evaluate()["eval_loss"]
    if engine.startswith("ds"):  # ZeRO-3: gathered by DeepSpeed, on rank 0
        params = {k: v.detach().float().clone() for k, v in
                  (trainer.accelerator.get_state_dict(trainer.model_wrapped) or {}).items()}
    else:
        params = full_params(trainer.model)
    return {"losses": losses, "eval_loss": eval_loss, "params": params, "matrix_groups": groups}


def unwrap(optimizer):
    """The client optimizer inside accelerate's and DeepSpeed's wrappers."""
    while getattr(optimizer, "optimizer", optimizer) is not optimizer:
        optimizer = optimizer.optimizer
    return optimizer


def main() -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    engine, out, cases = argv[0], argv[1], tuple(argv[2:]) or tuple(CASES)
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if engine == "fsdp2":
        fsdp_on_cpu()
    results = {case: run(engine, case, world) for case in cases}
    if engine == "single":
        results["gpt2_galore/optimizers"] = run(engine, "gpt2_galore", world, way="optimizers")
    finish(results, out)


if __name__ == "__main__":
    main()
