"""Several CPU training processes (gloo) under Detectron2's ``DefaultTrainer``.

``DefaultTrainer.__init__`` wraps the model with ``create_ddp_model``, which always passes
``device_ids=[local_rank]``; ``DistributedDataParallel`` rejects ``device_ids`` for a CPU model.
``create_ddp_model`` accepts ``device_ids`` as an argument but ``DefaultTrainer`` offers no way to
pass it, so while the trainer is built the function is given ``device_ids=None`` for CPU models.
``tests/test_train_net.py`` pins the behaviour relied on (a 2-process CPU run).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import detectron2.engine.defaults as d2_defaults
from detectron2.utils import comm

__all__ = ["cpu_ddp_without_device_ids"]


@contextlib.contextmanager
def cpu_ddp_without_device_ids(device: str) -> Iterator[None]:
    """Within the block, Detectron2's ``create_ddp_model`` passes ``device_ids=None`` when the
    model lives on the CPU (``device`` is ``cfg.MODEL.DEVICE``) and there are several processes."""
    if device != "cpu" or comm.get_world_size() == 1:
        yield
        return
    create = d2_defaults.create_ddp_model
    d2_defaults.create_ddp_model = functools.partial(create, device_ids=None)
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = create
