#!/usr/bin/env python
"""Convert a COCO-trained Deformable DETR R50 checkpoint into ISDA's initialisation (what the
authors' configs/isda/isda_r50_3x_coco.py loads with load_from).

Reads either public release and writes a .pth for MODEL.WEIGHTS:
  mmdet  MMDetection 2.x deformable_detr_r50_16x2_50e_coco_20210419_220030-a12b9512.pth
         (what the ISDA authors loaded; 80 classes in Detectron2's order already);
  ddetr  fundamentalvision/Deformable-DETR r50_deformable_detr-checkpoint.pth
         (91 logits indexed by COCO category id; row k of ISDA's class FC = logit of the k-th
         sorted COCO thing id, so the 11 unused ids are dropped).
Loaded: backbone, neck P3-P6, the whole deformable transformer, query embeddings, class FC.
Left at ISDA's init: neck P2, mask feature head, kernel FFN. Dropped: box FFNs (and, for ddetr,
the neck conv biases, which ISDA's GN-normalised convs do not have).

Example:
  python tools/convert_deformable_detr.py \\
      deformable_detr_r50_16x2_50e_coco_20210419_220030-a12b9512.pth \\
      checkpoints/isda_r50_from_mmdet_ddetr.pth

The report lists every loaded, initialised and dropped key. Missing or unmapped keys and shape
mismatches are errors (exit 1, nothing written) unless --allow-partial. Options go before the two
paths; KEY VALUE pairs after them override the target config (--config-file, default
configs/Base-ISDA.yaml), e.g. MODEL.ISDA.SHARE_HEADS_ACROSS_LAYERS False.
"""

import sys

from checkpoint_cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], ("mmdet", "ddetr"), __doc__))
