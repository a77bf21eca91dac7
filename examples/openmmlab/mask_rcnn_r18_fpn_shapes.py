# Tiny Mask R-CNN: the tiny Faster R-CNN with a mask head (14x14 masks) and mask annotations. mmdetection 3.3.0.
_base_ = ['faster_rcnn_r18_fpn_shapes.py']
model = dict(
    type='MaskRCNN',
    roi_head=dict(
        mask_roi_extractor=dict(type='SingleRoIExtractor', roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0),
                                out_channels=64, featmap_strides=[4, 8, 16, 32]),
        mask_head=dict(type='FCNMaskHead', num_convs=1, in_channels=64, conv_out_channels=64, num_classes=7,
                       loss_mask=dict(type='CrossEntropyLoss', use_mask=True, loss_weight=1.0))),
    train_cfg=dict(rcnn=dict(mask_size=14)),
    test_cfg=dict(rcnn=dict(mask_thr_binary=0.5)))
train_dataloader = dict(dataset=dict(pipeline=[
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='PackDetInputs'),
]))
