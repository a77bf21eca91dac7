"""Instance segmentation (AutoLoss-Zero A.3): COCO instances with masks, Mask R-CNN whose five loss branches
(cls/reg × RPN/RCNN + mask) come from a pluggable loss, mask (segm) mAP, the screening probe and the proxy
trainer. Built on the detection package (``components.tasks.detection``): subclasses and imports, no copies."""
