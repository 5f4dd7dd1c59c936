"""The worker side of a launch: what every worker script under tests/ does around its own scenarios.

A worker is started by ``run_deepspeed`` (tests/distributed/launch.py) under the ``deepspeed``
launcher, or by ``torchrun``, with the repository root on ``PYTHONPATH`` (``launch_env``), so it
imports ``tests.distributed.runner`` and the package by name. Its ``main`` is then::

    w = runner.start()                                     # arguments, process group, world, rank
    for sc, result in w.each(lambda sc: scenario(sc, w.world, w.rank)):
        ...                                                # write the result, w.barrier()

``each`` runs one scenario after the other; a scenario that raises is reported (its traceback on
stderr and a result with ``error`` and ``trace``) and the next one runs: one broken path must not
hide the others.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback


class Worker:
    """One process of a launch: its arguments (``args``), the world size and its rank."""

    def __init__(self, args, items_flag):
        self.args = args
        self._items_flag = items_flag

    @property
    def rank(self) -> int:
        import torch.distributed as dist
        return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))

    @property
    def world(self) -> int:
        import torch.distributed as dist
        return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))

    def items(self) -> list:
        """The JSON list of scenarios (or jobs) named by the items flag."""
        with open(getattr(self.args, self._items_flag.lstrip("-").replace("-", "_"))) as f:
            return json.load(f)

    def each(self, run, items=None, on_error=None):
        """Yield ``(item, result)`` for every item (default: ``items()``), ``result = run(item)``, a dict,
        with ``seconds`` and ``cpu`` (process time) added; an exception becomes ``on_error(e, item, rank)``
        (default ``failure``)."""
        for item in (self.items() if items is None else items):
            t0, c0 = time.time(), time.process_time()
            try:
                result = run(item)
            except Exception as e:  # report, keep going
                result = (on_error or failure)(e, item, self.rank)
                print(f"rank {self.rank}: {_name(item)} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            result.update(seconds=time.time() - t0, cpu=time.process_time() - c0)
            yield item, result

    def scenario_dir(self, item) -> str:
        """``<--out>/<item name>``, created."""
        d = os.path.join(self.args.out, _name(item))
        os.makedirs(d, exist_ok=True)
        return d

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (on every rank)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def write_lines(self, rows, path=None, mode="w") -> None:
        """Rank 0: one JSON line per row to ``path`` (default ``--out``)."""
        if self.rank == 0:
            with open(path or self.args.out, mode) as f:
                for r in rows:
                    f.write(json.dumps(r, default=str) + "\n")

    def write_json(self, path, obj, every_rank=False) -> None:
        """``obj`` as JSON to ``path``, by rank 0 (or by every rank, each to its own path)."""
        if every_rank or self.rank == 0:
            with open(path, "w") as f:
                json.dump(obj, f, default=str)

    def barrier(self) -> None:
        import torch.distributed as dist
        dist.barrier()


def failure(e, item, rank) -> dict:
    """The result of a scenario that raised."""
    return {"name": _name(item), "rank": rank, "error": f"rank {rank}: {type(e).__name__}: {e}",
            "trace": traceback.format_exc()[-3000:]}


def _name(item) -> str:
    return str(item.get("name", item)) if isinstance(item, dict) else str(item)


def parse_args(*flags, items="--scenarios"):
    """``--out``, the JSON file of scenarios (``items``; ``None``: none), ``--fake-fp16``, DeepSpeed's
    ``--local_rank`` and the worker's own ``flags``: ``(name, add_argument keywords)`` pairs."""
    ap = argparse.ArgumentParser()
    if items:
        ap.add_argument(items, required=True, help="JSON file with a list of scenarios")
    ap.add_argument("--out", required=True)
    ap.add_argument("--fake-fp16", action="store_true", help="DeepSpeed's CPU accelerator reports fp16 support")
    ap.add_argument("--local_rank", type=int, default=0)
    for name, kw in flags:
        ap.add_argument(name, **kw)
    return ap.parse_args()


def init_distributed(fake_fp16=False) -> None:
    """DeepSpeed's process group: gloo, or ``MS_DIST_BACKEND`` (tools/gpu_check.sh: nccl, one device
    per local rank). ``fake_fp16``: the CPU accelerator reports fp16 (tests/distributed/fp16_on_cpu.py)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from tests.distributed.fp16_on_cpu import report_fp16_support
    if fake_fp16:
        report_fp16_support()
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=os.environ.get("MS_DIST_BACKEND", "gloo"))


def start(*flags, items="--scenarios", fake_fp16=False, init=True, quiet=False) -> Worker:
    """Parse the arguments and (``init``) join the process group. ``quiet``: DeepSpeed's and the
    package's loggers at WARNING."""
    args = parse_args(*flags, items=items)
    if init:
        init_distributed(fake_fp16 or args.fake_fp16)
    if quiet:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        logging.getLogger("megatron_shaping").setLevel(logging.WARNING)
    return Worker(args, items or "")
