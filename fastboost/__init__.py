"""fastai callbacks that train CNNs in less GPU time and memory: BoostResNet block-wise training, FreezeOut and snapshot ensembles

Modules:

- `fastboost.freezeout`: FreezeOut: freeze the blocks of a CNN body one after another during training, so the end of training runs a shorter backward pass."""

__version__ = "0.0.1"
