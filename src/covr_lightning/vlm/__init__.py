"""The VLM side of COVR: action codecs today; backbones, the LoRA module and guidance next."""
