# The reformatters image: the CLI, every registered dataset and the Dask tools the manifests in cluster/ run.
# Build (tag with the git sha; the deploy workflow does): docker build -t ghcr.io/OWNER/reformatters:$(git rev-parse HEAD) .
# At run time only /scratch is written (HOME, TMPDIR, Dask's temporary directory); the root filesystem can be
# read-only, as the rendered manifests mount it.

# ---- build: the wheel, and its dependencies pinned by requirements.lock, into a virtual environment ----
FROM python:3.11.14-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python -m venv /opt/reformatters

WORKDIR /src
COPY pyproject.toml setup.py README.md requirements.lock ./
COPY reformatters ./reformatters
COPY datasets ./datasets
COPY templates ./templates
COPY cluster ./cluster

# The lock pins every runtime dependency (its dev-only entries are not dependencies of the wheel, so they are
# not installed); the wheel is built from this source, as .ci/check_wheel.sh builds and installs it.
RUN /opt/reformatters/bin/python -m pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/reformatters/bin/python -m pip install --constraint requirements.lock /wheels/reformatters-*.whl \
    && /opt/reformatters/bin/reformatters list

# ---- run: the same base image, the virtual environment only (no compilers, no pip cache, no source) ----
FROM python:3.11.14-slim-bookworm

RUN groupadd --gid 10001 reformatters \
    && useradd --uid 10001 --gid 10001 --home-dir /scratch --no-create-home --shell /usr/sbin/nologin reformatters \
    && mkdir /scratch \
    && chown 10001:10001 /scratch

COPY --from=build /opt/reformatters /opt/reformatters

ENV PATH=/opt/reformatters/bin:$PATH \
    HOME=/scratch \
    TMPDIR=/scratch \
    DASK_TEMPORARY_DIRECTORY=/scratch \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /scratch
USER 10001:10001

CMD ["reformatters", "--help"]
