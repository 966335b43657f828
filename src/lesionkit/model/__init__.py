"""Model: the timm network and its pretrained weights, the Lightning module that trains it, stored backbone
features, and reading checkpoints safely."""
