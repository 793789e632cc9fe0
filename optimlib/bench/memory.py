"""The memory benchmark: measured bytes of every optimizer on a real model, against torch AdamW.

For each contender (:mod:`optimlib.bench.contenders`) a fresh worker process builds the model,
gives it gradients -- random (``grads="random"``: one seeded ``randn`` gradient per parameter,
reused every step) or real (``grads="real"``: forward and backward of a random token batch
before every step) -- runs ``steps`` optimizer steps and reports:

* parameter and gradient bytes (:mod:`optimlib.bench.accounting`);
* optimizer-state bytes from the state tensors, including tensors held inside Python objects in
  the state (galore-torch's projector), as tensor sizes and as the storages they keep alive;
* peak memory during the steps, above what the model and its gradients already held: on CUDA
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on a CPU the increase of
  the process's peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs`` once
  the model and gradients exist) -- an RSS figure, which includes the allocator's behaviour and
  is labelled as such.  With ``grads="real"`` the window also holds the forward/backward passes
  of steps 2.., so the peak includes their activations.

A fresh process per contender (forked before any model exists on a CPU, spawned on CUDA) keeps
one optimizer's freed memory from hiding another's peak.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

from optimlib.bench.accounting import grad_bytes, param_bytes, state_bytes
from optimlib.bench.contenders import BASELINE, contenders, get_contender
from optimlib.bench.report import environment, markdown_table, mib

__all__ = ["measure_one", "run_memory_benchmark", "memory_markdown", "resolve_device", "GRADS"]

GRADS = ("random", "real")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"invalid device={device!r}: CUDA is not available here")
    return dev


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _build(model_name: str, device: torch.device, dtype: torch.dtype, seed: int):
    from optimlib.models import build_model

    torch.manual_seed(seed)
    model = build_model(model_name, device=device).to(dtype)
    return model


def _random_grads(model, seed: int) -> None:
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(device=p.device, dtype=p.dtype)


def _real_grads(model, micro_batch: int, seq_len: int, seed: int) -> None:
    gen = torch.Generator(device="cpu").manual_seed(seed + 2)
    idx = torch.randint(0, model.config.vocab_size, (micro_batch, seq_len + 1), generator=gen).to(
        next(model.parameters()).device)
    logits = model(idx[:, :-1])
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1))
    model.zero_grad(set_to_none=True)
    loss.backward()


def _start_method(device: torch.device) -> str:
    """``fork`` on a Linux CPU run (the worker inherits the imports, not any model: this process
    has built none), ``spawn`` otherwise (CUDA cannot be forked)."""
    if device.type == "cpu" and "fork" in multiprocessing.get_all_start_methods():
        return "fork"
    return "spawn"


def _preload(chosen) -> None:
    """Import what every forked worker would otherwise import again (imports only, no compute:
    torch's lazily imported optimizer machinery and the peers' packages)."""
    import importlib
    import warnings

    import torch._dynamo  # noqa: F401  (torch.optim imports it at the first step)

    for c in chosen:
        if c.module:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importlib.import_module(c.module)


def measure_one(model_name: str, name: str, *, steps: int = 2, grads: str = "random", device: str = "cpu",
                dtype: str = "float32", micro_batch: int = 1, seq_len: int = 256, seed: int = 0,
                threads: int | None = None) -> dict:
    """Measure one contender in this process (see the module docstring); returns its row."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    contender = get_contender(model_name, name, dev)
    model = _build(model_name, dev, DTYPES[dtype], seed)
    if grads == "random":
        _random_grads(model, seed)
    else:
        _real_grads(model, micro_batch, seq_len, seed)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        peak_kind = "CUDA max_memory_allocated increase"
    else:
        reset = _reset_peak_rss()
        base = _proc_status("VmRSS")
        peak_kind = "CPU peak RSS increase" + ("" if reset else " (peak not resettable: since process start)")
    start = time.perf_counter()
    opt = contender.build(model)
    for i in range(steps):
        if grads == "real" and i:
            _real_grads(model, micro_batch, seq_len, seed + i)
        opt.step()
    if cuda:
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        peak_total = torch.cuda.max_memory_allocated(dev)
    else:
        hwm = _proc_status("VmHWM")
        peak = None if hwm is None or base is None else hwm - base
        peak_total = hwm
    seconds = time.perf_counter() - start
    sb = state_bytes(opt)
    return {"name": contender.name, "kind": contender.kind, "note": contender.note,
            "param_bytes": param_bytes(model), "grad_bytes": grad_bytes(model),
            "state_bytes": sb.storage_bytes, "state_tensor_bytes": sb.tensor_bytes, "state": sb.as_dict(),
            "peak_bytes": peak, "peak_total_bytes": peak_total, "peak_kind": peak_kind,
            "seconds": seconds}


def run_memory_benchmark(model_name: str = "llama_60m", names: list[str] | None = None, *, steps: int = 2,
                         grads: str = "random", device: str = "auto", dtype: str = "float32",
                         micro_batch: int = 1, seq_len: int = 256, peers: bool = True, isolate: bool = True,
                         seed: int = 0, threads: int | None = None, progress=None) -> dict:
    """Measure every contender (``names``: a subset) on ``model_name``; ratios are to torch AdamW.

    ``isolate=False`` measures in this process (faster, but peaks then see earlier contenders'
    freed memory; use it for tests only).
    """
    if grads not in GRADS:
        raise ValueError(f"invalid grads={grads!r}: accepted values are {', '.join(GRADS)}")
    if dtype not in DTYPES:
        raise ValueError(f"invalid dtype={dtype!r}: accepted values are {', '.join(DTYPES)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"invalid steps={steps!r}: accepted range is an integer >= 1")
    dev = resolve_device(device)
    chosen = contenders(model_name, dev, names=names, peers=peers)
    threads = threads or 1      # bytes do not depend on it; one thread avoids oversubscribing shared cores
    kwargs = dict(steps=steps, grads=grads, device=str(dev), dtype=dtype, micro_batch=micro_batch,
                  seq_len=seq_len, seed=seed, threads=threads)
    if isolate and _start_method(dev) == "fork":
        _preload(chosen)
    rows = []
    for c in chosen:
        if progress:
            progress(f"measuring {c.name} ...")
        if isolate:
            ctx = multiprocessing.get_context(_start_method(dev))
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                row = pool.submit(measure_one, model_name, c.name, **kwargs).result()
        else:
            row = measure_one(model_name, c.name, **kwargs)
        rows.append(row)
    base = next(r for r in rows if r["name"] == BASELINE)
    for r in rows:
        r["state_ratio"] = r["state_bytes"] / base["state_bytes"] if base["state_bytes"] else None
        r["peak_ratio"] = (r["peak_bytes"] / base["peak_bytes"]
                           if r["peak_bytes"] is not None and base["peak_bytes"] else None)
    return {"benchmark": "memory", "model": model_name, "steps": steps, "grads": grads, "dtype": dtype,
            "micro_batch": micro_batch if grads == "real" else None, "seq_len": seq_len if grads == "real" else None,
            "baseline": BASELINE, "isolated_processes": isolate, "worker_threads": threads,
            "environment": environment(dev), "rows": rows}


def _ratio(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def memory_markdown(result: dict) -> str:
    """The memory table (MiB; ratios to torch AdamW measured in the same run)."""
    peak_kind = result["rows"][0]["peak_kind"] if result["rows"] else ""
    columns = [("name", "optimizer", None), ("kind", "kind", None), ("param_bytes", "params MiB", mib),
               ("grad_bytes", "grads MiB", mib), ("state_bytes", "state MiB", mib),
               ("state_ratio", "state / AdamW", _ratio), ("peak_bytes", "peak MiB", mib),
               ("peak_ratio", "peak / AdamW", _ratio), ("note", "settings", None)]
    env = result["environment"]
    head = (f"Memory on {result['model']} ({result['dtype']}, {result['steps']} steps, {result['grads']} gradients), "
            f"{env['device_name']}, torch {env['torch']}.  state = storages of the optimizer's state tensors "
            f"(incl. tensors inside state objects); peak = {peak_kind}.")
    notes = [f"- {r['name']}: {r['state']['note']}" for r in result["rows"] if r["state"]["note"]]
    notes += [f"- {r['name']}: state tensors {r['state_tensor_bytes']:,} B but their storages hold "
              f"{r['state_bytes']:,} B (a state tensor is a view of a larger buffer)"
              for r in result["rows"] if r["state_bytes"] != r["state_tensor_bytes"] and not r["state"]["note"]]
    return "\n".join([head, "", markdown_table(result["rows"], columns)] + ([""] + notes if notes else []))
