"""The wheel bundle the GPU pack carries to a GPU machine without Keras.

`python -m benchmarks.gpu_bundle [--dir .gpu_bundle]` (what
`scripts/gpu_bundle.sh` runs, on any machine that reaches PyPI):

1. downloads, for the GPU machine's Python (CPython 3.12, x86-64 Linux),
   the wheels the project needs that the machine lacks (`BUNDLED`, at the
   versions installed in this environment, where the test suite passes);
2. builds this project as a wheel;
3. checks that every requirement of every bundled wheel is met by another
   bundled wheel or by a package on the GPU machine (`ON_MACHINE`), except
   the ones left out on purpose (`LEFT_OUT`), and that no package is there
   twice;
4. prints the bundle's size and that of everything that travels with it
   (the files git tracks or would track, plus the bundle) against the
   device tool's 64 MiB limit.

Exit status 1 if a download, the build or a check fails, or the total is
over the limit.
"""

import argparse
import email.parser
import glob
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = ".gpu_bundle"
LIMIT_BYTES = 64 * 2**20  # the device tool's limit: tree + carried paths
PYTHON_VERSION = "3.12"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# The GPU machine's interpreter, for evaluating requirement markers.
TARGET_ENVIRONMENT = {
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_system": "Linux",
    "python_full_version": "3.12.3",
    "python_version": PYTHON_VERSION,
    "sys_platform": "linux",
    "extra": "",
}
# Not on the GPU machine: Keras, keras-hub and what they need beyond it.
BUNDLED = ("keras", "keras-hub", "namex", "optree", "kagglehub", "kagglesdk")
# Left out on purpose, with the reason (printed by the check).
LEFT_OUT = {
    "tensorflow-text": "needs TensorFlow, which the GPU machine lacks and "
    "whose wheel is far over the 64 MiB limit; keras-hub imports and builds "
    "its models without it (its tokenizers and preprocessing layers use it; "
    "the pack feeds token ids)",
}
# The GPU machine's Python packages (the device notes' list, read there on
# 2026-11-17); only their names are known here, not their versions.
ON_MACHINE = frozenset(
    """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal
    annotated-doc anyio attrs botorch build certifi charset-normalizer chex
    click cloudpickle cmake colorama contourpy coverage cuda-bindings
    cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax
    fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet
    httpcore httpx huggingface-hub humanize hypothesis idna imageio
    iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
    jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
    lightning-utilities linear-operator lineax llvmlite lxml markdown
    markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py
    mpmath msgpack multidict multipledispatch mypy-extensions nanobind
    narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
    nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
    nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
    nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
    nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
    onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
    opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
    patsy peft pillow pip pluggy portalocker prometheus-client propcache
    protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
    pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov
    pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
    scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
    sentence-transformers setuptools shellingham simplejson six
    sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken
    timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
    torchmetrics torchvision tqdm transformers treescope triton typer
    typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug
    wheel wrapt xarray xxhash yarl zipp
    """.split()
)


def normalize(name):
    """A distribution name in PEP 503 form (`Keras_Hub` -> `keras-hub`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def local_pins(names=BUNDLED):
    """`name==version` for each package as installed here (where the test
    suite runs); an error names any that is missing."""
    pins, missing = [], []
    for name in names:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise SystemExit(
            f"gpu_bundle: {', '.join(missing)} not installed here; the "
            "bundle takes the versions this environment tests with. Run "
            "`pip install -e .[hub]` first, or pin them with --pin."
        )
    return pins


def download(pins, directory, log=print):
    """`pip download` of `pins` for the GPU machine, without dependencies
    (the coverage check names any that is missing)."""
    argv = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        PYTHON_VERSION,
        "--implementation",
        "cp",
        "-d",
        directory,
    ]
    for platform in PLATFORMS:
        argv += ["--platform", platform]
    log("$ " + " ".join(argv + list(pins)))
    subprocess.run(argv + list(pins), check=True)


def build_project_wheel(directory, log=print):
    """This project as a wheel (setuptools, no build isolation: no
    download of the build backend)."""
    argv = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        directory,
        REPO_ROOT,
    ]
    log("$ " + " ".join(argv))
    # setuptools builds in the tree: remove what it leaves that was not
    # there before (both are git-ignored, but clutter).
    leftovers = [
        path
        for path in (
            os.path.join(REPO_ROOT, "build"),
            os.path.join(REPO_ROOT, "keras_lora.egg-info"),
        )
        if not os.path.exists(path)
    ]
    try:
        subprocess.run(argv, check=True, cwd=REPO_ROOT)
    finally:
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)


def wheel_metadata(path):
    """`(name, version, requires)` read from a wheel's METADATA."""
    with zipfile.ZipFile(path) as wheel:
        names = [
            n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")
        ]
        if len(names) != 1:
            raise ValueError(f"{path}: expected one METADATA, found {names}")
        text = wheel.read(names[0]).decode("utf-8")
    message = email.parser.Parser().parsestr(text, headersonly=True)
    requires = message.get_all("Requires-Dist") or []
    return normalize(message["Name"]), message["Version"], requires


def check_requirements(wheels, on_machine=ON_MACHINE, left_out=None):
    """Checks that every wheel's requirements (for the GPU machine, no
    extras) are met. Returns `(problems, notes)`: lists of lines."""
    left_out = LEFT_OUT if left_out is None else left_out
    found, problems, notes = {}, [], []
    for path in wheels:
        name, version, requires = wheel_metadata(path)
        if name in found:
            problems.append(
                f"{name} is in the bundle twice ({found[name][0]} and "
                f"{version}): one version each, or the install stops"
            )
        found[name] = (version, requires)
    for name, (_, requires) in sorted(found.items()):
        for line in requires:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is not None and not marker.evaluate(TARGET_ENVIRONMENT):
                continue
            needed = normalize(requirement.name)
            if needed in found:
                version = Version(found[needed][0])
                if not requirement.specifier.contains(
                    version, prereleases=True
                ):
                    problems.append(
                        f"{name} needs {requirement}, the bundle has "
                        f"{needed} {version}"
                    )
            elif needed in left_out:
                notes.append(
                    f"{name} needs {needed}: left out, because it "
                    f"{left_out[needed]}"
                )
            elif needed not in on_machine:
                problems.append(
                    f"{name} needs {requirement}, which is neither in the "
                    "bundle nor on the GPU machine: add it to BUNDLED"
                )
    return problems, notes


def travelling_bytes(repo=REPO_ROOT):
    """Bytes of the files the device tool sends: tracked files and
    untracked files git does not ignore (deleted ones skipped)."""
    listed = (
        subprocess.run(
            [
                "git",
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
            ],
            cwd=repo,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    total = 0
    for name in filter(None, set(listed)):
        path = os.path.join(repo, name)
        if os.path.isfile(path) and not os.path.islink(path):
            total += os.path.getsize(path)
    return total


def directory_bytes(directory):
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(directory)
        for name in names
    )


def size_report(bundle_dir, repo=REPO_ROOT):
    """`(lines, over_limit)`: bundle, tree and total against the limit."""
    bundle = directory_bytes(bundle_dir)
    tree = travelling_bytes(repo)
    total = bundle + tree
    mib = 2**20
    lines = [
        f"bundle {bundle_dir}: {bundle / mib:.2f} MiB",
        f"tree (git ls-files, tracked + untracked not ignored): "
        f"{tree / mib:.2f} MiB",
        f"total that travels: {total / mib:.2f} MiB of the "
        f"{LIMIT_BYTES / mib:.0f} MiB limit "
        f"({(LIMIT_BYTES - total) / mib:.2f} MiB to spare)",
    ]
    return lines, total > LIMIT_BYTES


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_bundle",
        description="Download the wheels the GPU machine lacks (and build "
        "this project's) into a git-ignored folder; print its size.",
    )
    parser.add_argument(
        "--dir",
        default=DEFAULT_DIR,
        help="Bundle folder (default "
        f"{DEFAULT_DIR}, relative to the repository root).",
    )
    parser.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="NAME==VERSION",
        help="Use this version instead of the one installed here.",
    )
    parser.add_argument(
        "--check-only",
        action="store_true",
        help="Only check the bundle already there and print sizes.",
    )
    args = parser.parse_args(argv)
    directory = os.path.join(REPO_ROOT, args.dir)
    if not args.check_only:
        overridden = {normalize(p.split("==")[0]) for p in args.pin}
        keep = [n for n in BUNDLED if normalize(n) not in overridden]
        pins = local_pins(keep) + list(args.pin)
        shutil.rmtree(directory, ignore_errors=True)  # one version each
        os.makedirs(directory)
        download(pins, directory)
        build_project_wheel(directory)
    wheels = sorted(glob.glob(os.path.join(directory, "*.whl")))
    if not wheels:
        print(f"gpu_bundle: no wheels in {directory}", file=sys.stderr)
        return 1
    print(f"\n{len(wheels)} wheels in {args.dir}:")
    for path in wheels:
        print(f"  {os.path.basename(path)} ({os.path.getsize(path):,} bytes)")
    problems, notes = check_requirements(wheels)
    for line in notes:
        print(f"note: {line}")
    for line in problems:
        print(f"PROBLEM: {line}", file=sys.stderr)
    lines, over = size_report(directory)
    print("\n" + "\n".join(lines))
    if over:
        print("PROBLEM: over the limit: carry less.", file=sys.stderr)
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", args.dir], cwd=REPO_ROOT
    ).returncode
    if ignored != 0:
        problems.append(f"{args.dir} is not git-ignored")
        print(f"PROBLEM: {args.dir} is not git-ignored", file=sys.stderr)
    return 1 if problems or over else 0


if __name__ == "__main__":
    sys.exit(main())
