"""ADM UNet with an encoder/decoder split, the classifier head and the joint model."""
from jdm_fast.models.config import HeadConfig, UNetConfig
from jdm_fast.models.head import ClassifierHead
from jdm_fast.models.joint import JointConfig, JointDiffusion, JointLoss
from jdm_fast.models.unet import Encoded, UNet

__all__ = ["ClassifierHead", "Encoded", "HeadConfig", "JointConfig", "JointDiffusion", "JointLoss", "UNet",
           "UNetConfig"]
