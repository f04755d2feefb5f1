"""The run configuration: one YAML file -> typed, validated dataclasses (`Config`).

Callers use `load_config(path, overrides)` (launcher/config/load.py). Its data path:

    read_yaml        load.py     the file -> a raw mapping (refuses what is not a config)
    apply_overrides  load.py     `section.key=value` strings set into the mapping
    build_section    coerce.py   the mapping -> schema.py's dataclasses, type-checked
    resolve          resolve.py  `auto` and model.init_from, from tokenizer.json / config.json
    check_config     checks.py   the checks that need no world size

World-size checks come later (parallel/layout.py `resolve_layout`), the rest of what a launch
checks in launcher/training/preflight.py; values computed from a config are in derived.py.
Every mistake raises `ConfigError` (launcher/errors.py), whose message is a single line
naming the offending key, user text escaped to one line; the entry point prints it and
exits with code 2. Any input ends that way, never in a traceback or a hang
(tests/test_config_fuzz.py).
"""
