"""The VLM side of COVR: backbones (``backbones.py``, ``tiny.py``, ``processor.py``), the LoRA
module trained on the agent's experience (``module.py``), prompts and SFT batches
(``prompting.py``), action codecs (``codecs.py``) and guidance (``guide.py``)."""
