"""The engines of ``launch/pretrain.py`` by their config name (``engine=``)."""

from __future__ import annotations

from optimlib.train.engine import FSDP2Engine, SingleEngine
from optimlib.train.engine_ddp import DDPEngine
from optimlib.train.engine_deepspeed import DeepSpeedEngine

ENGINES = {"single": SingleEngine, "ddp": DDPEngine, "fsdp2": FSDP2Engine, "deepspeed": DeepSpeedEngine}
