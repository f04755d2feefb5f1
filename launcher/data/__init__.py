"""Training data: text files tokenized into prepared datasets, and the batches a run reads
from them.

    prepare_inputs.py  the input files, cut into tasks; a task's documents and bad lines
    prepare_tasks.py   running tasks (encode, write a shard), in-process or in worker processes
    prepare.py         tokenizing inputs into a prepared dataset (`python -m launcher.prepare`)
    shards.py          the prepared dataset format (manifest, shards, document boundaries)
    sources.py         the datasets a run trains on, split into train and validation streams
    sampling.py        the shuffled, blended sample order (Feistel permutation, blend schedule)
    batches.py         global batches per data-parallel rank: what a run's data is
"""
