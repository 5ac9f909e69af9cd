#!/bin/sh
# Install the platform's wheel into the Python on PATH, pinned by constraints.txt: the only
# install step of the Dockerfile, and what tests/test_deploy.py runs in a fresh virtualenv.
#   sh docker/install.sh dist/mlplatform-<version>-py3-none-any.whl
# constraints.txt is read from beside docker/ (the repository root, or where the Dockerfile
# copies both). Dependencies the base image already holds at the pinned versions stay as
# they are (Ray itself in a rayproject/ray image).
set -eu
if [ "$#" -ne 1 ]; then
    echo "usage: sh docker/install.sh <one mlplatform wheel> (got $# arguments: remove old wheels from dist/)" >&2
    exit 2
fi
constraints="$(cd "$(dirname "$0")/.." && pwd)/constraints.txt"
python -m pip install --no-cache-dir --disable-pip-version-check -c "$constraints" "$1"
# The installed platform must import and find its packaged config from any directory.
cd /
python -c "import mlplatform.cli_check as c, os; assert os.path.isfile(os.path.join(c.CONF_DIR, 'config.yaml')), c.CONF_DIR"
