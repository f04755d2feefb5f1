"""The Llama-style decoder: its weight table (weights.py: names, Hugging Face names, the
tensor-parallel split of each), its layers (layers.py, attention.py, documents.py for
packed documents) and the model as pipeline items (llama.py).
"""
