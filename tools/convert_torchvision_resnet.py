#!/usr/bin/env python
"""Convert torchvision's ImageNet ResNet (e.g. resnet50-0676ba61.pth or resnet50-11ad3fa6.pth) into
ISDA's backbone weights, for MODEL.WEIGHTS.

Only backbone.* is written; everything else keeps ISDA's own initialisation when Detectron2 loads
the file. torchvision's ResNet is "pytorch style" (stride in the 3x3 conv), which is what
MODEL.RESNETS.STRIDE_IN_1X1 False in Base-ISDA.yaml builds.

Example:
  python tools/convert_torchvision_resnet.py resnet50-0676ba61.pth \\
      checkpoints/isda_r50_imagenet_tv.pth

The report and the exit status follow tools/convert_deformable_detr.py.
"""

import sys

from checkpoint_cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], ("torchvision",), __doc__))
