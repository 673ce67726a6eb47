"""Runs one comparison phase in its own process.

    python -m keras_lora.comparison.worker SPEC.json RESULT.json

`SPEC.json` is a `run_phase` spec (see `keras_lora.comparison.phase`); the
results are written to `RESULT.json` atomically. A fresh process per phase
means each phase's peak memory is its own (on a CPU the measure is the
process's resident memory). The Keras backend comes from `KERAS_BACKEND`,
inherited from the parent.
"""

import json
import sys

from keras_lora.files.atomic import atomic_write_file


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(
            "usage: python -m keras_lora.comparison.worker SPEC.json "
            "RESULT.json",
            file=sys.stderr,
        )
        return 2
    spec_path, result_path = argv
    with open(spec_path) as f:
        spec = json.load(f)

    from keras_lora.comparison.phase import run_phase

    result = run_phase(spec)

    def write(tmp, _scratch):
        with open(tmp, "w") as f:
            json.dump(result, f)

    atomic_write_file(result_path, write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
