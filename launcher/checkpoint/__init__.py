"""Checkpoints: written once and hashed on the way, published atomically, verified before a
resume, resumable on another layout, readable whole for export.

    store.py     the checkpoints of a run on disk: tags, manifest, verification,
                 retention, choosing the one to resume (the on-disk layout is drawn there)
    state.py     what a checkpoint records about the run: launcher_state.json (step,
                 sampler position, `SavedLayout`, config fingerprint) and RNG states
    save.py      saving (collective): write, then flush and publish, now or in a thread
    writer.py    files hashed as they are written (no read back to checksum them)
    load.py      loading into this rank's engine: DeepSpeed's loader or resharding
    reshard.py   a checkpoint of another tp, pp, dp or ZeRO stage, read slice by slice
    ds_files.py  DeepSpeed's checkpoint files: which holds what, names, opening safely
    reader.py    full tensors of any checkpoint in one process (export, generate)
"""
