# oneha: one image for the subscriber, reconciler, workers, Flower and the lab cloud (docker-compose.yml).
# Installs the package from this source tree with pip, as ./run does (minus the editable install), into a venv so
# that the same steps work on the python image and on a plain Debian with python3-venv (docs/compose.md builds its
# base with debootstrap where no image registry is reachable: --build-arg BASE_IMAGE=oneha-base:local).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Extra pip options, e.g. "--no-index --find-links=/src/wheels" for a wheelhouse built with `pip wheel` and put
# in the build context as wheels/ (builds without PyPI; docs/compose.md).
ARG PIP_INSTALL_OPTIONS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/oneha/venv/bin:$PATH

# ipmitool and curl for the fence scripts (deploy/fence); nothing else from the distribution.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ipmitool curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . /src
RUN python3 -m venv /opt/oneha/venv \
    && /opt/oneha/venv/bin/pip install --no-cache-dir $PIP_INSTALL_OPTIONS . \
    && install -d -m 0755 /opt/oneha/bin /opt/oneha/fence /etc/oneha \
    && install -m 0755 deploy/bin/oneha-bridge /opt/oneha/bin/oneha-bridge \
    && install -m 0755 deploy/fence/fence_ipmi.sh deploy/fence/fence_redfish.sh /opt/oneha/fence/ \
    && install -m 0644 deploy/fence/fence-lib.sh /opt/oneha/fence/ \
    && useradd --system --uid 10001 --user-group --home-dir /home/oneha --create-home oneha \
    && rm -rf /src

# The bridge wrapper execs this path (deploy/bin/oneha-bridge); in the image oneha lives in the venv.
ENV ONEHA_BIN=/opt/oneha/venv/bin/oneha
USER oneha
WORKDIR /home/oneha
# 9641 subscriber metrics, 9642 worker metrics, 5555 Flower, 2633/2101 the lab cloud
EXPOSE 9641 9642 5555 2633 2101
CMD ["oneha", "--help"]
