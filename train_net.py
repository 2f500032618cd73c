#!/usr/bin/env python
"""Train and evaluate ISDA with Detectron2.

    python train_net.py --config-file configs/COCO-InstanceSegmentation/isda_R_50_12ep.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS /path/to/model_final.pth
    python train_net.py --config-file ... --resume            # continue from OUTPUT_DIR/last_checkpoint

Without a GPU, set MODEL.DEVICE cpu; ``--num-gpus N`` then starts N CPU processes (gloo).
"""

import logging
import os
import weakref

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    default_argument_parser,
    default_setup,
    launch,
)
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from isda import add_isda_config
from isda.config import validate_isda_config
from isda.data import ISDADatasetMapper
from isda.solver import build_isda_optimizer


class Trainer(DefaultTrainer):
    """DefaultTrainer with ISDA's data mapper, optimizer and evaluator, and DDP that works on CPU."""

    def __init__(self, cfg):
        # Same steps as DefaultTrainer.__init__, except the DDP wrapper: Detectron2 always passes
        # device_ids=[local_rank], which DistributedDataParallel rejects for a CPU model (gloo).
        super(DefaultTrainer, self).__init__()
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_cpu = next(model.parameters()).device.type == "cpu"
        ddp_kwargs = {"device_ids": None} if on_cpu else {}
        model = create_ddp_model(model, broadcast_buffers=False, **ddp_kwargs)
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=ISDADatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=ISDADatasetMapper(cfg, is_train=False)
        )

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_isda_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        # Boxes are derived from the masks, so bbox AP is reported beside segm AP.
        return COCOEvaluator(dataset_name, tasks=("bbox", "segm"), output_dir=output_folder)


def setup(args):
    """Config from file and command line, validated, frozen, with logging and the output dir."""
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    validate_isda_config(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="isda")
    return cfg


def configure_cpu_threads(cfg) -> None:
    """On CPU, the processes of one machine share its cores: each gets cores // processes threads.

    Oversubscribed OpenMP threads spin against each other and can slow training tenfold.
    An explicit OMP_NUM_THREADS always wins.
    """
    if cfg.MODEL.DEVICE == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))


def main(args):
    cfg = setup(args)
    configure_cpu_threads(cfg)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()  # pragma: no cover
