"""The DeepSpeed ZeRO engine of ``launch/pretrain.py`` (``deepspeed launch/pretrain.py ...``)."""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from optimlib.optim import get_optimizer_spec
from optimlib.train.config import ConfigError, micro_batch_for
from optimlib.train.engine import Engine, NonFiniteGradientError, StepResult, clip_grads_


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` with our optimizer as the client optimizer."""

    name = "deepspeed"

    def ds_config(self) -> dict:
        cfg = self.cfg
        base: dict = {}
        if cfg.deepspeed.config:
            path = cfg.deepspeed.config
            if not os.path.isfile(path):
                raise ConfigError(f"config key 'deepspeed.config': file '{path}' does not exist")
            with open(path) as fh:
                base = json.load(fh)
        t = cfg.train
        micro, accum = micro_batch_for(t, self.world_size), self.accumulation
        for key, ours in (("train_batch_size", t.batch_size), ("train_micro_batch_size_per_gpu", micro),
                          ("gradient_accumulation_steps", accum), ("gradient_clipping", t.grad_clip)):
            if key in base and base[key] != ours:
                raise ConfigError(f"deepspeed JSON '{cfg.deepspeed.config}' sets {key}={base[key]}, which "
                                  f"contradicts the run config ({key} comes from train.batch_size, "
                                  f"train.micro_batch, train.grad_clip and the world size); remove it from the JSON")
        zero = dict(base.get("zero_optimization", {}))
        if "stage" in zero and zero["stage"] != cfg.deepspeed.zero_stage and cfg.deepspeed.zero_stage:
            raise ConfigError(f"deepspeed JSON sets zero_optimization.stage={zero['stage']} but "
                              f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}")
        zero.setdefault("stage", cfg.deepspeed.zero_stage)
        out = {
            **base,
            "train_batch_size": t.batch_size,
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accum,
            # DeepSpeed 0.19 clips at 1.0 unless told: always say it explicitly.
            "gradient_clipping": t.grad_clip,
            "zero_allow_untested_optimizer": True,
            "zero_optimization": zero,
            "steps_per_print": 10 ** 9,
        }
        if self.autocast_dtype is torch.bfloat16:
            out.setdefault("bf16", {"enabled": True})
        return out

    def setup(self, model: nn.Module) -> None:
        import deepspeed

        spec = get_optimizer_spec(self.cfg.optim.name)
        model = model.to(self.device)
        # Shape-aware optimizers need one parameter per group so that each ZeRO partition is a
        # slice of one parameter (see optimlib.distributed.layout).
        self.split_replicated(model, per_parameter_groups=spec.shape_aware)
        optimizer = self.build_optimizer(model, per_parameter_groups=spec.shape_aware)
        self.autocast_dtype = None  # DeepSpeed's bf16 section casts the model itself
        engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config(),
                                                    dist_init_required=False)
        self.model = engine
        self.optimizer = ds_opt
        if self.replicated is not None and self.cfg.train.grad_clip > 0:
            self._clip_with_replicated(ds_opt)

    def _clip_with_replicated(self, ds_opt) -> None:
        """Make ZeRO's global gradient norm (which it clips by, inside ``model.step()``) include
        the replicated parameters' gradients, as a one-process run's does.  ZeRO has no public
        hook for it: the per-optimizer norm method is wrapped (ZeRO-1/2 ``scaled_global_norm``,
        ZeRO-3 ``_get_norm_groups``); the replicated gradients are averaged just before."""
        from deepspeed.runtime.utils import combine_grad_norm_groups

        def extra():  # unscaled, like ZeRO's: fp32 and bf16 runs have no loss scaling
            return self.replicated.grad_norm()

        if callable(getattr(ds_opt, "_get_norm_groups", None)):  # ZeRO-3
            groups = ds_opt._get_norm_groups
            ds_opt._get_norm_groups = lambda: [*groups(), extra()]
        elif callable(getattr(ds_opt, "scaled_global_norm", None)):  # ZeRO-1/2
            scaled = ds_opt.scaled_global_norm
            ds_opt.scaled_global_norm = lambda norm_type=2: combine_grad_norm_groups([scaled(norm_type), extra()])
        else:
            raise ConfigError(f"DeepSpeed's {type(ds_opt).__name__} (zero_optimization.stage "
                              f"{self.ds_config()['zero_optimization']['stage']}) gives no way to clip the replicated "
                              f"parameters of this model by the global norm; use ZeRO stage 1, 2 or 3, or "
                              f"train.grad_clip=0")

    def loss(self, x, y):
        logits = self.model(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))

    def forward_backward(self, x, y, scale, last):
        loss = self.loss(x, y)
        # DeepSpeed owns the step (inside model.step() below), so a non-finite step cannot be
        # skipped from here: the config check allows only train.on_nonfinite=stop, caught at the loss.
        if not bool(torch.isfinite(loss)):
            raise NonFiniteGradientError(f"non-finite loss ({float(loss)}) on rank {self.rank}: its gradients would "
                                         f"reach every parameter; train.on_nonfinite=stop ended the run")
        self.model.backward(loss)  # DeepSpeed divides by the accumulation steps itself
        if last and self.replicated is not None:
            self.replicated.average_grads_()  # before model.step(): its clipping norm includes them
        self.model.step()  # a no-op until the accumulation boundary
        return loss.detach()

    def step(self) -> StepResult:
        """DeepSpeed stepped inside ``forward_backward``; the replicated parameters step here,
        clipped by the same global norm (the one ``_clip_with_replicated`` made ZeRO compute)."""
        clip = self.cfg.train.grad_clip
        norm = self.model.get_global_grad_norm() if clip > 0 else None
        norm = float(norm) if norm is not None else None
        if self.replicated is not None:
            if clip > 0:
                clip_grads_(self.replicated.grads(), clip, torch.tensor(norm, dtype=torch.float32))
            self.replicated.optimizer.step()
            self.replicated.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm)

    def grad_bytes(self) -> None:
        """Not measured: ZeRO keeps the gradients in its own flat buffers, not in ``.grad``."""
        return None

    @property
    def module(self) -> nn.Module:
        return self.model.module
