"""Downstream evaluation of exported backbones. The entry points (`ssl.linear_eval`, `ssl.finetune`,
`ssl.segment`) are thin Hydra wrappers; everything here takes tensors and modules, usable without Hydra.

| module | what it is |
| --- | --- |
| `preprocess.py` | uint8 images -> the export's normalisation and resolution; random crop + flip; channel check |
| `features.py` | pooled features of a frozen backbone: once per dataset, or per batch of augmented views |
| `linear.py` | L-BFGS logistic regression, weight decay chosen on held-out data; SGD heads (augmented protocol) |
| `knn.py` | weighted kNN votes on L2-normalised features (DINO) |
| `knn_monitor.py` | the online kNN monitor of pretraining: the teacher's knn20 on fixed slices, per epoch |
| `metrics.py` | top-k accuracy; `ConfusionMatrix` -> mIoU, pixel accuracy, per-class IoU |
| `training.py` | the fine-tuning and segmentation loop: AdamW, a separate backbone lr, warm-up + cosine |
| `finetuning.py` | backbone + linear head trained end to end |
| `segmentation.py` | linear / FCN heads on `forward_dense`, `Segmenter`, its training and evaluation |
| `seg_data.py` | `SegmentationSet`; Pascal VOC 2012 and image/mask folders |
| `mosaic.py` | the offline Fashion-MNIST 2x2 mosaic segmentation set |
| `cli.py` | what the entry points share: ckpt and device, default data from the export, run dir, reports |
"""
