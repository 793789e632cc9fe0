"""The pretraining loop behind ``launch/pretrain.py``: plain, the same for every engine.

Each optimizer step takes the global batch ``global_batch_indices(step, ...)``; rank ``r`` takes
its contiguous part and splits it into micro-batches, so a run on 1 or N ranks, with any
engine, sees the same global batches step by step and the losses are comparable.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch

from optimlib.data import PackedBlocks, global_batch_indices, load_corpus, rank_indices
from optimlib import reparam
from optimlib.models import build_model, get_config
from optimlib.models.tensor_parallel import tensor_parallel_problem
from optimlib.train import checkpoint, run_dir
from optimlib.train.config import ConfigError, RunConfig, micro_batch_for, run_identity, to_dict
from optimlib.train.engine import NonFiniteGradientError, detect_engine, init_distributed, pick_device
from optimlib.train.engines import ENGINES
from optimlib.train.metrics import MetricsWriter, format_bytes, peak_flops, peak_rss_bytes, write_summary
from optimlib.train.schedule import warmup_cosine


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _apply_reparam(model, cfg: RunConfig):
    if not cfg.reparam.method:
        return model
    try:
        return reparam.apply(model, cfg.reparam.method, targets=cfg.reparam.targets, **cfg.reparam.options)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"config section 'reparam' (method {cfg.reparam.method!r}): {exc}") from None


def check_engine_config(cfg: RunConfig, engine_name: str) -> None:
    """Config settings that contradict the launcher, caught before anything is built."""
    if engine_name == "deepspeed":
        if "RANK" not in os.environ and "CROSS_RANK" not in os.environ:
            raise ConfigError("engine=deepspeed needs the deepspeed launcher (deepspeed [--num_gpus N] "
                              "launch/pretrain.py ...); this process was started without it")
        if cfg.train.on_nonfinite == "skip":
            raise ConfigError("config key 'train.on_nonfinite' = 'skip' is not available under DeepSpeed, which "
                              "applies the step itself; use stop (or auto)")
        if cfg.train.layerwise:
            raise ConfigError("config key 'train.layerwise' = true is not available under DeepSpeed: ZeRO owns the "
                              "gradients (it reduces them into its own flat partitions and steps the optimizer on "
                              "those after the backward pass), so no parameter can be stepped inside it; use "
                              "FSDP2 (torchrun) or engine=ddp for layer-wise stepping")
    elif cfg.deepspeed.zero_stage or cfg.deepspeed.config:
        raise ConfigError(f"config section 'deepspeed' (zero_stage={cfg.deepspeed.zero_stage}, "
                          f"config={cfg.deepspeed.config!r}) asks for DeepSpeed, but this run's engine is "
                          f"{engine_name} (launcher: {'python' if engine_name == 'single' else 'torchrun'}); launch "
                          f"with `deepspeed launch/pretrain.py ...` or drop the deepspeed settings")
    if cfg.parallel.tp > 1:
        if engine_name != "fsdp2":
            raise ConfigError(f"config key 'parallel.tp' ({cfg.parallel.tp}) needs the fsdp2 engine (torchrun), "
                              f"this run's engine is {engine_name}; launch with torchrun and engine=auto or fsdp2")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world % cfg.parallel.tp:
            raise ConfigError(f"config key 'parallel.tp' ({cfg.parallel.tp}) must divide the number of ranks "
                              f"({world}): the mesh is (ranks / tp) data-parallel x tp tensor-parallel ranks")
        problem = tensor_parallel_problem(get_config(cfg.model.name), cfg.parallel.tp)
        if problem:
            raise ConfigError(f"config key 'parallel.tp' ({cfg.parallel.tp}) does not fit model "
                              f"'{cfg.model.name}': {problem}")
        method = cfg.reparam.method
        if method in reparam.list_reparams() and not reparam.get_reparam_spec(method).tensor_parallel:
            capable = ", ".join(reparam.tensor_parallel_reparams())
            raise ConfigError(f"config key 'reparam.method' ({method}) is not available with parallel.tp > 1: "
                              f"{method} replaces the linears by layers that have no tensor-parallel form; set "
                              f"parallel.tp=1, or use a reparameterization that acts on tensor-parallel "
                              f"linears ({capable})")
    if engine_name == "ddp" and "RANK" not in os.environ:
        raise ConfigError("engine=ddp needs torchrun (torchrun --nproc_per_node N launch/pretrain.py ... "
                          "engine=ddp); this process was started without it")


class StopRequest:
    """While installed (the training loop only), SIGTERM / SIGINT set a flag; the loop then
    checkpoints and exits at the next step boundary, the ranks agreeing on it with one tiny
    all-reduce per step.  Outside the loop (start-up, the final save) and for a second signal,
    the default behaviour applies, so a launcher's shutdown is never held up.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def pretrain(cfg: RunConfig, *, local_rank: int | None = None) -> dict:
    """Run the configured pretraining; returns the summary (also written to ``summary.json``)."""
    engine_name = detect_engine(cfg, local_rank)
    check_engine_config(cfg, engine_name)
    stop = StopRequest()
    try:
        return _pretrain(cfg, engine_name, stop)
    finally:
        stop.restore()


def _pretrain(cfg: RunConfig, engine_name: str, stop: StopRequest) -> dict:
    out_dir = Path(cfg.out_dir)
    ckpt_root = out_dir / "checkpoints"
    resume_candidates = checkpoint.resolve_resume(cfg.resume, ckpt_root)
    run = checkpoint.run_record(run_identity(cfg))
    expected_run = None if cfg.resume_other_config else run
    done_before = run_dir.finished(cfg, resume_candidates, expected_run)
    if done_before is not None:
        return done_before
    run_dir.claim(cfg, resume_candidates)              # before anything is written
    device = pick_device(cfg)
    rank, world = init_distributed(device) if engine_name != "single" else (0, 1)
    if engine_name == "single" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("engine=single was asked for, but the launcher started several ranks")
    t = cfg.train
    data_world = world // cfg.parallel.tp           # the tp ranks of a replica share its data
    data_rank = rank // cfg.parallel.tp
    micro = micro_batch_for(t, data_world)
    accum = t.batch_size // (micro * data_world)

    corpus = load_corpus(cfg.data)
    seed_everything(cfg.seed)
    overrides = {"max_seq_len": max(cfg.data.seq_len, 1)}
    if cfg.model.vocab_size is not None:
        overrides["vocab_size"] = cfg.model.vocab_size
    model = build_model(cfg.model.name, **overrides)
    if corpus.vocab_size > model.config.vocab_size:
        raise ConfigError(f"the corpus has {corpus.vocab_size} token ids but model '{cfg.model.name}' has a "
                          f"vocabulary of {model.config.vocab_size}; set model.vocab_size")
    # a parametrization (N:M, compander) acts on the tensor-parallel blocks; a module replacement
    # (SLTrain, LOST, dynamic rank) comes first and the plan distributes the new layers
    after_tensor_parallel = (cfg.parallel.tp > 1 and cfg.reparam.method in reparam.list_reparams()
                             and reparam.get_reparam_spec(cfg.reparam.method).parametrization)
    if not after_tensor_parallel:
        model = _apply_reparam(model, cfg)
    flops_per_token = model.num_flops_per_token(cfg.data.seq_len)

    engine = ENGINES[engine_name](cfg, device, rank, world)
    if after_tensor_parallel:
        engine.reparameterize = lambda m: _apply_reparam(m, cfg)
    else:
        n_params = sum(p.numel() for p in model.parameters())
    engine.setup(model)
    if after_tensor_parallel:  # DTensors: numel is the global count
        n_params = sum(p.numel() for p in engine.module.parameters())

    train_blocks = PackedBlocks(corpus.train, cfg.data.seq_len)
    eval_blocks = PackedBlocks(corpus.eval, cfg.data.seq_len)
    n_eval = min(t.eval_blocks, len(eval_blocks)) // data_world * data_world
    if n_eval == 0:
        raise ConfigError(f"the held-out split has {len(eval_blocks)} blocks of data.seq_len+1 tokens, fewer "
                          f"than the {data_world} data-parallel rank(s); raise data.eval_fraction or lower "
                          f"data.seq_len")
    eval_batch = eval_blocks.get(rank_indices(np.arange(n_eval), data_rank, data_world)).to(device)

    start_step = 0
    resume_path, meta = checkpoint.load_first_good(engine, resume_candidates, run=expected_run,
                                                   trusted=cfg.resume_trusted)
    if meta is not None:
        start_step = int(meta["step"])
        skipped_steps = int(meta.get("skipped_steps", 0))
    else:
        skipped_steps = 0
    writer = MetricsWriter(out_dir, enabled=rank == 0, append=start_step > 0)
    writer.truncate_after(start_step)

    def evaluate() -> float:
        losses = [engine.eval_loss(eval_batch[i:i + micro, :-1], eval_batch[i:i + micro, 1:])
                  for i in range(0, eval_batch.size(0), micro)]
        return float(engine.all_reduce_mean(torch.stack(losses).mean()))

    progress = None
    if rank == 0 and t.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=t.steps, initial=start_step, desc=f"pretrain[{engine_name}x{world}]",
                        dynamic_ncols=True)
    first_eval = None
    if start_step == 0:
        first_eval = evaluate()
        writer.log(0, eval_loss=first_eval, eval_ppl=float(np.exp(min(first_eval, 50))))
    last_loss = last_eval = None
    tokens_per_step = t.batch_size * cfg.data.seq_len
    train_time = 0.0
    step = start_step
    interrupted = None
    stop.install()
    for step in range(start_step, t.steps):
        tic = time.perf_counter()
        factor = warmup_cosine(step, total_steps=t.steps, warmup_steps=t.warmup_steps, min_lr_ratio=t.min_lr_ratio)
        engine.set_lr(factor)
        mine = rank_indices(global_batch_indices(step, t.batch_size, len(train_blocks), cfg.seed), data_rank,
                            data_world)
        losses = []
        try:
            for k in range(accum):
                batch = train_blocks.get(mine[k * micro:(k + 1) * micro]).to(device)
                losses.append(engine.forward_backward(batch[:, :-1], batch[:, 1:], 1.0 / accum,
                                                      last=k == accum - 1))
            result = engine.step()
        except NonFiniteGradientError as exc:
            raise NonFiniteGradientError(f"step {step + 1}: {exc}") from None
        skipped_steps += result.skipped
        if cfg.reparam.method:
            if result.skipped:
                engine.after_skipped_step()
            else:
                engine.after_step()
        last_loss = float(engine.all_reduce_mean(torch.stack(losses).mean()))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time += time.perf_counter() - tic
        done = step + 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{last_loss:.3f}")
        if done % max(t.log_every, 1) == 0 or done == t.steps or done == 1:
            writer.log(done, loss=last_loss, lr=cfg.optim.lr * factor, grad_norm=result.grad_norm,
                       tokens_per_s=(done - start_step) * tokens_per_step / max(train_time, 1e-9))
        if engine.any_rank(stop.received is not None):
            interrupted = stop.received or "a signal on another rank"
            break
        if t.eval_every and done % t.eval_every == 0 and done != t.steps:
            last_eval = evaluate()
            writer.log(done, eval_loss=last_eval, eval_ppl=float(np.exp(min(last_eval, 50))))
        if t.checkpoint_every and done % t.checkpoint_every == 0 and done != t.steps:
            checkpoint.save(engine, ckpt_root, done, {"seed": cfg.seed, "skipped_steps": skipped_steps}, run)
            if rank == 0:
                checkpoint.prune(ckpt_root, t.keep_checkpoints)
    stop.restore()
    if progress is not None:
        progress.close()
    final_step = step + 1 if interrupted else t.steps
    if not interrupted:
        last_eval = evaluate()
        writer.log(final_step, eval_loss=last_eval, eval_ppl=float(np.exp(min(last_eval, 50))))
    checkpoint.save(engine, ckpt_root, final_step, {"seed": cfg.seed, "skipped_steps": skipped_steps}, run)
    if rank == 0:
        checkpoint.prune(ckpt_root, t.keep_checkpoints)

    state_bytes = engine.optimizer_state_bytes()
    grad_bytes = engine.grad_bytes()
    p_bytes = engine.param_bytes()
    steps_run = final_step - start_step
    tokens_per_s = steps_run * tokens_per_step / train_time if train_time > 0 else None
    peak = peak_flops(device)
    summary = {
        "steps": final_step,
        "steps_this_run": steps_run,
        "tokens": final_step * tokens_per_step,
        "first_eval_loss": (first_eval if first_eval is not None else
                            next((r["eval_loss"] for r in writer.records if "eval_loss" in r), None)),
        "final_train_loss": last_loss,
        "final_eval_loss": last_eval,
        "tokens_per_s": tokens_per_s,
        "mfu": (flops_per_token * tokens_per_s / (peak * world)) if peak and tokens_per_s else None,
        "num_parameters": n_params,
        "param_bytes": p_bytes,
        "param_bytes_all_ranks": int(engine.all_reduce_sum(p_bytes)),
        "optimizer_state_bytes": state_bytes,
        "optimizer_state_bytes_all_ranks": int(engine.all_reduce_sum(state_bytes)),
        "layerwise": t.layerwise,
        "grad_bytes_peak": grad_bytes[0] if grad_bytes else None,
        "grad_bytes_all": grad_bytes[1] if grad_bytes else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "peak_rss_bytes": peak_rss_bytes(),
        "world_size": world,
        "engine": engine_name,
        "optimizer": cfg.optim.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "corpus": corpus.description,
        "resumed_from": str(resume_path) if resume_path else None,
        "skipped_steps": skipped_steps,
        "interrupted": interrupted,
        "config": to_dict(cfg),
    }
    if rank == 0:
        writer.plot(out_dir / "loss.png")
        write_summary(out_dir / "summary.json", summary)
        print(render_summary(summary, out_dir))
        if interrupted:
            print(f"stopped by {interrupted} after step {final_step}; checkpoint written, continue with resume=auto")
    writer.close()
    engine.close()
    return summary


def render_summary(s: dict, out_dir: Path) -> str:
    tps = f"{s['tokens_per_s']:.0f}" if s["tokens_per_s"] else "n/a"
    first, final, train = (f"{s[k]:.4f}" if s[k] is not None else "n/a"
                           for k in ("first_eval_loss", "final_eval_loss", "final_train_loss"))
    lines = [
        f"optimlib pretrain: {s['engine']} x{s['world_size']}, optimizer {s['optimizer']}, {s['device']}",
        f"  steps            {s['steps']} ({s['tokens']:,} tokens)"
        + (f", {s['skipped_steps']} skipped (non-finite gradients)" if s["skipped_steps"] else ""),
        f"  train loss       {train}",
        f"  eval loss        {first} -> {final}",
        f"  tokens/s         {tps}" + (f"  (MFU {100 * s['mfu']:.1f}%)" if s.get("mfu") else ""),
        f"  parameters       {s['num_parameters']:,} ({format_bytes(s['param_bytes'])} on this rank)",
        f"  optimizer state  {format_bytes(s['optimizer_state_bytes'])} on this rank, "
        f"{format_bytes(s['optimizer_state_bytes_all_ranks'])} over all ranks",
        *([f"  gradients        {format_bytes(s['grad_bytes_peak'])} alive at the peak on this rank"
           + (" (layer-wise)" if s["layerwise"] else "") + f", of {format_bytes(s['grad_bytes_all'])} in all"]
          if s.get("grad_bytes_peak") is not None else []),
        f"  TensorBoard      tensorboard --logdir {out_dir / 'tensorboard'}",
        f"  summary          {out_dir / 'summary.json'}  (loss curve: {out_dir / 'loss.png'})",
    ]
    return "\n".join(lines)
