"""Networks and the checkpoint schema of Semantic Genesis (see ``ynet3d`` and ``checkpoint``)."""
from .checkpoint import (CheckpointError, clean_state_dict, infer_model_config, load_checkpoint,
                         load_pretrained, load_state_dict_checked, save_checkpoint, unwrap_model)
from .ynet3d import ClassificationNet3D, UNet3D, YNet3D
from .targets import (Encoder3D, TargetClassifier, build_classifier,
                      build_segmentation_model)

__all__ = ["UNet3D", "YNet3D", "ClassificationNet3D", "CheckpointError", "save_checkpoint",
           "load_checkpoint", "load_pretrained", "load_state_dict_checked", "clean_state_dict",
           "infer_model_config", "unwrap_model", "Encoder3D", "TargetClassifier", "build_classifier",
           "build_segmentation_model"]
