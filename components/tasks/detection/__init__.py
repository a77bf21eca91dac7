"""Object detection (AutoLoss-Zero A.2): COCO-format data, Faster R-CNN whose four loss branches
(cls/reg × RPN/RCNN) come from a pluggable loss, box mAP, the screening probe and the proxy trainer."""
