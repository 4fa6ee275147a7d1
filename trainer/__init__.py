"""bcc-train: fit, evaluate and calibrate ConvNeXt models and write model bundles."""
