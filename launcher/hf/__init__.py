"""Hugging Face interop for weights: reading a Llama directory's safetensors into a model of
any layout (weights.py) and writing a checkpoint as a Hugging Face directory (export.py).
Names come from the weight table (launcher/model/weights.py); config.json is read by
launcher/formats/hf_config.py.
"""
