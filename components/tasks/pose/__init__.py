"""Pose estimation (AutoLoss-Zero A.4): top-down keypoint heatmaps from COCO keypoint annotations, a
SimpleBaseline model (ResNet + deconvolutions), the searched heatmap loss, OKS keypoint AP (pycocotools), the
screening probe on heatmaps and the proxy trainer."""
