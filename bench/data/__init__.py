"""Data sets as tasks held on the device: ``tasks`` (the registry, Fashion-MNIST, CIFAR,
digits, synthetic), ``imagenet`` (ImageNet, downsampled ImageNet-32), ``text`` (Penn Treebank)."""
