"""The device flags (--backend, --transport), applied before anything imports minipar.backend.

minipar.backend picks the array library (xp) once per process, at its import, so the CLI reads these
two flags first (``choose_backend``) and sets ``MINIPAR_BACKEND``/``MINIPAR_TRANSPORT``. For
``--backend cupy`` it then checks the GPU stack piece by piece (``check_gpu_stack``): CuPy, a
driver that lists a GPU, the CUDA libraries, and NCCL for ``--transport nccl``, each missing piece
named in one sentence with what to install (docs/gpu.md).
"""
import argparse
import os
import sys

from minipar.errors import ConfigError

BACKENDS = ("numpy", "cupy", "devicesim")  # minipar.backend.BACKEND_NAMES, before it may be imported
TRANSPORTS = ("staged", "cuda-aware", "nccl")


def add_device_arguments(parser):
    group = parser.add_argument_group("device (docs/gpu.md)")
    group.add_argument("--backend", choices=BACKENDS, default=None,
                       help="array library: numpy (CPU), cupy (GPU), devicesim (the CPU stand-in for CuPy); "
                            "default: $MINIPAR_BACKEND or numpy")
    group.add_argument("--transport", choices=TRANSPORTS, default=None,
                       help="how GPU arrays reach MPI; default: $MINIPAR_TRANSPORT or staged")


def choose_backend(argv):
    """Apply --backend/--transport before anything imports minipar.backend, which picks xp once."""
    early = argparse.ArgumentParser(add_help=False)
    add_device_arguments(early)
    chosen, _ = early.parse_known_args(argv)
    if chosen.backend is not None:
        loaded = sys.modules.get("minipar.backend")
        if loaded is not None and loaded.BACKEND_NAME != chosen.backend:
            raise ConfigError(f"--backend {chosen.backend}: this process already computes with "
                              f"{loaded.BACKEND_NAME} (the backend is chosen once per process)")
        os.environ["MINIPAR_BACKEND"] = chosen.backend
    if chosen.transport is not None:
        os.environ["MINIPAR_TRANSPORT"] = chosen.transport
    if os.environ.get("MINIPAR_BACKEND") == "cupy" and "minipar.backend" not in sys.modules:
        check_gpu_stack(os.environ.get("MINIPAR_TRANSPORT", "staged"))


GPU_EXTRA = 'pip install -e ".[gpu]"'


def check_gpu_stack(transport):
    """One sentence naming what to install when a piece of the GPU stack is missing (before the backend loads)."""
    try:
        import cupy
    except ImportError as error:
        raise ConfigError(f"--backend cupy: CuPy is not installed ({error}); {GPU_EXTRA} installs it") from None
    try:
        devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # noqa: BLE001 - CUDARuntimeError, or a driver library that will not load
        raise ConfigError(f"--backend cupy: CUDA finds no usable GPU ({error}); install the NVIDIA driver "
                          "(nvidia-smi must list a GPU)") from None
    if devices == 0:
        raise ConfigError("--backend cupy: CUDA finds no GPU on this machine (nvidia-smi must list one)")
    try:
        cupy.arange(4.0).reshape(2, 2) @ cupy.ones((2, 2))  # loads cuBLAS and compiles a kernel (NVRTC)
    except Exception as error:  # noqa: BLE001 - a missing CUDA library surfaces as one of several errors
        raise ConfigError(f"--backend cupy: CuPy cannot load the CUDA libraries ({type(error).__name__}: {error}); "
                          f"{GPU_EXTRA} installs them (cupy-cuda12x[ctk])") from None
    if transport == "nccl":
        try:
            from cupy.cuda import nccl

            available = bool(nccl.available)
        except ImportError:
            available = False
        if not available:
            raise ConfigError('--transport nccl: CuPy finds no NCCL library (libnccl.so.2); pip install '
                              f'"nvidia-nccl-cu12>=2.18.1,<3" (part of {GPU_EXTRA})')
