"""One NCCL worker (world size 1) for the CUDA tests: mmdet's build_ddp, mmcv's DDP scatter, a
distiller training step and mmdet's multi_gpu_test with GPU collection, as distributed training and
evaluation run them. Prints one JSON line: the step's losses, the gathered results, the bbox mAP."""
import json
import sys

import torch
import torch.distributed as dist

if __name__ == "__main__":
    synth_root, teacher_checkpoint = sys.argv[1:3]
    from akd_cli.mm import compat

    compat.apply()
    import akd_cli.mm.distiller  # noqa: F401  (registers AKDDistiller)
    from akd_cli.mm.config import build_config
    from akd_cli.presets import load_preset
    from mmcv.runner import build_optimizer
    from mmdet.apis import multi_gpu_test
    from mmdet.datasets import build_dataloader, build_dataset
    from mmdet.models import build_detector
    from mmdet.utils import build_ddp

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    from akd_cli.options import TrainOptions

    cfg = build_config(load_preset("tiny-fcos-r34-r18"), TrainOptions(
        preset="tiny-fcos-r34-r18", data_root=synth_root, teacher_checkpoint=teacher_checkpoint, num_avatars=2))
    model = build_detector(cfg.model)
    model.init_weights()
    ddp = build_ddp(model, "cuda", device_ids=[0], broadcast_buffers=False)
    optimizer = build_optimizer(ddp.module, cfg.optimizer)
    train_set = build_dataset(cfg.data.train)
    batch = next(iter(build_dataloader(train_set, 4, 0, dist=True, shuffle=False, seed=0)))
    outputs = ddp.train_step(batch, optimizer)
    optimizer.zero_grad()
    outputs["loss"].backward()
    optimizer.step()

    val_cfg = cfg.data.val
    val_cfg.test_mode = True
    val_set = build_dataset(val_cfg)
    ddp.eval()
    results = multi_gpu_test(ddp, build_dataloader(val_set, 1, 0, dist=True, shuffle=False), gpu_collect=True)
    metrics = val_set.evaluate(results, metric="bbox")
    dist.destroy_process_group()
    print(json.dumps({"log_vars": outputs["log_vars"], "results": len(results), "images": len(val_set),
                      "classes_per_result": [len(per_class) for per_class in results],
                      "detections": sum(len(boxes) for per_class in results for boxes in per_class),
                      "bbox_mAP": metrics.get("bbox_mAP"), "param_device": str(next(ddp.module.parameters()).device)}))
