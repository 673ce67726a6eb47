"""Worker processes for tests/test_concurrency.py.

`python -m tests.concurrent_io write TARGET SOURCE_A SOURCE_B N` replaces
adapter directory TARGET N times, alternating the files of two saved
adapters; `... read TARGET STOP_FILE` reads TARGET with `read_adapter`
until STOP_FILE exists. Each prints a JSON summary of what it saw.
"""

import collections
import json
import os
import shutil
import sys


def write(target, sources, count):
    from keras_lora.files.adapter_files import CONFIG_NAME, WEIGHTS_NAME
    from keras_lora.files.atomic import atomic_write_dir

    errors = collections.Counter()
    for i in range(count):
        source = sources[i % len(sources)]

        def fill(tmp, source=source):
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                shutil.copy(os.path.join(source, name), tmp)

        try:
            atomic_write_dir(target, fill, keep=(CONFIG_NAME, WEIGHTS_NAME))
        except Exception as error:  # noqa: BLE001 - counted, reported
            errors[f"{type(error).__name__}: {error}"[:120]] += 1
    return {"writes": count, "errors": dict(errors)}


def read(target, stop_file):
    from keras_lora.files.adapter_files import read_adapter

    open(stop_file + ".ready-" + str(os.getpid()), "w").close()
    errors = collections.Counter()
    reads = 0
    versions = collections.Counter()
    while not os.path.exists(stop_file):
        try:
            meta, _ = read_adapter(target)
            versions[meta["adapter_name"]] += 1
        except Exception as error:  # noqa: BLE001 - counted, reported
            errors[f"{type(error).__name__}: {error}"[:120]] += 1
        reads += 1
    return {"reads": reads, "errors": dict(errors), "versions": versions}


if __name__ == "__main__":
    role, target = sys.argv[1], sys.argv[2]
    if role == "write":
        summary = write(target, sys.argv[3:5], int(sys.argv[5]))
    else:
        summary = read(target, sys.argv[3])
    print(json.dumps(summary))
