"""fastai callbacks that train CNNs in less GPU time and memory: BoostResNet block-wise training, FreezeOut and snapshot ensembles"""

__version__ = "0.0.1"
