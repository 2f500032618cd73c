#!/usr/bin/env python
"""Train and evaluate ISDA with Detectron2.

    python train_net.py --config-file configs/COCO-InstanceSegmentation/isda_R_50_12ep.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS /path/to/model_final.pth
    python train_net.py --config-file ... --resume            # continue from OUTPUT_DIR/last_checkpoint

Without a GPU, set MODEL.DEVICE cpu; ``--num-gpus N`` then starts N CPU processes (gloo).
Bad samples, kills and non-finite losses are handled as README "Failure behaviour" describes.
"""

import os
import sys
import weakref

import torch
from detectron2.config import get_cfg
from detectron2.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.engine.hooks import EvalHook, PeriodicCheckpointer, PeriodicWriter
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from isda import add_isda_config
from isda.data import ISDADatasetMapper
from isda.data.sample_checks import check_dataset_categories
from isda.engine import (
    DataIssueCounter,
    DataIssueLogger,
    FiniteLossCheck,
    SafeDetectionCheckpointer,
    SkippedImageFilter,
    cpu_ddp_without_device_ids,
    load_inference_weights,
)
from isda.evaluation import ISDACOCOEvaluator
from isda.solver import build_isda_optimizer
from isda.weights import UNSAFE_PICKLE_ENV, WeightsError


class Trainer(DefaultTrainer):
    """DefaultTrainer with ISDA's data mapper, optimizer and evaluator, DDP that works on CPU,
    atomic checkpoints, a stop on non-finite losses and counts of skipped samples."""

    def __init__(self, cfg):
        with cpu_ddp_without_device_ids(cfg.MODEL.DEVICE):
            super().__init__(cfg)

    def build_hooks(self):
        # DefaultTrainer.__init__ calls this right after making its DetectionCheckpointer; the
        # hooks and resume_or_load use this atomic, weights_only one instead.
        self.checkpointer = SafeDetectionCheckpointer(
            self.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        hooks = [FiniteLossCheck()] + super().build_hooks()
        # Before the hooks that save or write metrics, so they see this iteration's counts.
        readers = (PeriodicCheckpointer, EvalHook, PeriodicWriter)
        first_reader = next((i for i, h in enumerate(hooks) if isinstance(h, readers)), len(hooks))
        hooks.insert(first_reader, DataIssueLogger(self.data_loader))
        return hooks

    @classmethod
    def build_train_loader(cls, cfg):
        names = cfg.DATASETS.TRAIN
        dicts = get_detection_dataset_dicts(
            names, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
        check_dataset_categories(dicts, names, cfg.MODEL.ISDA.NUM_CLASSES)
        mapper = ISDADatasetMapper(cfg, is_train=True)
        return DataIssueCounter(build_detection_train_loader(cfg, mapper=mapper, dataset=dicts))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)
        check_dataset_categories(dicts, [dataset_name], cfg.MODEL.ISDA.NUM_CLASSES)
        loader = build_detection_test_loader(
            dicts,
            mapper=ISDADatasetMapper(cfg, is_train=False),
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )
        return SkippedImageFilter(loader, dataset_name)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_isda_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        # Boxes are derived from the masks, so bbox AP is reported beside segm AP.
        return ISDACOCOEvaluator(dataset_name, tasks=("bbox", "segm"), output_dir=output_folder)


def setup(args):
    """Config from file and command line, frozen, with logging and the output dir. Building the
    model validates it (``ISDA.from_config``)."""
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
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
        # --resume evaluates OUTPUT_DIR's last checkpoint when there is one, as training resumes.
        last = SafeDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        path = last.get_checkpoint_file() if args.resume and last.has_checkpoint() else None
        load_inference_weights(model, cfg, path)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--unsafe-pickle",
        action="store_true",
        help="also load .pth files that need pickle (which can run code): trusted files only",
    )
    return parser


def invoke_main() -> None:
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    if args.unsafe_pickle:
        os.environ[UNSAFE_PICKLE_ENV] = "1"  # read by every process's checkpointer
    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except WeightsError as e:  # a bad MODEL.WEIGHTS is the user's to fix: one line, no traceback
        print(f"train_net.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    invoke_main()  # pragma: no cover
