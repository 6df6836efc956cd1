"""Stage 4 of Semantic Genesis: pretraining Y-Net 3D (``python pytorch/train.py``)."""
