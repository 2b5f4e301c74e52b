"""train.py under accelerate's FSDP with CPU processes, for the tests.

accelerate (1.15) turns FSDP on only for GPU-like distributed types: with CPU processes
(MULTI_CPU) it ignores ACCELERATE_USE_FSDP and wraps the model in DDP. torch's FSDP2 itself runs
on CPU processes over gloo. This script changes that one decision of accelerate's, and nothing
else: when ACCELERATE_USE_FSDP=true and the processes are CPU ones, the state says FSDP with the
plugin accelerate builds from the FSDP_* variables, so that accelerator.prepare takes its real FSDP2
path. Then it runs train.py's main.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_on_cpu.py <train.py flags>
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from accelerate import state  # noqa: E402
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin  # noqa: E402

_init = state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()


state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    import train

    sys.argv[0] = os.path.join(ROOT, "train.py")
    train.main()
