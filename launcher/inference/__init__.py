"""Generation for a quick look at what a run learned (`python -m launcher.generate`): loading a
model unsharded on one device from a checkpoint of any layout or a Hugging Face directory
(loading.py), and decoding with a KV cache (sampling.py).
"""
