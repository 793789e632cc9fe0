"""The config reference of ``launch/pretrain.py``, generated from the config dataclasses.

    python -m optimlib.train.config_reference        # prints the Markdown table of docs/training.md

Every key of :class:`optimlib.train.config.RunConfig` (nested sections as dotted keys) with its
type, its default and its meaning.  The meaning is the field's attribute docstring (the string
literal under the field in the dataclass); :data:`NOTES` covers the fields that have none.
``tests/test_docs.py`` checks that docs/training.md holds exactly this output.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import typing

from optimlib.train.config import RunConfig

NOTES = {
    "seed": "Model initialisation and the order of the batches.",
    "out_dir": "TensorBoard events, `metrics.jsonl`, `summary.json`, `loss.png` and `checkpoints/`.",
    "device": "`auto`: `cuda:LOCAL_RANK` when CUDA is available, else `cpu`.",
    "train.steps": "Optimizer steps.",
    "train.warmup_steps": "Linear warmup, then cosine decay to `lr * min_lr_ratio`.",
    "train.eval_every": "Evaluation period in steps (0: only at the end).",
    "train.eval_blocks": "Held-out blocks per evaluation.",
    "train.keep_checkpoints": "How many checkpoints to keep (the highest steps).",
    "train.log_every": "Metrics period in steps.",
    "train.progress": "Show a progress bar.",
    "optim.name": "Any of `optimlib.list_optimizers()`.",
    "optim.lr": "Peak learning rate.",
    "optim.weight_decay": "Decoupled weight decay (norms, biases and embeddings get 0).",
    "optim.eps": "Adam-family `eps`; unset: the optimizer's default.",
    "deepspeed.zero_stage": "ZeRO stage under the `deepspeed` launcher (0-3).",
    "reparam.method": "A weight reparameterization (`optimlib.reparam.list_reparams()`), applied before the "
                      "engine shards the model; with `parallel.tp`, `nm` and `compander` act on the "
                      "tensor-parallel blocks and the layers of the others are distributed by the plan.",
    "reparam.targets": "Names or regexes of the linears to reparameterize; unset: the attention and MLP linears.",
    "reparam.options": "The reparameterization's options (`rank`, `density`, ...).",
}
"""Meanings of the fields that have no attribute docstring (a docstring, once written, wins)."""


def field_docs(cls) -> dict[str, str]:
    """``{field name: attribute docstring}`` of the dataclass ``cls``, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = after.value.value
    return docs


def _markdown(doc: str) -> str:
    """A docstring as one Markdown line: reST roles and double backquotes become code spans."""
    text = " ".join(doc.split())
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`").replace("|", "\\|")


def _type_name(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        return f"{_type_name(args[0])} or null"
    origin = typing.get_origin(tp) or tp
    return getattr(origin, "__name__", str(origin))


def _default(f: dataclasses.Field) -> str:
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def rows(cls=RunConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(dotted key, type, default, meaning)`` for every leaf key under ``cls``."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += rows(tp, key + ".")
            continue
        meaning = _markdown(docs[f.name]) if f.name in docs else NOTES.get(key, "")
        out.append((key, _type_name(tp), _default(f), meaning))
    return out


def reference() -> str:
    """The Markdown table docs/training.md holds under "Config reference"."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{key}` | {tp} | `{default}` | {meaning} |" for key, tp, default, meaning in rows()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
