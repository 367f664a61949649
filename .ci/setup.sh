# Sourced by .ci/run and .ci/slow: install minipar with its test extras on a fresh machine and put
# this interpreter and its mpiexec first on PATH.
PYTHON="${PYTHON:-python3}"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

# A system Python that forbids pip installs (PEP 668) gets a virtual environment instead.
if "$PYTHON" -c 'import sys, sysconfig, pathlib; sys.exit(not pathlib.Path(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED").exists())'; then
    "$PYTHON" -m venv .ci/venv
    PYTHON="$PWD/.ci/venv/bin/python"
fi

"$PYTHON" -m pip install -e ".[test,docs]"

# The mpich wheel puts mpiexec beside the interpreter's scripts (pyenv's versions/X/bin, a venv's bin);
# the tests and ipyparallel find it on PATH, and `python` must be this interpreter.
SCRIPTS_DIR="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
PYTHON_DIR="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")"
export PATH="$SCRIPTS_DIR:$PYTHON_DIR:$PATH"

echo "python:  $(python --version 2>&1) at $(command -v python)"
echo "numpy:   $(python -c 'import numpy; print(numpy.__version__)')"
echo "mpi4py:  $(python -c 'import mpi4py; print(mpi4py.__version__)')"
# MPICH's first line is a heading ("HYDRA build details:"), so prefer the line naming the version.
mpiexec_details="$(mpiexec --version 2>&1)"
mpiexec_version="$(grep -m1 -i 'version' <<<"$mpiexec_details" || sed -n 1p <<<"$mpiexec_details")"
echo "mpiexec: $(command -v mpiexec) -- $(tr -s ' ' <<<"$mpiexec_version")"

