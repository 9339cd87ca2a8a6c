"""The torch side: the networks (DSFR U-Net, 3D ResNet18, ConvNeXt V2) and their pretrained
weights."""
