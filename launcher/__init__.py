"""The launcher: 3D-parallel (tensor x pipeline x data) Llama training on DeepSpeed.

The commands are `python -m launcher.<verb>` (train, plan, prepare, export, generate, report;
`python -m launcher` lists them); each is a thin shell over the packages below it.
docs/ARCHITECTURE.md draws the layers and says what each package owns.
"""
