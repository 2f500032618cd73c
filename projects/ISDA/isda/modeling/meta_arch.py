"""ISDA meta-architecture (paper Fig. 2): backbone -> neck -> {deformable transformer, MFR head} ->
mask head -> masks. Training returns the set losses; inference returns Detectron2 ``Instances``."""

from __future__ import annotations

import contextlib
from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList
from detectron2.utils.memory import retry_if_cuda_oom
from torch import nn

from ..layers.recording import size_tensor
from .criterion import SetCriterion, downsample_gt_masks
from .deformable_transformer import DeformableTransformer
from .mask_feature_head import MaskFeatureHead
from .mask_head import MaskHead
from .matcher import HungarianMatcher
from .neck import ChannelMapper
from .position_encoding import SinePositionalEncoding
from .postprocess import instances_from_query_outputs

TRANSFORMER_LEVELS = ("p3", "p4", "p5", "p6")
# Inference autocast dtypes (float16 only on CUDA: CPUs have no fast float16 kernels).
TEST_DTYPES = ("float32", "bfloat16", "float16")


@META_ARCH_REGISTRY.register()
class ISDA(nn.Module):
    """End-to-end, NMS-free instance segmentation with position-aware dynamic kernels.

    Built from a config through ``from_config`` (all keys under MODEL.ISDA), or directly from its
    parts: ``backbone`` gives C2..C5, ``neck`` P2..P6, ``transformer`` the decoder states of every
    layer for ``num_queries`` learned queries over the first ``transformer.n_levels`` of P3..P6,
    ``mask_feature_head`` the MFR F at ``mask_feature_head.stride``, ``mask_head`` class logits,
    kernels and masks (paper Fig. 4), and ``criterion`` the training losses. The model reads those
    facts from its parts and keeps no copy of them. The ``test_*`` arguments configure inference (see
    :func:`isda.modeling.postprocess.instances_from_query_outputs`).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: ChannelMapper,
        transformer: DeformableTransformer,
        mask_feature_head: MaskFeatureHead,
        mask_head: MaskHead,
        criterion: SetCriterion,
        num_queries: int,
        pos_offset: float,
        gt_downsample: str,
        pixel_mean,
        pixel_std,
        size_divisibility: int,
        test_max_per_image: int,
        test_mask_threshold: float,
        test_maskness: bool,
        test_score_threshold: float,
        channels_last: bool,
        test_dtype: str,
        weights_source: str = "",
        allow_incomplete_weights: bool = False,
    ):
        super().__init__()
        self.backbone, self.neck, self.transformer = backbone, neck, transformer
        self.mask_feature_head, self.mask_head = mask_feature_head, mask_head
        self.criterion = criterion
        dim = transformer.dim
        # Rows are [query_pos | target], both learned (released code: ISDAHead._init_layers,
        # split in DeformableDetrTransformer.forward).
        self.query_embedding = nn.Embedding(num_queries, 2 * dim)
        self.position_encoding = SinePositionalEncoding(dim // 2, offset=pos_offset)
        self.transformer_levels = TRANSFORMER_LEVELS[: transformer.n_levels]
        self.gt_downsample = gt_downsample
        self.size_divisibility = size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.test_max_per_image, self.test_mask_threshold = test_max_per_image, test_mask_threshold
        self.test_maskness, self.test_score_threshold = test_maskness, test_score_threshold
        self.test_dtype = getattr(torch, test_dtype)
        # Named by the refusal in load_state_dict: the file DefaultPredictor loads.
        self.weights_source = weights_source
        self.allow_incomplete_weights = allow_incomplete_weights
        # Channels-last lets oneDNN (CPU) and cuDNN pick faster convolution kernels; the
        # transformer reads the maps as (B, HW, C) tokens, which is then a free view.
        self.channels_last = channels_last
        if channels_last:
            for m in (self.backbone, self.neck, self.mask_feature_head):
                m.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, cfg):
        # The one place a config is validated: every way of building the model (train_net, its
        # --eval-only, DefaultPredictor, the demo) passes here. Imported here because config.py
        # reads the accepted values from the modules of this package.
        from ..config import validate_isda_config

        validate_isda_config(cfg)
        m = cfg.MODEL.ISDA
        backbone = build_backbone(cfg)
        neck = ChannelMapper(
            backbone.output_shape(), m.IN_FEATURES, m.HIDDEN_DIM, with_p6=m.NUM_FEATURE_LEVELS == 4
        )
        transformer = DeformableTransformer(
            dim=m.HIDDEN_DIM,
            nheads=m.NHEADS,
            enc_layers=m.ENC_LAYERS,
            dec_layers=m.DEC_LAYERS,
            ffn_dim=m.DIM_FEEDFORWARD,
            dropout=m.DROPOUT,
            n_levels=m.NUM_FEATURE_LEVELS,
            enc_points=m.ENC_N_POINTS,
            dec_points=m.DEC_N_POINTS,
            impl=m.MSDA_IMPL or None,
            checkpointing=m.ACTIVATION_CHECKPOINTING,
        )
        mfr_head = MaskFeatureHead(
            neck.output_shape(),
            m.MFR_IN_FEATURES,
            stride=m.MFR_STRIDE,
            inner_dim=m.MFR_INNER_DIM,
            out_dim=m.MFR_OUT_DIM,
            coord=m.MFR_COORD,
        )
        mask_head = MaskHead(
            m.HIDDEN_DIM,
            m.NUM_CLASSES,
            kernel_dim=mfr_head.out_channels,
            num_layers=m.DEC_LAYERS,
            kernel_ffn_layers=m.KERNEL_FFN_LAYERS,
            kernel_ref=m.KERNEL_REF,
            ref_encoding=m.KERNEL_REF_ENCODING,
            ref_detach=m.KERNEL_REF_DETACH,
            share_across_layers=m.SHARE_HEADS_ACROSS_LAYERS,
        )
        matcher = HungarianMatcher(m.COST_CLASS, m.COST_MASK, m.FOCAL_ALPHA, m.FOCAL_GAMMA)
        criterion = SetCriterion(
            matcher,
            m.NUM_CLASSES,
            class_weight=m.CLASS_WEIGHT,
            mask_weight=m.MASK_WEIGHT,
            mask_loss=m.MASK_LOSS,
            alpha=m.FOCAL_ALPHA,
            gamma=m.FOCAL_GAMMA,
            deep_supervision=m.DEEP_SUPERVISION,
            bce_weight=m.MASK_BCE_WEIGHT,
        )
        return {
            "backbone": backbone,
            "neck": neck,
            "transformer": transformer,
            "mask_feature_head": mfr_head,
            "mask_head": mask_head,
            "criterion": criterion,
            "num_queries": m.NUM_QUERIES,
            "pos_offset": m.POS_ENC_OFFSET,
            "gt_downsample": m.GT_DOWNSAMPLE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": max(32, backbone.size_divisibility),
            "test_max_per_image": m.TEST.MAX_PER_IMAGE,
            "test_mask_threshold": m.TEST.MASK_THRESHOLD,
            "test_maskness": m.TEST.MASKNESS,
            "test_score_threshold": m.TEST.SCORE_THRESHOLD,
            "channels_last": m.CHANNELS_LAST,
            "test_dtype": m.TEST.DTYPE,
            "weights_source": cfg.MODEL.WEIGHTS,
            "allow_incomplete_weights": m.ALLOW_INCOMPLETE_WEIGHTS,
        }

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        """``nn.Module.load_state_dict`` whose ``missing_keys`` lists every tensor of the model
        that ``state_dict`` does not provide, and that, in eval mode, refuses such weights unless
        ``MODEL.ISDA.ALLOW_INCOMPLETE_WEIGHTS`` (:func:`isda.weights.check_complete`).

        Detectron2's FrozenBatchNorm2d fills absent running statistics with defaults and does not
        report them, so the missing keys are counted here by name. Detectron2's
        ``DefaultPredictor`` calls ``model.eval()`` and then loads with ``strict=False`` (shape
        mismatches arrive here as missing keys): this is where inference through it learns that
        the weights were incomplete. Training (train mode) loads partial weights, e.g. a backbone
        initialisation, as usual.
        """
        result = super().load_state_dict(state_dict, strict=strict, **kwargs)
        own = list(self.state_dict())
        reported = set(result.missing_keys)
        result.missing_keys.extend(k for k in own if k not in state_dict and k not in reported)
        if not self.training and not self.allow_incomplete_weights:
            from ..weights import check_complete

            check_complete(self.weights_source or "the loaded weights", own, result.missing_keys)
        return result

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def mfr_stride(self) -> int:
        """Stride of the MFR F, as built by the mask feature head (GT and masks follow it)."""
        return self.mask_feature_head.stride

    # ------------------------------------------------------------------------------------------
    def forward(self, batched_inputs: List[Dict]):
        """Detectron2 format in; losses (training) or ``[{"instances": Instances}]`` (inference) out."""
        images = self.preprocess_image(batched_inputs)
        if self.training:
            logits, kernels, mfr = self.predict(images)
            targets = self.prepare_targets(batched_inputs, images.tensor.shape[-2:])
            return self.criterion(logits, kernels, mfr, targets)
        with self._inference_autocast():
            logits, kernels, mfr = self.predict(images)
        # Top-k, the masks and their threshold in fp32, whatever TEST.DTYPE computed the network in.
        return self.inference(
            logits[-1].float(), kernels[-1].float(), mfr.float(), images, batched_inputs
        )

    def _inference_autocast(self):
        """MODEL.ISDA.TEST.DTYPE: the network's forward in bf16/fp16 autocast, or nothing for fp32.
        Inside, the deformable attention keeps its sampling locations and weights in fp32."""
        if self.test_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.test_dtype)

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        return ImageList.from_tensors(images, self.size_divisibility)

    def predict(self, images: ImageList):
        """-> class logits (D, B, Q, K), kernels (D, B, Q, E), MFR F (B, E, H/s, W/s)."""
        x = images.tensor
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        pyramid = self.neck(self.backbone(x))
        mfr = self.mask_feature_head(pyramid)
        feats = [pyramid[name] for name in self.transformer_levels]
        masks = level_padding_masks(images, feats)
        pos = [self.position_encoding(m).to(f.dtype) for m, f in zip(masks, feats)]
        hs, reference_points = self.transformer(feats, masks, pos, self.query_embedding.weight)
        logits, kernels = self.mask_head(hs, reference_points)
        return logits, kernels, mfr

    def prepare_targets(
        self, batched_inputs: List[Dict], padded_hw
    ) -> List[Dict[str, torch.Tensor]]:
        """Once per batch (not per decoder layer): labels and GT masks at MFR resolution."""
        targets = []
        for x in batched_inputs:
            inst = x["instances"].to(self.device)
            if inst.has("gt_masks"):
                masks = inst.gt_masks.tensor if hasattr(inst.gt_masks, "tensor") else inst.gt_masks
            else:  # an image without annotations carries no mask field at all
                masks = torch.zeros((0, *inst.image_size), dtype=torch.bool, device=self.device)
            targets.append(
                {
                    "labels": inst.gt_classes,
                    "masks": downsample_gt_masks(
                        masks, padded_hw, self.mfr_stride, self.gt_downsample
                    ),
                }
            )
        return targets

    def inference(self, logits, kernels, mfr, images: ImageList, batched_inputs):
        """Last decoder layer only: logits (B, Q, K), kernels (B, Q, E), mfr (B, E, h, w)."""
        results = []
        for b, (x, image_size) in enumerate(zip(batched_inputs, images.image_sizes)):
            out_size = (x.get("height", image_size[0]), x.get("width", image_size[1]))
            instances = retry_if_cuda_oom(instances_from_query_outputs)(
                logits[b],
                kernels[b],
                mfr[b],
                image_size,
                out_size,
                self.mfr_stride,
                max_per_image=self.test_max_per_image,
                mask_threshold=self.test_mask_threshold,
                use_maskness=self.test_maskness,
                score_threshold=self.test_score_threshold,
            )
            results.append({"instances": instances})
        return results


def level_padding_masks(images: ImageList, feats: List[torch.Tensor]) -> List[torch.Tensor]:
    """Padding mask of the batch (True outside each image), resized (nearest) to every level:
    -> list of (B, H_l, W_l) bool.

    ``images.image_sizes`` is a list of (h, w) or a (B, 2) int64 tensor; a tensor (or sizes traced
    as tensors) keeps the masks symbolic in an exported graph.
    """
    device = images.tensor.device
    sizes = images.image_sizes
    if not isinstance(sizes, torch.Tensor):
        sizes = torch.stack([size_tensor(hw, device) for hw in sizes])
    H, W = images.tensor.shape[-2:]
    rows = torch.arange(H, device=device)[None, :, None]  # (1, H, 1)
    cols = torch.arange(W, device=device)[None, None, :]  # (1, 1, W)
    mask = (rows >= sizes[:, 0, None, None]) | (cols >= sizes[:, 1, None, None])  # (B, H, W)
    return [F.interpolate(mask[None].float(), size=f.shape[-2:])[0].to(torch.bool) for f in feats]
