# Tiny DeepLabV3+ (ResNet-18-V1c, random init, BN) on the embedded shapes dataset (VOC layout), CPU-sized.
# mmsegmentation 1.2.2 config. `data_root` is the folder `lossforge data make-shapes` (or a search) writes;
# the decode head's loss is what `lossforge loss export --format mmseg --base THIS_FILE` replaces.
data_root = 'data/shapes'
crop_size = (64, 64)
classes = ('background', 'ellipse', 'square', 'triangle', 'ring', 'bar', 'cross', 'star')
norm_cfg = dict(type='BN', requires_grad=True)
default_scope = 'mmseg'
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                           bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size=crop_size),
    pretrained=None,
    backbone=dict(type='ResNetV1c', depth=18, num_stages=4, out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4),
                  strides=(1, 2, 1, 1), norm_cfg=norm_cfg, norm_eval=False, style='pytorch', contract_dilation=True),
    decode_head=dict(type='DepthwiseSeparableASPPHead', in_channels=512, in_index=3, channels=64,
                     dilations=(1, 12, 24, 36), c1_in_channels=64, c1_channels=16, dropout_ratio=0.1,
                     num_classes=len(classes), norm_cfg=norm_cfg, align_corners=False,
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
metainfo = dict(classes=classes)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='Resize', scale=crop_size, keep_ratio=False),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=False),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
dataset_common = dict(type='BaseSegDataset', data_root=data_root, metainfo=metainfo, img_suffix='.jpg',
                      seg_map_suffix='.png', reduce_zero_label=False,
                      data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'))
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        sampler=dict(type='InfiniteSampler', shuffle=True),
                        dataset=dict(**dataset_common, ann_file='ImageSets/Segmentation/train.txt',
                                     pipeline=train_pipeline))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                      sampler=dict(type='DefaultSampler', shuffle=False),
                      dataset=dict(**dataset_common, ann_file='ImageSets/Segmentation/val.txt',
                                   pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0005))
param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=40, by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=40, val_interval=40)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(timer=dict(type='IterTimerHook'), logger=dict(type='LoggerHook', interval=1, log_metric_by_epoch=False),
                     param_scheduler=dict(type='ParamSchedulerHook'),
                     checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=1000),
                     sampler_seed=dict(type='DistSamplerSeedHook'))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='gloo'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'WARNING'
load_from = None
resume = False
randomness = dict(seed=0)
