"""One rank of tests/test_fsdp_cpu.py's second launch: resume the killed run, then train the uninterrupted one.

``python tests/fsdp_worker.py OUT.json RESUME.yaml REFERENCE.yaml`` in each of two processes (RANK, WORLD_SIZE, ...
set as composer's launcher sets them). Both runs go through ``build_trainer`` and ``Trainer.fit`` as ``run.py``
does, one after the other in the same processes (one start-up instead of two). Each rank writes what the test
checks to ``OUT.json`` with ``{rank}`` filled in.
"""
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(config: str) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel

    from diffusion.config import load_config
    from diffusion.training.train import build_trainer, place_unsharded_parts
    trainer = build_trainer(load_config(config))
    model, start = trainer.state.model, int(trainer.state.timestamp.batch)
    fsdp_children = sorted(n for n, c in model.named_children() if isinstance(c, FullyShardedDataParallel))
    trainer.fit()
    with FullyShardedDataParallel.summon_full_params(model.backbone):
        full_numel = sum(p.numel() for p in model.backbone.parameters())
    report = {
        'start_batch': start,
        'end_batch': int(trainer.state.timestamp.batch),
        'fsdp_children': fsdp_children,
        'precision': str(trainer.state.precision.value),
        # The backbone's parameter elements this rank holds (its shards) and the whole backbone's.
        'local_backbone_numel': sum(p.numel() for p in model.backbone.parameters()),
        'full_backbone_numel': full_numel,
        'devices': sorted({str(t.device) for t in [*model.parameters(), *model.buffers()]}),
        'loss_finite': bool(torch.isfinite(trainer.state.loss).all()),
        'sample_grid_weights': [w for cb in trainer.state.callbacks if type(cb).__name__ == 'SampleImages'
                                for w in cb.weights_used],
    }
    # build_trainer placed everything FSDP does not hold on the training device (the CPU here); the same function
    # moves it to 'meta' now, to show what it moves and what it leaves to FSDP.
    place_unsharded_parts(model, torch.device('meta'))
    report['after_placing_on_meta'] = {name: sorted({str(t.device) for t in [*child.parameters(), *child.buffers()]})
                                       for name, child in model.named_children()}
    trainer.close()
    return report


def main(out: str, *configs: str) -> None:
    from composer.utils import dist
    results = [run(config) for config in configs]
    Path(out.format(rank=dist.get_global_rank())).write_text(json.dumps(results))


if __name__ == '__main__':
    main(*sys.argv[1:])
